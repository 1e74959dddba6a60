"""A new LLaVA end to end: compose (SigLIP + Qwen2; LLaVA-1.5 and LLaVA-NeXT) -> stage 1 -> stage 2 -> merge ->
plain transformers."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from qllava.export import merge_checkpoint
from qllava.model.compose import compose_llava
from qllava.model.projector import PROJECTOR_FILE
from qllava.model.tiny import build_tiny_llm, build_tiny_vision
from qllava.train.loop import train
from tests.conftest import COLORS, make_recipe, write_image

pytestmark = pytest.mark.recipe

CORPUS = ["What color is the shape?", "a red square", "a green square", "a blue square", "red green blue"]


# (width, height) of the images: one square size, or (for NeXT's tiles) square, wide and tall ones.
SQUARE, MIXED = [(32, 32)], [(32, 32), (64, 32), (32, 64), (48, 40)]


def _data(root, captions: bool, sizes=SQUARE):
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(16):
        name, rgb = list(COLORS.items())[i % 3]
        write_image(root / "images" / f"{i}.png", rgb, size=sizes[i % len(sizes)])
        if captions:  # LLaVA's stage-1 format: the image, then its caption
            convs = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"a {name} square"}]
        else:
            convs = [{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": name}]
        records.append({"id": f"{i}", "image": f"{i}.png", "conversations": convs})
    (root / "train.json").write_text(json.dumps(records))
    return root


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_composed_model_trains_in_two_stages_and_merges(arch, tmp_path, capsys):
    vision = build_tiny_vision(tmp_path / "siglip", "siglip")
    llm = build_tiny_llm(tmp_path / "qwen2", "qwen2", CORPUS)
    base = compose_llava(vision, llm, tmp_path / "composed", arch=arch)  # template chatml, strategy full
    composed = load_file(base / "model.safetensors")
    sizes = MIXED if arch == "llava_next" else SQUARE

    stage1_run = tmp_path / "stage1"
    stage1 = make_recipe(
        base,
        _data(tmp_path / "captions", captions=True, sizes=sizes),
        stage1_run,
        lora={"enabled": False},
        data={"template": "plain"},
        optim={"projector_lr": 1e-2},
        train={"max_steps": 12, "micro_batch_size": 8, "grad_accum": 1},
    )
    stage1_final = train(stage1, progress=False)
    assert _losses(stage1_run)[-1] < 0.9 * _losses(stage1_run)[0]  # measured 6.43 -> 5.33 (random LLM)
    projector = load_file(stage1_final / PROJECTOR_FILE)
    # Stage 1 moved the projector and nothing else (its file is all it writes).
    key = "multi_modal_projector.linear_1.weight"
    assert not torch.equal(projector[key], composed[key])

    stage2_run = tmp_path / "stage2"
    stage2 = make_recipe(
        base,
        _data(tmp_path / "qa", captions=False, sizes=sizes),
        stage2_run,
        model={"projector_from": str(stage1_final)},
        data={"template": "chatml"},
        optim={"lr": 1e-2, "projector_lr": 1e-3},
        train={"max_steps": 12, "micro_batch_size": 8, "grad_accum": 1},
    )
    stage2_final = train(stage2, progress=False)
    assert _losses(stage2_run)[-1] < _losses(stage2_run)[0]
    assert "warning" not in capsys.readouterr().out
    # The template the base was composed for is checked against the recipe's.
    wrong = make_recipe(base, tmp_path / "qa", tmp_path / "wrong", data={"template": "vicuna_v1"})
    train(dataclasses.replace(wrong, train=dataclasses.replace(wrong.train, max_steps=1)), progress=False)
    assert "the base's chat template is qllava's `chatml`, but data.template is `vicuna_v1`" in capsys.readouterr().out

    merged = tmp_path / "merged"
    report = merge_checkpoint(stage2_final, merged, dtype="fp32", device="cpu")
    assert report.passed and report.top1_agreement == 1.0 and report.max_abs_logit_diff < 1e-3

    model = AutoModelForImageTextToText.from_pretrained(merged)
    processor = AutoProcessor.from_pretrained(merged)
    assert model.config.model_type == arch
    assert model.config.vision_feature_select_strategy == "full" and model.config.tie_word_embeddings
    adapter = load_file(stage2_final / "adapter_model.safetensors")
    trained = next(v for k, v in adapter.items() if k.endswith("multi_modal_projector.linear_1.weight"))
    assert torch.equal(model.model.multi_modal_projector.linear_1.weight, trained)
    if arch == "llava_next":
        # Stage 1 aligns the projector alone (as LLaVA-1.6 reused LLaVA-1.5's stage-1 projector): the row separator
        # keeps its composed value there and trains in stage 2, whose adapter file carries it into the merge.
        assert sorted(projector) == sorted(k for k in composed if k.startswith("multi_modal_projector."))
        newline = next(v for k, v in adapter.items() if k.endswith("image_newline"))
        assert not torch.equal(newline, next(v for k, v in composed.items() if k.endswith("image_newline")))
        assert torch.equal(model.model.image_newline, newline)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]}],
        add_generation_prompt=True,
    )
    assert text.count("<image>") == 1 and "<|im_start|>assistant\n" in text


def test_the_two_stage_demo_prints_where_its_composed_model_stays(tmp_path, monkeypatch, capsys):
    """`qllava demo --two-stage` builds its composed model once; compose's summary names the directory it stays in."""
    from qllava.demo import cache_dir, materialize, materialize_two_stage

    demo = materialize()
    monkeypatch.setenv("QLLAVA_CACHE", str(tmp_path))
    fresh = cache_dir()  # the demo's data and base, without the two-stage assets
    fresh.mkdir()
    for name in ("COMPLETE", "tiny-llava", "pretrain.json", "images"):
        (fresh / name).symlink_to(demo / name)
    capsys.readouterr()
    target = materialize_two_stage()
    out = capsys.readouterr().out
    assert f"written to {target / 'composed'}\n" in out and ".tmp" not in out
    assert (target / "COMPLETE").is_file() and (target / "composed" / "config.json").is_file()
