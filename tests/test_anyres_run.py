"""A LLaVA-NeXT run end to end on the tiny model: resume is exact (image_newline included), the merge passes its
verification, the export loads with plain transformers, and generation runs on AnyRes images. The first three tests
run a LLaVA-OneVision too, in the torchvision tier (its processor needs torchvision)."""

import json

import pytest
import torch
from accelerate.utils import FullyShardedDataParallelPlugin
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

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
    max_abs_diff,
    run_launcher,
    run_metrics,
    template_of,
    tiny_of,
    write_color_data,
)
from tests.test_inference import check_answer_and_chat

NEWLINE = "base_model.model.model.image_newline"


def _recipe(base, data, out, resume=""):
    return make_recipe(
        base,
        data,
        out,
        data={"template": template_of(AutoConfig.from_pretrained(base).model_type)},
        lora={"dropout": 0.1},
        optim={"lr": 1e-2, "projector_lr": 1e-2},
        train={"max_steps": 6, "save_every": 3, "keep_last": 5, "log_every": 2, "resume": resume},
    )


def _run(base, root):
    data = write_color_data(root, 12, sizes=((32, 32), (64, 32), (40, 28), (20, 60)))
    straight = root / "straight"
    train(_recipe(base, data, straight), progress=False)
    return base, data, straight


@pytest.fixture(scope="module")
def next_run(tiny_next, tmp_path_factory):
    return _run(tiny_next, tmp_path_factory.mktemp("next-run"))


@pytest.fixture(scope="module", params=kinds("llava_next", "llava_onevision"))
def anyres_run(request, tmp_path_factory):
    """`next_run`, and the same run of the tiny LLaVA-OneVision."""
    if request.param == "llava_next":
        return request.getfixturevalue("next_run")
    return _run(tiny_of(request.param, request), tmp_path_factory.mktemp(f"{request.param}-run"))


def test_resume_reproduces_the_uninterrupted_run(anyres_run, tmp_path):
    base, data, straight = anyres_run
    resumed = tmp_path / "resumed"
    train(_recipe(base, data, resumed, resume=str(straight / "checkpoint-3")), progress=False)
    a, b = adapter_tensors(straight), adapter_tensors(resumed)
    assert NEWLINE in a
    assert max_abs_diff(a, b) == 0.0
    # image_newline moved during the run: the checkpoint at step 3 and the final one differ in it.
    assert not torch.equal(adapter_tensors(straight, "checkpoint-3")[NEWLINE], a[NEWLINE])

    def lines(run):
        return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in (run / "metrics.jsonl").open()]

    assert lines(resumed) == lines(straight)[1:]


def test_merge_verifies_and_the_export_loads_with_plain_transformers(anyres_run, tmp_path):
    base, _, straight = anyres_run
    family = family_named(AutoConfig.from_pretrained(base).model_type)
    report = merge_checkpoint(straight / "final", tmp_path / "merged", dtype="fp32", verify_samples=6)
    assert report.verified and report.passed, report.summary()
    assert report.reply_positions > 0
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__ == family.class_name
    trained = adapter_tensors(straight)[NEWLINE]
    torch.testing.assert_close(merged.model.image_newline.float(), trained.float())
    processor = AutoProcessor.from_pretrained(tmp_path / "merged")
    assert type(processor).__name__ == family.class_name.replace("ForConditionalGeneration", "Processor")


def test_generation_runs_on_anyres_images(anyres_run):
    _, data, straight = anyres_run
    recipe = load_recipe(straight / "final" / "recipe.yaml")
    model, processor = load_for_inference(recipe.model.base, straight / "final")
    questions = [("0.png", "What color is the shape?"), ("1.png", "What color is the shape?"), (None, "Say a color.")]
    answers = generate_answers(model, processor, recipe, questions, image_folder=data / "images")
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_the_gpu_layout_trains_packs_evaluates_merges_and_generates(next_run, tmp_path, monkeypatch):
    """NeXT in the dtypes a CUDA device gets (bf16 base, tiles and vision tower; fp32 projector and image_newline;
    bf16 autocast; 8-bit AdamW): packed and padded batches with evaluation, a bf16 merge that passes its
    verification, and generation from the merged export."""
    base, data, _ = next_run
    monkeypatch.setenv(GPU_LAYOUT_ENV, "1")
    for packing in (False, True):
        run = tmp_path / f"packing-{packing}"
        recipe = make_recipe(
            base,
            data,
            run,
            optim={"name": "auto", "lr": 1e-2, "projector_lr": 1e-2},
            data={"eval": str(data / "train.json"), "packing": packing},
            train={"max_steps": 4, "eval_every": 2},
        )
        final = train(recipe, progress=False)
        losses, evals = run_metrics(run, "loss"), run_metrics(run, "eval_loss")
        assert all(torch.isfinite(torch.tensor(losses + evals))) and evals[-1] < evals[0], (losses, evals)
        assert adapter_tensors(run)[NEWLINE].dtype == torch.float32
    report = merge_checkpoint(final, tmp_path / "merged", dtype="bf16", verify_samples=6)
    assert report.verified and report.passed, report.summary()
    model, processor = load_for_inference(tmp_path / "merged", None)
    assert model.model.image_newline.dtype == torch.bfloat16
    recipe = load_recipe(final / "recipe.yaml")
    answers = generate_answers(model, processor, recipe, [("1.png", "What color?")], image_folder=data / "images")
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_ddp_in_the_gpu_layout_and_fsdp_refused(next_run, tmp_path, monkeypatch):
    """Two gloo processes over AnyRes batches (tile stacks of different counts per rank) with image_newline trained
    beside the projector. FSDP cannot keep that bare parameter out of its sharded root unit: refused up front."""
    base, data, _ = next_run
    monkeypatch.setenv(GPU_LAYOUT_ENV, "1")
    recipe = make_recipe(
        base,
        data,
        tmp_path / "run",
        optim={"name": "auto", "lr": 1e-2, "projector_lr": 1e-2},
        train={"max_steps": 3, "save_every": 3},
    )
    with pytest.raises(QllavaError, match="`llava_next` bases train model.image_newline .* use DDP"):
        check(FullyShardedDataParallelPlugin(fsdp_version=1), recipe)
    dump_recipe(recipe, tmp_path / "recipe.yaml")
    run_launcher(["qllava", "train", str(tmp_path / "recipe.yaml"), "--num-processes", "2"])
    assert all(torch.isfinite(torch.tensor(run_metrics(tmp_path / "run", "loss"))))
    initial = load_file(base / "model.safetensors")
    newline = next(v for k, v in initial.items() if k.endswith("image_newline"))
    trained = adapter_tensors(tmp_path / "run")[NEWLINE]
    assert not torch.equal(trained.float(), newline.float())  # it trained, and was saved


def test_an_adapter_of_one_architecture_is_refused_on_another(next_run, tiny_base):
    _, _, straight = next_run
    with pytest.raises(QllavaError, match=r"\(llava_next, .*\(llava, "):
        load_for_inference(tiny_base, straight / "final")


def test_answer_and_chat_commands_on_the_trained_adapter(anyres_run, tmp_path):
    base, data, straight = anyres_run
    check_answer_and_chat(base, straight / "final", data / "images", tmp_path)
