"""Bad input gives one clear message and a non-zero exit, never a traceback."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qllava.recipe import all_keys


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
        # qllava never downloads: a hub id gets the command that fetches it once.
        (["chat", "llava-hf/llava-1.5-7b-hf", "--prompt", "hi"], "hf download llava-hf/llava-1.5-7b-hf --local-dir"),
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


def test_fewer_samples_than_one_step_is_one_message_before_the_model_loads(tiny_base, tiny_data):
    result = train_on_tiny(tiny_base, tiny_data, "train.micro_batch_size=4", "train.grad_accum=4")
    assert result.returncode == 1
    assert "12 training samples are fewer than one optimizer step needs (4 x 4 x 1 processes)" in result.stderr
    assert "LLM in 4-bit" not in result.stdout + result.stderr  # the model's start-up table: it never loaded
    # `data check` says so too, as a warning beside its report of sound data.
    args = [f"model.base={tiny_base}", f"data.train={tiny_data / 'train.json'}", "train.micro_batch_size=4"]
    args += [f"data.image_folder={tiny_data / 'images'}", "data.eval=", "train.grad_accum=4"]
    check = qllava("data", "check", "demo", *args)
    assert check.returncode == 0, check.stderr
    assert "warning: 12 training samples are fewer than one optimizer step needs (4 x 4 on one process)" in (
        check.stdout
    )


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


BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def test_bitsandbytes_missing_kernels_notice_is_silenced_and_other_warnings_are_not():
    # bitsandbytes logs the notice at import on CPUs with AVX512-BF16 (where it is absent, the first
    # assertion holds trivially and the next ones still check the filter in a fresh process).
    # The same notice with another cause, and any other bitsandbytes warning, must still show.
    script = (
        "import logging, qllava.model.load\n"
        f"log = logging.getLogger({BNB_CPU_LOGGER!r})\n"
        f"log.warning({KERNELS_NOTICE + ': %s. Please make sure'!r}, ConnectionError('hub unreachable'))\n"
        "log.warning('another bitsandbytes warning')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "No module named 'kernels'" not in result.stderr
    assert f"{KERNELS_NOTICE}: hub unreachable" in result.stderr
    assert "another bitsandbytes warning" in result.stderr


def test_kernels_notice_filter_drops_only_the_missing_kernels_record():
    import logging

    import qllava  # noqa: F401  (installs the filter)

    logger = logging.getLogger(BNB_CPU_LOGGER)
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    try:
        missing = ModuleNotFoundError("No module named 'kernels'", name="kernels")
        logger.warning(KERNELS_NOTICE + ": %s. Please make sure", missing)
        other_module = ModuleNotFoundError("No module named 'huggingface_hub'", name="huggingface_hub")
        logger.warning(KERNELS_NOTICE + ": %s. Please make sure", other_module)
        logger.warning(KERNELS_NOTICE + ": %s. Please make sure", OSError("offline"))
        logger.warning("No module named 'kernels'")
        logger.error(KERNELS_NOTICE + ": %s", RuntimeError("x"))
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in seen] == [
        f"{KERNELS_NOTICE}: No module named 'huggingface_hub'. Please make sure",
        f"{KERNELS_NOTICE}: offline. Please make sure",
        "No module named 'kernels'",
        f"{KERNELS_NOTICE}: x",
    ]


def test_version_names_qllava_and_the_libraries_it_runs_on():
    from importlib.metadata import version

    result = qllava("--version")
    assert result.returncode == 0, result.stderr
    libraries = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
    assert result.stdout.splitlines() == [
        f"qllava {version('qllava')}",
        ", ".join(f"{name} {version(name)}" for name in libraries),
    ]


def test_help_says_why_chat_samples_and_answer_is_greedy():
    def help_text(command: str) -> str:  # rich draws boxes and wraps lines: compare the words only
        return " ".join(qllava_here(command, "--help").stdout.replace("│", " ").split())

    assert "Sampling temperature (0.2, LLaVA's chat default); 0 for greedy decoding, which gives the answers" in (
        help_text("chat")
    )
    assert "0 (greedy, as LLaVA's evaluation scripts) gives reproducible scores" in help_text("answer")


def test_projector_file_of_another_format_is_one_message(tiny_base, tiny_data, tmp_path):
    import torch

    from qllava.errors import QllavaError
    from qllava.model.load import load_base
    from qllava.model.projector import load_projector

    (tmp_path / "projector.safetensors").write_text("a text file with a weights file's name")
    projector = f"model.projector_from={tmp_path / 'projector.safetensors'}"
    result = train_on_tiny(tiny_base, tiny_data, projector, "train.micro_batch_size=4")  # 12 samples: 3 steps
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"qllava: error: {tmp_path / 'projector.safetensors'} is not a safetensors file (" in result.stderr
    assert "read from a projector.safetensors (what a stage-1 run saves in its checkpoints) or LLaVA's" in result.stderr

    (tmp_path / "mm_projector.bin").write_text("a text file")
    model = load_base(tiny_base, bits=16, device=torch.device("cpu"))
    with pytest.raises(QllavaError, match=r"mm_projector.bin is not a PyTorch weights file \(\w+\); projector"):
        load_projector(model, tmp_path / "mm_projector.bin")


def test_readme_speaks_to_users_of_the_repository_alone():
    """Users of the repository have no team notes beside it: the README states facts itself."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert not re.search(r"\.\./shared|DESIGN\.md|\bNOTES\b", readme)
    # Every recipe key the README names exists (a renamed key would leave the docs behind).
    named = set(re.findall(r"`((?:model|lora|data|optim|train|output)\.[a-z_]+)", readme))
    named -= {"model.vision_tower", "model.multi_modal_projector", "model.visual"}  # module names, not recipe keys
    assert named and named <= set(all_keys()), named - set(all_keys())
