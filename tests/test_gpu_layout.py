"""The GPU-layout tier: the real paths on a CPU with the dtypes a CUDA device gets.

`QLLAVA_GPU_LAYOUT=1` makes `qllava.model.precision.precision_for`, the one function that picks dtypes on
CUDA, take the GPU decision on this CPU: bf16 base and unquantized modules, bf16 4-bit compute, fp32
trainables, accelerate bf16 autocast, 8-bit AdamW (bitsandbytes runs it unpaged on a CPU). A dtype
mismatch that would crash every GPU run fails here first; the default training run did exactly that
(the chunked loss's fp32 hidden states met the bf16 lm_head).

Not covered on a CPU: paging of the 8-bit optimizer states, flash-attention, CUDA kernels of
bitsandbytes and fp16 (accelerate ignores fp16 on a CPU: no autocast, no loss scaler): tests/test_gpu.py.
"""

from __future__ import annotations

import json
import shutil

import bitsandbytes as bnb
import pytest
import torch

from qllava.errors import QllavaError
from qllava.export import _reply_mask, _text_logits, _verification_inputs, compare_logits, merge_checkpoint
from qllava.generate import generate_answers, inference_recipe, load_for_inference
from qllava.model.load import load_for_training
from qllava.model.precision import GPU_LAYOUT_ENV, precision_for
from qllava.recipe import dump_recipe
from qllava.train.loop import make_accelerator, train
from qllava.train.optim import resolve_optimizer
from tests.conftest import make_recipe, run_launcher, run_metrics
from tests.train.test_fsdp import FSDP_CONFIG

CPU = torch.device("cpu")


@pytest.fixture()
def gpu_layout(monkeypatch):
    monkeypatch.setenv(GPU_LAYOUT_ENV, "1")


def _losses(run) -> list[float]:
    return run_metrics(run, "loss")


def test_the_layout_is_the_cuda_decision(gpu_layout, tiny_base, tiny_data, tmp_path):
    assert precision_for(CPU).dtype == torch.bfloat16 and precision_for(CPU).mixed_precision == "bf16"
    assert precision_for(CPU, "no").dtype == torch.float32 and precision_for(CPU, "no").mixed_precision == "no"
    assert resolve_optimizer("auto", CPU) == "paged_adamw_8bit"
    model, _ = load_for_training(make_recipe(tiny_base, tiny_data, tmp_path / "o"), CPU)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and all(m.compute_dtype == torch.bfloat16 for m in four_bit)
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad and p.dtype.is_floating_point}
    assert frozen and set(frozen.values()) == {torch.bfloat16}, frozen
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_without_the_layout_a_cpu_stays_fp32(monkeypatch):
    monkeypatch.delenv(GPU_LAYOUT_ENV, raising=False)
    assert precision_for(CPU).dtype == torch.float32 and precision_for(CPU).mixed_precision == "no"
    assert resolve_optimizer("auto", CPU) == "adamw"


# (loss_chunk_size, packing): the default chunked loss, the full logits, and padding-free packing.
VARIANTS = {"chunked": (1024, False), "full_logits": (0, False), "packed": (1024, True)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_stage2_trains_with_eval_in_the_gpu_layout(variant, tiny_base, tiny_data, tmp_path, monkeypatch):
    """bf16 runs the same maths as fp32: the first step (before any update) agrees to bf16 rounding,
    and both runs learn."""
    chunk, packing = VARIANTS[variant]
    runs = {}
    for layout in ("fp32", "gpu"):
        if layout == "gpu":
            monkeypatch.setenv(GPU_LAYOUT_ENV, "1")
        recipe = make_recipe(
            tiny_base,
            tiny_data,
            tmp_path / layout,
            optim={"name": "auto", "lr": 5e-3, "projector_lr": 5e-3},
            data={"eval": str(tiny_data / "train.json"), "packing": packing},
            train={"max_steps": 6, "loss_chunk_size": chunk, "eval_every": 3},
        )
        train(recipe, progress=False)
        runs[layout] = tmp_path / layout
    fp32, gpu = _losses(runs["fp32"]), _losses(runs["gpu"])
    assert gpu[0] == pytest.approx(fp32[0], rel=0.02)
    evals = run_metrics(runs["gpu"], "eval_loss")
    assert len(evals) == 2 and all(torch.isfinite(torch.tensor(evals)))  # steps 3 and 6, the last not repeated
    assert evals[0] == pytest.approx(run_metrics(runs["fp32"], "eval_loss")[0], rel=0.03)
    assert evals[-1] < evals[0]
    assert (runs["gpu"] / "final" / "adapter_model.safetensors").is_file()


def test_stage1_trains_in_the_gpu_layout(gpu_layout, tiny_base, tiny_data, tmp_path):
    recipe = make_recipe(
        tiny_base,
        tiny_data,
        tmp_path / "run",
        lora={"enabled": False},
        data={"template": "plain", "train": str(tiny_data / "captions.json")},
        optim={"name": "auto", "lr": 1e-2, "projector_lr": 1e-2},
        train={"max_steps": 4},
    )
    records = json.loads((tiny_data / "train.json").read_text())
    captions = [
        {"id": r["id"], "image": r["image"], "conversations": [r["conversations"][0], r["conversations"][1]]}
        for r in records
        if "image" in r
    ]
    (tiny_data / "captions.json").write_text(json.dumps(captions))
    final = train(recipe, progress=False)
    losses = _losses(tmp_path / "run")
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert (final / "projector.safetensors").is_file()


def test_mixed_precision_no_trains_on_an_fp32_base_in_the_gpu_layout(gpu_layout, tiny_base, tiny_data, tmp_path):
    """Without autocast a bf16 vision tower would meet the fp32 trained projector: the base is fp32."""
    recipe = make_recipe(tiny_base, tiny_data, tmp_path / "run", train={"max_steps": 2, "mixed_precision": "no"})
    model, _ = load_for_training(recipe, CPU)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.dtype.is_floating_point)
    del model
    final = train(recipe, progress=False)
    assert all(torch.isfinite(torch.tensor(_losses(tmp_path / "run"))))
    # chat/answer/merge run the adapter on the base as it was trained: fp32, no autocast
    model, _ = load_for_inference(tiny_base, final)
    assert model.get_input_embeddings().weight.dtype == torch.float32


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_in_the_gpu_layout(parallel, tiny_base, mixed_data, tmp_path, monkeypatch):
    monkeypatch.setenv(GPU_LAYOUT_ENV, "1")
    records = json.loads((mixed_data / "train.json").read_text())
    (tmp_path / "eval.json").write_text(json.dumps(records[:5]))  # a text-only sample among them
    recipe = make_recipe(
        tiny_base,
        mixed_data,
        tmp_path / "run",
        optim={"name": "auto"},
        data={"eval": str(tmp_path / "eval.json")},
        train={"max_steps": 3, "eval_every": 3},
    )
    dump_recipe(recipe, tmp_path / "recipe.yaml")
    config = ["--accelerate-config", str(FSDP_CONFIG)] if parallel == "fsdp" else []
    done = run_launcher(["qllava", "train", str(tmp_path / "recipe.yaml"), "--num-processes", "2", *config])
    assert "bfloat16 base, mixed precision bf16" in done.stdout + done.stderr
    losses = _losses(tmp_path / "run") + run_metrics(tmp_path / "run", "eval_loss")
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))  # 3 steps, 1 evaluation at the last


def test_resume_is_exact_with_8bit_optimizer_states(gpu_layout, tiny_base, tiny_data, tmp_path):
    """The 8-bit AdamW a GPU run uses saves and restores its states (quantized moments, absmax)."""

    def recipe(out, **train_keys):
        return make_recipe(
            tiny_base, tiny_data, out, optim={"name": "auto"}, train={"max_steps": 4, "save_every": 2, **train_keys}
        )

    train(recipe(tmp_path / "straight"), progress=False)
    # Another run directory holding only the straight run's step-2 checkpoint, resumed to the end.
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    train(recipe(tmp_path / "resumed", resume="auto"), progress=False)
    assert _losses(tmp_path / "resumed") == pytest.approx(_losses(tmp_path / "straight")[2:], rel=1e-5)


def test_merge_and_generation_in_the_gpu_layout(trained_adapter, tmp_path, monkeypatch):
    """The adapter trained in fp32 (conftest) computes on the bf16 base what it computes in fp32, merges with a
    passing verification, and generates.

    Compared as distributions over the training prompts, not as answers: this CPU-trained model has near-ties
    (on some CPUs "red" and "</s>" within 0.02) that bf16 rounding flips, while a dtype bug moves everything.
    """
    base, adapter, data = trained_adapter
    monkeypatch.delenv(GPU_LAYOUT_ENV, raising=False)
    model, processor = load_for_inference(base, adapter)
    recipe = inference_recipe(base, adapter, processor)
    _, _, prompts = _verification_inputs(recipe, processor, model.config, 12)
    image_token = model.config.image_token_id
    fp32 = _text_logits(model, prompts, image_token)

    monkeypatch.setenv(GPU_LAYOUT_ENV, "1")
    model, processor = load_for_inference(base, adapter)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    stats = compare_logits(fp32, _text_logits(model, prompts, image_token), _reply_mask(prompts, image_token))
    assert stats["mean_kl"] < 1e-3, stats  # measured 1.2e-6 (bf16 rounding), max |logit diff| 0.04

    report = merge_checkpoint(adapter, tmp_path / "merged", dtype="bf16")
    assert report.verified and report.passed, report
    questions = [(f"{i}.png", "What color is the shape?") for i in range(12)]
    for path, adapter_dir in ((base, adapter), (tmp_path / "merged", None)):
        model, processor = load_for_inference(path, adapter_dir)
        recipe = inference_recipe(path, adapter_dir, processor)
        answers = generate_answers(model, processor, recipe, questions, image_folder=data / "images")
        assert len(answers) == 12 and set(answers) <= {"red", "green", "blue", ""}, answers


def test_fp16_is_refused_off_cuda(tiny_base, tiny_data, tmp_path, monkeypatch):
    """accelerate runs no fp16 autocast or loss scaling on a CPU: fp16 would silently train in fp32. An adapter
    trained in fp16 on a GPU still loads on a CPU (chat, answer, merge), on fp32 weights."""
    recipe = make_recipe(tiny_base, tiny_data, tmp_path / "run", train={"mixed_precision": "fp16"})
    for layout in ("0", "1"):
        monkeypatch.setenv(GPU_LAYOUT_ENV, layout)
        with pytest.raises(QllavaError, match="fp16 needs a CUDA GPU"):
            make_accelerator(recipe, tmp_path / "run")
    monkeypatch.setenv(GPU_LAYOUT_ENV, "0")
    assert precision_for(CPU, "fp16").dtype == torch.float32
