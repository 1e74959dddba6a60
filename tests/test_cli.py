"""Bad input gives one clear message and a non-zero exit, never a traceback."""

import json
import subprocess
import sys

import pytest


def qllava(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qllava", *args], capture_output=True, text=True, cwd=cwd, timeout=900)


def qllava_here(*args, input=None):
    """The same CLI run in this process by typer's runner (exit_code, stdout, stderr): no import start-up cost."""
    from typer.testing import CliRunner

    from qllava.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], input=input)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "missing.yaml"], "recipe file `missing.yaml` not found"),
        (["train", "demo", "train.max_stepz=3"], "did you mean `train.max_steps`?"),
        (["train", "demo", "train.max_steps=abc"], "expected an integer"),
        (["train", "demo", "model.base=/nonexistent"], "is not a model directory"),
        (
            ["data", "check", "demo", "data.train=/nonexistent.json", "model.base=/nonexistent"],
            "is not a model directory",
        ),
    ],
)
def test_bad_input_is_one_message(args, message):
    result = qllava(*args)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def train_on_tiny(base, data_dir, *overrides):
    """`qllava train demo` pointed at the tiny model and data of the fixtures."""
    return qllava(
        "train",
        "demo",
        f"model.base={base}",
        f"data.train={data_dir / 'train.json'}",
        f"data.image_folder={data_dir / 'images'}",
        "data.eval=",
        f"output.dir={data_dir / 'run'}",
        *overrides,
    )


def test_bad_sample_is_one_message(tiny_base, tiny_data):
    records = json.loads((tiny_data / "train.json").read_text())
    records[2]["conversations"][0]["from"] = "robot"
    (tiny_data / "train.json").write_text(json.dumps(records))
    result = train_on_tiny(tiny_base, tiny_data)
    assert result.returncode == 1
    assert "unknown role 'robot'" in result.stderr and "s2" in result.stderr
    assert "Traceback" not in result.stderr


def test_recipes_lists_shipped_recipes_and_keys():
    result = qllava("recipes")
    assert result.returncode == 0 and "demo.yaml" in result.stdout and "qllava train" in result.stdout
    keys = qllava("recipes", "--keys")
    assert "data.max_length = 2048" in keys.stdout


def test_corrupt_image_in_a_dataloader_worker_is_one_message(tiny_base, tiny_data):
    (tiny_data / "images" / "0.png").write_bytes(b"not a png")
    result = train_on_tiny(tiny_base, tiny_data, "data.num_workers=1", "train.micro_batch_size=2", "train.max_steps=10")
    assert result.returncode == 1
    assert "sample 's0'" in result.stderr and "cannot read image" in result.stderr
    assert "Traceback" not in result.stderr
