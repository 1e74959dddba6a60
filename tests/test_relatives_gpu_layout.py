"""LLaVA-OneVision, Qwen2.5-VL, Gemma 3 and InternVL in the dtypes a CUDA device gets (bf16 base, vision tower,
pixels and clips; fp32 projector; bf16 autocast; 8-bit AdamW), on the CPU under QLLAVA_GPU_LAYOUT=1, as LLaVA-1.5
(test_gpu_layout.py) and LLaVA-NeXT (test_anyres_run.py) are: padded and, where the family allows it, packed batches
with evaluation, a bf16 merge that passes its verification, generation from the export, and two DDP processes."""

import pytest
import torch
from accelerate.utils import FullyShardedDataParallelPlugin
from transformers import AutoConfig, AutoModelForImageTextToText

from qllava.errors import QllavaError
from qllava.export import merge_checkpoint
from qllava.generate import generate_answers, load_for_inference
from qllava.model.families import family_named
from qllava.model.precision import GPU_LAYOUT_ENV
from qllava.recipe import dump_recipe, load_recipe
from qllava.train.fsdp import check
from qllava.train.loop import train
from tests.conftest import (
    adapter_tensors,
    kinds,
    make_recipe,
    run_launcher,
    run_metrics,
    template_of,
    tiny_of,
    write_color_data,
)
from tests.train.test_fsdp import FSDP_CONFIG

KINDS = kinds("llava_onevision", "qwen2_5_vl", "gemma3", "internvl")
SIZES = ((32, 32), (28, 40), (64, 20), (40, 28))


def _recipe(base, data_dir, out, **sections):
    kind = AutoConfig.from_pretrained(base).model_type
    return make_recipe(
        base,
        data_dir,
        out,
        data={"template": template_of(kind), "image_aspect": "resize", **sections.pop("data", {})},
        optim={"name": "auto", "lr": 1e-2, "projector_lr": 1e-2},
        **sections,
    )


@pytest.fixture(scope="module", params=KINDS)
def base_and_data(request, tmp_path_factory):
    """The kind's tiny base and its data: images of several sizes, text-only samples and, for the families that
    take video, clips among them (pixel_values_videos in the vision dtype too)."""
    root = tmp_path_factory.mktemp(f"{request.param}-layout")
    if family_named(request.param).video_text is not None:
        from tests.data.test_video import write_video_data

        return tiny_of(request.param, request), write_video_data(root, 12)
    return tiny_of(request.param, request), write_color_data(root, 12, sizes=SIZES)


def _projector(run, family):
    return {k: v for k, v in adapter_tensors(run).items() if family.part_of(k) in ("projector", "extra")}


def test_the_gpu_layout_trains_evaluates_merges_and_generates(base_and_data, tmp_path, monkeypatch):
    base, data = base_and_data
    family = family_named(AutoConfig.from_pretrained(base).model_type)
    monkeypatch.setenv(GPU_LAYOUT_ENV, "1")
    for packing in (False, True) if family.packing else (False,):
        run = tmp_path / f"packing-{packing}"
        recipe = _recipe(
            base,
            data,
            run,
            data={"eval": str(data / "train.json"), "packing": packing},
            train={"max_steps": 4, "eval_every": 2},
        )
        final = train(recipe, progress=False)
        losses, evals = run_metrics(run, "loss"), run_metrics(run, "eval_loss")
        assert all(torch.isfinite(torch.tensor(losses + evals))) and evals[-1] < evals[0], (losses, evals)
        trained = _projector(run, family)
        assert trained and all(v.dtype == torch.float32 for v in trained.values())
    report = merge_checkpoint(final, tmp_path / "merged", dtype="bf16", verify_samples=6)
    assert report.verified and report.passed, report.summary()
    model, processor = load_for_inference(tmp_path / "merged", None)
    assert next(model.parameters()).dtype == torch.bfloat16
    recipe = load_recipe(final / "recipe.yaml")
    questions = [("1.png", "What color?"), (None, "Say a color.")]
    answers = generate_answers(model, processor, recipe, questions, image_folder=data / "images")
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_in_the_gpu_layout(parallel, base_and_data, tmp_path, monkeypatch):
    """Two gloo processes, each with its own images (Qwen2.5-VL's patch blocks and OneVision's tile stacks of
    different sizes per rank): the projector trains and is saved. FSDP cannot keep OneVision's bare image_newline
    out of its sharded root unit: refused up front."""
    base, data = base_and_data
    family = family_named(AutoConfig.from_pretrained(base).model_type)
    monkeypatch.setenv(GPU_LAYOUT_ENV, "1")
    recipe = _recipe(base, data, tmp_path / "run", train={"max_steps": 3, "save_every": 3})
    if parallel == "fsdp" and family.extra_trainable:
        with pytest.raises(QllavaError, match=f"`{family.model_type}` bases train model.image_newline .* use DDP"):
            check(FullyShardedDataParallelPlugin(fsdp_version=1), recipe)
        return
    dump_recipe(recipe, tmp_path / "recipe.yaml")
    config = ["--accelerate-config", str(FSDP_CONFIG)] if parallel == "fsdp" else []
    done = run_launcher(["qllava", "train", str(tmp_path / "recipe.yaml"), "--num-processes", "2", *config])
    assert "bfloat16 base, mixed precision bf16" in done.stdout + done.stderr
    assert all(torch.isfinite(torch.tensor(run_metrics(tmp_path / "run", "loss"))))
    initial = AutoModelForImageTextToText.from_pretrained(base).state_dict()
    trained = _projector(tmp_path / "run", family)
    assert trained
    for key, value in trained.items():
        assert not torch.equal(value.float(), initial[key.removeprefix("base_model.model.")].float()), key
