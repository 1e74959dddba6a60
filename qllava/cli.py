"""The `qllava` command line: each command wires library calls together, nothing more."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from qllava.errors import QllavaError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="QLoRA fine-tuning of LLaVA-style vision-language models on one GPU.",
)
data_app = typer.Typer(no_args_is_help=True, help="Inspect a recipe's dataset before training.")
app.add_typer(data_app, name="data")

OVERRIDES = typer.Argument(None, help="Recipe overrides as section.key=value, e.g. train.max_steps=20")


def _run(fn, *args, **kwargs):
    """Foreseeable mistakes become one message on stderr and exit code 1, not a traceback."""
    try:
        return fn(*args, **kwargs)
    except QllavaError as exc:
        message = str(exc)
        if "Original Traceback" in message:  # re-raised from a dataloader worker: keep its own message
            message = message.rstrip().splitlines()[-1].split("QllavaError: ", 1)[-1]
        typer.echo(f"qllava: error: {message}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("qllava: interrupted", err=True)
        raise typer.Exit(130) from None


@app.command()
def train(
    recipe: str = typer.Argument(..., help="Recipe YAML path or shipped recipe name (see `qllava recipes`)"),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Train the LoRA adapters and projector as the recipe says."""
    from qllava.recipe import load_recipe
    from qllava.train.loop import train as run_training

    _run(lambda: run_training(load_recipe(recipe, overrides or [])))


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Run directory (metrics.json, adapter, logs)"),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """The embedded default: a tiny LLaVA learns visual QA with QLoRA on CPU; prints accuracy before/after."""
    from qllava.demo import run_demo

    _run(run_demo, out, overrides or [])


@app.command()
def recipes(keys: bool = typer.Option(False, "--keys", help="List every recipe key with its default and doc")) -> None:
    """List the shipped recipes (or, with --keys, the recipe schema)."""
    from qllava.recipe import Recipe, all_keys, field_docs, get, shipped_recipes

    if keys:
        defaults, docs = Recipe(), field_docs()
        for key in all_keys():
            typer.echo(f"{key} = {get(defaults, key)!r}\n    {docs.get(key, '')}")
        return
    for name, command in shipped_recipes():
        typer.echo(f"{name:36s} {command}")


@data_app.command("check")
def data_check(
    recipe: str = typer.Argument(..., help="Recipe YAML path or shipped recipe name"),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Scan the whole dataset: bad samples, missing or corrupt images, token lengths, trained fraction."""
    from qllava.data.check import check_dataset
    from qllava.recipe import load_recipe

    report = _run(lambda: check_dataset(load_recipe(recipe, overrides or [])))
    typer.echo(report.render())
    if report.errors:
        raise typer.Exit(1)


@data_app.command("show")
def data_show(
    recipe: str = typer.Argument(..., help="Recipe YAML path or shipped recipe name"),
    index: int = typer.Option(0, "--index", "-i", help="Sample position in data.train"),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Render one sample with the tokens that carry loss marked [[like this]]: the label audit."""
    from qllava.data.check import show_sample
    from qllava.recipe import load_recipe

    typer.echo(_run(lambda: show_sample(load_recipe(recipe, overrides or []), index)))


def main() -> None:
    app(prog_name="qllava")


if __name__ == "__main__":
    sys.exit(main())
