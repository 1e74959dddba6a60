"""CUDA-only paths: bf16 compute, paged 8-bit AdamW, autocast in evaluation, packing on flash-attention.
Skipped without a GPU; tests/test_gpu_layout.py runs the same dtypes on a CPU."""

import importlib.util
import json

import bitsandbytes as bnb
import pytest
import torch

from qllava.data.dataset import collate
from qllava.data.packing import collate_packed
from qllava.model.load import load_for_training, resolve_attention
from qllava.model.precision import autocast_for
from qllava.train.loop import _forward_loss, train
from tests.conftest import lora_model_with_random_b, make_recipe

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


ATTENTIONS = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_gpu_packed_loss_equals_padded(tiny_base, tiny_data, tmp_path, attention):
    """With flash-attention a packed row runs as varlen sequences cut at the position_ids resets
    (transformers' padding-free path); only position_ids reach the language model, never the vision
    tower (NOTES: varlen kwargs passed to LlavaModel.forward reach it too)."""
    recipe = make_recipe(tiny_base, tiny_data, tmp_path / "run", model={"attention": attention})
    model, processor, dataset = lora_model_with_random_b(recipe, "cuda")
    items = [dataset[i] for i in (0, 3, 1, 7)]
    pad_id = processor.tokenizer.pad_token_id
    losses = {}
    for name, batch in (("packed", collate_packed(items, pad_id)), ("padded", collate(items, pad_id))):
        # The autocast the training forward gets from accelerate: that of the bf16 base.
        with autocast_for(model):
            losses[name] = _forward_loss(model, batch, torch.device("cuda"), torch.bfloat16, 1024).float()
    torch.testing.assert_close(losses["packed"], losses["padded"], rtol=2e-2, atol=0)


def test_gpu_fp16_trains_and_resumes_with_its_loss_scale(tiny_base, tiny_data, tmp_path):
    """fp16 (GPUs without bf16): fp16 base, fp16 autocast and accelerate's loss scaler, saved in checkpoints."""
    recipe = make_recipe(
        tiny_base, tiny_data, tmp_path / "run", train={"max_steps": 4, "save_every": 2, "mixed_precision": "fp16"}
    )
    train(recipe, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(x["loss"] is not None and torch.isfinite(torch.tensor(x["loss"])) for x in lines)
    assert (tmp_path / "run" / "checkpoint-2" / "scaler.json").is_file()
