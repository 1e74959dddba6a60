"""CUDA-only paths: bf16 compute, paged 8-bit AdamW, autocast in evaluation. Skipped without a GPU."""

import json

import bitsandbytes as bnb
import pytest
import torch

from qllava.model.load import load_for_training, resolve_attention
from qllava.train.loop import train
from tests.conftest import make_recipe

pytestmark = pytest.mark.gpu


def test_gpu_load_puts_frozen_parts_in_bf16_and_trainables_in_fp32(tiny_base, tmp_path):
    model, _ = load_for_training(make_recipe(tiny_base, tmp_path, tmp_path / "o"), torch.device("cuda"))
    assert all(m.compute_dtype == torch.bfloat16 for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    vision = [p for n, p in model.named_parameters() if "vision_tower" in n]
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cuda" for p in vision)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert resolve_attention("auto", torch.device("cuda")) in ("flash_attention_2", "sdpa")


def test_gpu_training_with_paged_optimizer_and_eval(tiny_base, tiny_data, tmp_path):
    recipe = make_recipe(
        tiny_base,
        tiny_data,
        tmp_path / "run",
        optim={"name": "auto"},
        data={"eval": str(tiny_data / "train.json")},
        train={"max_steps": 3},
    )
    final = train(recipe, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(x.get("loss", x.get("eval_loss")))) for x in lines)
    assert any("eval_loss" in x for x in lines)
    assert (final / "adapter_model.safetensors").is_file()
