"""Shared fixtures: a tiny random LLaVA saved as an HF directory, and a tiny LLaVA-format dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from qllava.model.tiny import build_tiny_llava
from qllava.recipe import build_recipe

CORPUS = ["What color is the shape?", "red blue green", "Describe the image.", "a red circle"]
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("tiny") / "model", CORPUS, seed=0)


def write_image(path: Path, color=(200, 30, 30), size=(40, 28)) -> None:
    Image.new("RGB", size, color).save(path)


def write_color_data(root: Path, n: int, sizes=((40, 28),)) -> Path:
    """n color samples in root/train.json + root/images: every fourth text-only, the other odd ones two
    turns; image i has sizes[i % len(sizes)]."""
    images = root / "images"
    images.mkdir()
    records = []
    for i in range(n):
        name, rgb = list(COLORS.items())[i % 3]
        if i % 4 == 3:
            convs = [{"from": "human", "value": "Say a color."}, {"from": "gpt", "value": name}]
            records.append({"id": f"t{i}", "conversations": convs})
            continue
        write_image(images / f"{i}.png", rgb, size=sizes[i % len(sizes)])
        convs = [{"from": "human", "value": "What color is the shape?\n<image>"}, {"from": "gpt", "value": name}]
        if i % 2:
            convs += [{"from": "human", "value": "Describe the image."}, {"from": "gpt", "value": f"a {name} circle"}]
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": convs})
    (root / "train.json").write_text(json.dumps(records))
    return root


@pytest.fixture()
def tiny_data(tmp_path) -> Path:
    """12 samples: image ones (single and multi-turn) and text-only ones; images/ beside train.json."""
    return write_color_data(tmp_path, 12)


def make_recipe(base: Path, data_dir: Path, out: Path, **sections):
    raw = {
        "model": {"base": str(base)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {
            "train": str(data_dir / "train.json"),
            "image_folder": str(data_dir / "images"),
            "max_length": 128,
            "num_workers": 0,
        },
        "optim": {"name": "adamw", "lr": 1e-3, "projector_lr": 1e-3, "warmup_ratio": 0.0},
        "train": {"max_steps": 4, "micro_batch_size": 2, "grad_accum": 2, "log_every": 1, "save_every": 0, "seed": 0},
        "output": {"dir": str(out)},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return build_recipe(raw)


def pytest_collection_modifyitems(config, items):
    import importlib.util

    import torch

    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA GPU")
    if importlib.util.find_spec("torchvision") is None:
        skips["torchvision"] = pytest.mark.skip(
            reason="transformers builds this processor only with torchvision; README: `python -m pytest -m torchvision`"
        )
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def trained_adapter(tiny_base, tmp_path_factory):
    """(base, adapter dir, data dir): the tiny base after 80 QLoRA steps that teach it the color of square images.

    Images are square and at the vision tower's size, so LLaVA's padding and the plain processor agree.
    """
    from qllava.train.loop import train

    root = tmp_path_factory.mktemp("trained")
    (root / "images").mkdir()
    records = []
    for i in range(12):
        name, rgb = list(COLORS.items())[i % 3]
        write_image(root / "images" / f"{i}.png", rgb, size=(32, 32))
        convs = [{"from": "human", "value": "What color is the shape?\n<image>"}, {"from": "gpt", "value": name}]
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": convs})
    (root / "train.json").write_text(json.dumps(records))
    recipe = make_recipe(
        tiny_base,
        root,
        root / "run",
        optim={"lr": 1e-2, "projector_lr": 1e-2, "schedule": "constant"},
        train={"max_steps": 80, "micro_batch_size": 4, "grad_accum": 1, "log_every": 10},
    )
    return tiny_base, train(recipe), root


@pytest.fixture(scope="session")
def mixed_data(tmp_path_factory):
    """24 samples, every fourth text-only; images of two sizes so that batches pad differently (DDP, FSDP)."""
    # Image sizes alternate so that batches pad differently.
    return write_color_data(tmp_path_factory.mktemp("ddp-data"), 24, sizes=((32, 32), (40, 28)))


def lora_model_with_random_b(recipe, device: str = "cpu"):
    """(model, dataset) for `recipe`: 4-bit + LoRA in train mode, LoRA B drawn at random (it starts at
    zero) so that every LoRA weight gets a gradient in equivalence tests."""
    import torch

    from qllava.data.validate import dataset_from_recipe
    from qllava.model.load import load_for_training, set_train_mode

    model, processor = load_for_training(recipe, torch.device(device))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    set_train_mode(model)
    return model, processor, dataset_from_recipe(recipe, recipe.data.train, processor, model.config)


# --- multi-process runs (tests/train/test_distributed.py, test_fsdp.py) ---


def train_is_refused(base: Path, data_dir: Path, out: Path, **data) -> str:
    """`qllava train` on a minimal recipe (data_dir's train.json and images, `data` keys beside them) refused as a
    user sees it: exit 1, one message, no traceback, no run directory. Its output."""
    import yaml
    from typer.testing import CliRunner

    from qllava.cli import app

    section = {"train": str(data_dir / "train.json"), "image_folder": str(data_dir / "images"), **data}
    recipe = out / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump({"model": {"base": str(base)}, "data": section, "output": {"dir": str(out / "run")}})
    )
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and not (out / "run").exists()
    return result.output


def run_launcher(command: list[str]):
    """Run a launching command (`qllava train --num-processes`, `accelerate launch`) as a user would:
    outside any launched process (no inherited LOCAL_RANK); fail with its stderr."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def run_metrics(run: Path, key: str) -> list:
    """The values of `key` in a run's metrics.jsonl, in order (lines without it skipped)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [line[key] for line in lines if key in line]


def adapter_tensors(run: Path, name: str = "final") -> dict:
    from safetensors.torch import load_file

    return load_file(run / name / "adapter_model.safetensors")


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# --- AnyRes families (LLaVA-NeXT, LLaVA-OneVision) ---


TORCHVISION_KINDS = ("llava_onevision", "qwen2_5_vl", "internvl")
"""Architectures whose transformers processor needs torchvision (its video processor): their tests are marked
`torchvision`, skipped without it and run by `python -m pytest -m torchvision` where it is installed (.ci/run)."""
TINY_BASES = {
    "llava": "tiny_base",
    "llava_next": "tiny_next",
    "llava_onevision": "tiny_onevision",
    "qwen2_5_vl": "tiny_qwen2_5_vl",
    "gemma3": "tiny_gemma3",
    "internvl": "tiny_internvl",
}


def kinds(*names: str) -> list:
    """`model_type`s to parametrize a test over, those of TORCHVISION_KINDS marked `torchvision`."""
    return [pytest.param(name, marks=pytest.mark.torchvision) if name in TORCHVISION_KINDS else name for name in names]


def tiny_of(kind: str, request) -> Path:
    """The session's tiny base of a `model_type`."""
    return request.getfixturevalue(TINY_BASES[kind])


def template_of(kind: str) -> str:
    """The template a test of `kind` trains with: its family's default."""
    from qllava.model.families import family_named

    return family_named(kind).default_template


@pytest.fixture(scope="session")
def tiny_next(tmp_path_factory) -> Path:
    from qllava.model.tiny import build_tiny_llava_next

    return build_tiny_llava_next(tmp_path_factory.mktemp("next") / "model", CORPUS, seed=0)


@pytest.fixture(scope="session")
def tiny_onevision(tmp_path_factory) -> Path:
    from qllava.model.tiny import build_tiny_llava_onevision

    return build_tiny_llava_onevision(tmp_path_factory.mktemp("ov") / "model", CORPUS, seed=0)


# --- relatives of LLaVA (Gemma 3, Qwen2.5-VL, InternVL) ---


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> Path:
    from qllava.model.tiny import build_tiny_gemma3

    return build_tiny_gemma3(tmp_path_factory.mktemp("gemma3") / "model", CORPUS, seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tmp_path_factory) -> Path:
    from qllava.model.tiny import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl") / "model", CORPUS, seed=0)


@pytest.fixture(scope="session")
def tiny_internvl(tmp_path_factory) -> Path:
    from qllava.model.tiny import build_tiny_internvl

    return build_tiny_internvl(tmp_path_factory.mktemp("internvl") / "model", CORPUS, seed=0)


def assert_each_sample_computes_alone(model, items: list[dict], pad_token_id: int, *, packed: bool = True) -> dict:
    """A padded micro-batch of dataset items (and, with `packed`, the packed one) gives every sample the logits it
    gets alone: each image's features land on its own tokens. Returns the padded batch for further checks."""
    import torch

    from qllava.data.dataset import collate
    from qllava.data.packing import collate_packed
    from qllava.model.families import forward_image_inputs

    cpu, dtype = torch.device("cpu"), torch.float32
    batch = collate(items, pad_token_id)
    with torch.no_grad():
        alone = []
        for it in items:
            single = collate([it], pad_token_id)
            inputs = forward_image_inputs(single, cpu, dtype, model.config)
            alone.append(model(input_ids=single["input_ids"], **inputs, use_cache=False).logits[0])
        padded = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            **forward_image_inputs(batch, cpu, dtype, model.config),
            use_cache=False,
        ).logits
        if packed:
            packed_batch = collate_packed(items)
            packed_logits = model(
                input_ids=packed_batch["input_ids"],
                position_ids=packed_batch["position_ids"],
                **forward_image_inputs(packed_batch, cpu, dtype, model.config),
                use_cache=False,
            ).logits[0]
    start = 0
    for row, (it, logits) in enumerate(zip(items, alone)):
        n = len(it["input_ids"])
        torch.testing.assert_close(padded[row, :n], logits, atol=1e-4, rtol=1e-4)
        if packed:
            torch.testing.assert_close(packed_logits[start : start + n], logits, atol=1e-4, rtol=1e-4)
        start += n
    return batch
