"""The `qllava` command line: each command wires library calls together, nothing more."""

from __future__ import annotations

import os
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
FORCE = typer.Option(
    False, "--force", help="Apply the checkpoint even to a base other than the one it records (with a warning)"
)

# The libraries whose versions decide qllava's numbers: quoted in bug reports by `qllava --version`.
_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")


def _print_version(requested: bool) -> None:
    """Versions from the installed packages' metadata: nothing is imported, so it answers at once."""
    if not requested:
        return
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    typer.echo(f"qllava {installed('qllava')}")
    typer.echo(", ".join(f"{name} {installed(name)}" for name in _LIBRARIES))
    raise typer.Exit()


# Holds the app-wide options only; a docstring here would replace the app's help text.
@app.callback()
def _options(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the versions of qllava and the libraries it runs on",
    ),
) -> None:
    pass


def _run(fn, *args, **kwargs):
    """Foreseeable mistakes become one message on stderr and exit code 1, not a traceback."""
    try:
        return fn(*args, **kwargs)
    except QllavaError as exc:
        if os.environ.get("QLLAVA_DEBUG") == "1":  # the traceback, for a bug report
            raise
        message = str(exc)
        if "Original Traceback" in message:  # re-raised from a dataloader worker: keep its own message
            message = message.rstrip().splitlines()[-1].split("QllavaError: ", 1)[-1]
        typer.echo(f"qllava: error: {message}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt as exc:
        # A training run stopped by Ctrl-C says where it stopped and how to continue (TrainingStopped).
        typer.echo(f"qllava: {str(exc) or 'interrupted'}", err=True)
        raise typer.Exit(130) from None


@app.command()
def train(
    recipe: str = typer.Argument(..., help="Recipe YAML path or shipped recipe name (see `qllava recipes`)"),
    overrides: list[str] | None = OVERRIDES,
    num_processes: int = typer.Option(
        1, "--num-processes", "-n", min=1, help="Processes to launch through accelerate: one per GPU (gloo on CPU)"
    ),
    accelerate_config: Path | None = typer.Option(
        None, help="An accelerate config for the launch, e.g. recipes/accelerate/fsdp-qlora.yaml"
    ),
) -> None:
    """Train the LoRA adapters and projector as the recipe says (stage 1: the projector alone)."""
    from qllava.recipe import load_recipe

    if num_processes > 1 or accelerate_config is not None:
        from qllava.train.launch import launch_training

        code = _run(launch_training, recipe, overrides or [], num_processes, accelerate_config)
        raise typer.Exit(code)
    from qllava.train.loop import train as run_training

    _run(lambda: run_training(load_recipe(recipe, overrides or [])))


@app.command()
def plan(
    recipe: str = typer.Argument(..., help="Recipe YAML path or shipped recipe name (see `qllava recipes`)"),
    overrides: list[str] | None = OVERRIDES,
    gpu_memory: float | None = typer.Option(
        None, "--gpu-memory", help="GPU memory in GB (default: the local GPU's; none: a 12-80 GB table)"
    ),
    seq_len: int | None = typer.Option(None, "--seq-len", min=1, help="Tokens per sample (default: data.max_length)"),
) -> None:
    """Predict the training step's peak GPU memory from the base's config.json; the largest micro-batch that fits."""
    from qllava.plan import plan as make_plan
    from qllava.recipe import load_recipe

    typer.echo(_run(lambda: make_plan(load_recipe(recipe, overrides or []), gpu_memory, seq_len)))


@app.command()
def demo(
    out: Path | None = typer.Option(
        None,
        help="Run directory (metrics.json, adapter, logs); default runs/demo, runs/demo-next for --arch llava_next",
    ),
    two_stage: bool = typer.Option(
        False, "--two-stage", help="Compose a fresh LLaVA, align its projector (stage 1), then instruction-tune"
    ),
    arch: str = typer.Option(
        "llava",
        help="llava (the default demo) or llava_next (wide images with one small shape: the demo base as LLaVA-NeXT "
        "and as LLaVA-1.5, trained alike, compared)",
    ),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """The embedded default: a tiny LLaVA learns visual QA with QLoRA on CPU; prints accuracy before/after."""
    from qllava.demo import run_demo

    out = out or Path("runs/demo-next" if arch == "llava_next" else "runs/demo")
    _run(run_demo, out, overrides or [], two_stage, arch=arch)


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
    index: int = typer.Option(
        0, "--index", "-i", help="Sample position in data.train; negative counts from the end (-1: the last)"
    ),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Render one sample with the tokens that carry loss marked [[like this]]: the label audit."""
    from qllava.data.check import show_sample
    from qllava.recipe import load_recipe

    typer.echo(_run(lambda: show_sample(load_recipe(recipe, overrides or []), index)))


@app.command()
def merge(
    checkpoint: Path = typer.Argument(..., help="A checkpoint-STEP/ or final/ directory of a qllava run"),
    out: Path = typer.Option(..., "--out", help="New directory for the merged model"),
    dtype: str = typer.Option("bf16", help="Weight dtype of the export: bf16, fp16 or fp32"),
    method: str = typer.Option(
        "dequantized",
        help="dequantized: merge into the NF4 weights the adapter was trained against (exact); "
        "original: merge into the original 16-bit weights (drifts, see merge_report.json)",
    ),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare the export with base + adapter"),
    verify_samples: int = typer.Option(16, help="Samples (prompts) used by the verification"),
    device: str = typer.Option("auto", help="auto (GPU when there is one), cpu or cuda"),
    min_top1_agreement: float = typer.Option(
        0.97, help="Fail unless the export predicts the trained model's top token at this share of positions"
    ),
    max_mean_kl: float = typer.Option(
        0.01, help="Fail unless the mean KL(trained || export) per position is at most this"
    ),
    base: Path | None = typer.Option(
        None, "--base", help="Where the base the checkpoint was trained on is now (default: its recipe's model.base)"
    ),
    force: bool = FORCE,
) -> None:
    """Merge the adapter into its base and write a plain transformers LLaVA (verified against base + adapter)."""
    from qllava.export import FAILED_MARKER, merge_checkpoint

    report = _run(
        merge_checkpoint,
        checkpoint,
        out,
        dtype=dtype,
        method=method,
        verify=verify,
        verify_samples=verify_samples,
        device=device,
        min_top1_agreement=min_top1_agreement,
        max_mean_kl=max_mean_kl,
        base=base,
        force=force,
    )
    typer.echo(report.summary())
    for warning in report.warnings:
        typer.echo(f"qllava: warning: {warning}", err=True)
    typer.echo(f"qllava: merged model in {out} (report: {out / 'merge_report.json'})")
    if report.verified and not report.passed:
        typer.echo(
            f"qllava: error: the merged model does not reproduce base + adapter within tolerance; it is kept in "
            f"{out}, marked with {FAILED_MARKER}",
            err=True,
        )
        raise typer.Exit(2)


@app.command()
def compose(
    vision: Path = typer.Option(
        ..., "--vision", help="CLIP or SigLIP checkpoint directory (vision-only or dual encoder)"
    ),
    llm: Path = typer.Option(..., "--llm", help="Llama, Mistral or Qwen2 causal LM directory (with its tokenizer)"),
    out: Path = typer.Option(..., "--out", help="New directory for the composed LLaVA"),
    projector: str = typer.Option("mlp2x_gelu", help="mlp2x_gelu (LLaVA-1.5) or linear (alias mlp1x_gelu)"),
    template: str | None = typer.Option(
        None, help="Chat template written with the model (default: vicuna_v1 / mistral_instruct / chatml by LLM)"
    ),
    vision_feature_layer: int = typer.Option(-2, help="Vision tower layer whose features feed the projector"),
    seed: int = typer.Option(0, help="Seed of the projector's initialisation"),
    arch: str = typer.Option(
        "llava", help="llava (LLaVA-1.5: one square image) or llava_next (LLaVA-NeXT: AnyRes tiles by image size)"
    ),
) -> None:
    """Build a new LLaVA from a vision encoder and an LLM; its projector starts untrained."""
    from qllava.model.compose import compose_llava

    _run(
        compose_llava,
        vision,
        llm,
        out,
        projector=projector,
        template=template,
        vision_feature_layer=vision_feature_layer,
        seed=seed,
        arch=arch,
    )


MODEL = typer.Argument(..., help="A merged export, or a base LLaVA directory (with --adapter for a trained one)")
ADAPTER = typer.Option(None, help="checkpoint-STEP/ or final/ directory of a qllava run, applied to MODEL")
BITS = typer.Option(
    None,
    help="Load MODEL in 4, 8 or 16 bit (default: the bits --adapter was trained on, 16 for a merged export, else 4)",
)
TEMPLATE = typer.Option(None, help="Override the conversation template (default: the one the model was trained with)")


def _load_for_prompts(model: str, adapter: Path | None, bits: int | None, template: str | None, force: bool):
    """(model, processor, recipe whose data section renders its prompts) for chat and answer."""
    from qllava.generate import inference_recipe, load_for_inference

    loaded, processor = load_for_inference(model, adapter, bits=bits, force=force)
    return loaded, processor, inference_recipe(model, adapter, processor, template)


@app.command()
def chat(
    model: str = MODEL,
    adapter: Path | None = ADAPTER,
    image: list[Path] | None = typer.Option(
        None, help="Image to talk about; repeat for several (placed at the question's `<image>` tags, else before it)"
    ),
    prompt: str | None = typer.Option(None, help="Ask this one question and exit (default: interactive)"),
    bits: int | None = BITS,
    template: str | None = TEMPLATE,
    temperature: float = typer.Option(
        0.2,
        help="Sampling temperature (0.2, LLaVA's chat default); 0 for greedy decoding, which gives the answers "
        "`qllava answer` gives",
    ),
    top_p: float = typer.Option(1.0, help="Nucleus sampling: keep the smallest token set with this probability"),
    max_new_tokens: int = typer.Option(512, help="Longest answer in tokens"),
    force: bool = FORCE,
) -> None:
    """Chat about images; tokens stream as they are generated. /image PATH [PATH ...], /reset, /exit in the session."""
    from qllava.chat import ChatSession, check_images, repl
    from qllava.generate import Sampling

    def start():
        images = check_images(image or [])  # before the model loads, which takes minutes for a 7B one
        tags = (prompt or "").count("<image>")
        if tags and tags != len(images):
            raise QllavaError(
                f"--prompt has {tags} `<image>` tag(s) but {len(images)} --image: put one `<image>` where each image "
                "belongs, or none to have the images placed before the question"
            )
        loaded, processor, recipe = _load_for_prompts(model, adapter, bits, template, force)
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        session = ChatSession(loaded, processor, recipe, sampling, images)
        if prompt is not None:
            session.ask(prompt)
        else:
            repl(session)

    _run(start)


@app.command()
def answer(
    model: str = MODEL,
    questions: Path = typer.Argument(..., help="LLaVA model_vqa questions: {question_id, image, text} per line"),
    out: Path = typer.Option(
        ...,
        "--out",
        help="Answers jsonl; a rerun with the same model and settings skips the question_ids already in it (resume); "
        "answers of another model or other settings there are an error",
    ),
    image_folder: Path | None = typer.Option(None, help="Folder the questions' image paths are relative to"),
    adapter: Path | None = ADAPTER,
    bits: int | None = BITS,
    template: str | None = TEMPLATE,
    batch_size: int = typer.Option(8, help="Questions per generate call (left-padded; same answers as 1)"),
    temperature: float = typer.Option(
        0.0, help="Sampling temperature; 0 (greedy, as LLaVA's evaluation scripts) gives reproducible scores"
    ),
    top_p: float = typer.Option(1.0, help="Nucleus sampling probability"),
    max_new_tokens: int = typer.Option(128, help="Longest answer in tokens"),
    model_id: str | None = typer.Option(None, help="model_id written with each answer (default: from the paths)"),
    force: bool = FORCE,
) -> None:
    """Answer a question file in LLaVA's model_vqa format, resumably."""
    from qllava.answer import answer_questions, answer_settings, read_questions
    from qllava.generate import Sampling

    def start():
        items = read_questions(questions, image_folder)
        loaded, processor, recipe = _load_for_prompts(model, adapter, bits, template, force)
        name = model_id or (f"{adapter.parent.name}/{adapter.name}" if adapter else Path(model).name)
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        return answer_questions(
            loaded,
            processor,
            recipe,
            items,
            out,
            image_folder=image_folder,
            model_id=name,
            settings=answer_settings(model, adapter, loaded, recipe, sampling),
            sampling=sampling,
            batch_size=batch_size,
        )

    counts = _run(start)
    typer.echo(
        f"qllava: {counts['answered']} answered, {counts['already_answered']} already in {out} "
        f"({counts['questions']} questions)"
    )


@app.command()
def score(
    answers: Path = typer.Argument(..., help="Answers jsonl written by `qllava answer`"),
    truth: Path = typer.Option(..., "--truth", help="{question_id, answer or answers} per line"),
    per_question: Path | None = typer.Option(None, help="Also write one result line per question to this jsonl"),
) -> None:
    """Exact-match and VQA-normalized accuracy of answers against the truth."""
    import json

    from qllava.score import score_answers

    report = _run(score_answers, answers, truth)
    typer.echo(report.render())
    if per_question is not None:
        per_question.write_text("".join(json.dumps(row) + "\n" for row in report.per_question))
        typer.echo(f"qllava: per-question results in {per_question}")


def main() -> None:
    app(prog_name="qllava")


if __name__ == "__main__":
    sys.exit(main())
