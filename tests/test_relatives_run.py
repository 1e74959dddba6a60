"""Relatives of LLaVA on tiny models built from transformers' own config classes: qllava's encoded samples equal
the model's own processor (ids, pixels, the extra forward inputs), the forward takes qllava's batches, and a short
QLoRA run lowers the loss, resumes exactly, merges with a passing verification and exports a model that plain
transformers loads."""

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from qllava.data.dataset import collate
from qllava.data.templates import render
from qllava.data.validate import datasets_from_recipe
from qllava.errors import QllavaError
from qllava.export import merge_checkpoint
from qllava.model.families import family_of, forward_image_inputs
from qllava.model.load import load_processor
from qllava.train.loop import train
from tests.conftest import adapter_tensors, make_recipe, max_abs_diff, run_metrics, write_color_data

# kind -> (fixture, template, what the model's processor takes where qllava's data has `<image>`)
RELATIVES = {"gemma3": ("tiny_gemma3", "gemma", "<start_of_image>")}
SIZES = ((32, 32), (28, 40), (64, 20), (100, 300))


def _base(kind, request):
    return request.getfixturevalue(RELATIVES[kind][0])


def _recipe(kind, base, data_dir, out, **sections):
    data = {"template": RELATIVES[kind][1], "image_aspect": "resize", **sections.pop("data", {})}
    return make_recipe(base, data_dir, out, data=data, **sections)


@pytest.mark.parametrize("kind", sorted(RELATIVES))
def test_encoded_sample_equals_the_hf_processor(kind, request, tmp_path):
    """Token ids, pixel_values and the forward's extra inputs of qllava's items equal what the model's own processor
    gives for the same rendered text and image (`resize`: the processor stretches the image, too)."""
    base = _base(kind, request)
    data = write_color_data(tmp_path, 8, sizes=SIZES)
    recipe = _recipe(kind, base, data, tmp_path / "out")
    processor = load_processor(base)
    model_config = AutoModelForImageTextToText.from_pretrained(base).config
    family = family_of(model_config)
    train_set, _ = datasets_from_recipe(recipe, processor, model_config, warn=lambda _: None)
    hf = AutoProcessor.from_pretrained(base)
    tag = RELATIVES[kind][2]
    checked = 0
    for i, sample in enumerate(train_set.samples):
        item = train_set[i]
        turns = [(role, text.replace("<image>", tag)) for role, text in sample.turns]
        text = render(turns, recipe.data.template, tokenizer=processor.tokenizer).text
        if sample.image is None:
            theirs = hf(text=text, return_tensors="pt")
            assert item["input_ids"] == theirs["input_ids"][0].tolist(), sample.id
            continue
        with Image.open(data / "images" / sample.image) as img:
            theirs = hf(images=img.convert("RGB"), text=text, return_tensors="pt")
        assert item["input_ids"] == theirs["input_ids"][0].tolist(), sample.id
        torch.testing.assert_close(item["pixel_values"], theirs["pixel_values"][0])
        batch = collate([item], processor.tokenizer.pad_token_id)
        ours = forward_image_inputs(batch, torch.device("cpu"), torch.float32, model_config)
        if family.token_types:
            hf_key = "token_type_ids" if "token_type_ids" in theirs else "mm_token_type_ids"
            assert torch.equal(ours[family.token_types], theirs[hf_key]), sample.id
            assert ours[family.token_types].sum() > 0
        checked += 1
    assert checked == 6


@pytest.mark.parametrize("kind", sorted(RELATIVES))
def test_forward_accepts_batches(kind, request, tmp_path):
    """A padded batch of images of several sizes and a text-only sample gives every sample the logits it gets
    alone (the extra inputs land on each sample's own image tokens)."""
    base = _base(kind, request)
    data = write_color_data(tmp_path, 4, sizes=SIZES)
    recipe = _recipe(kind, base, data, tmp_path / "out")
    processor = load_processor(base)
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32).eval()
    family = family_of(model.config)
    train_set, _ = datasets_from_recipe(recipe, processor, model.config, warn=lambda _: None)
    items = [train_set[i] for i in range(4)]
    assert any(it["pixel_values"] is None for it in items)
    cpu, dtype = torch.device("cpu"), torch.float32
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        alone = []
        for it in items:
            single = collate([it], pad)
            inputs = forward_image_inputs(single, cpu, dtype, model.config)
            alone.append(model(input_ids=single["input_ids"], **inputs, use_cache=False).logits[0])
        batch = collate(items, pad)
        padded = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            **forward_image_inputs(batch, cpu, dtype, model.config),
            use_cache=False,
        ).logits
    for row, (it, logits) in enumerate(zip(items, alone)):
        torch.testing.assert_close(padded[row, : len(it["input_ids"])], logits, atol=1e-4, rtol=1e-4)
    assert not family.packing  # none of these takes 1-D packing: test_packing_is_refused covers them


@pytest.mark.parametrize("kind", sorted(RELATIVES))
def test_packing_is_refused_at_start_up(kind, request, tmp_path):
    """data.packing with a base whose packed samples would see each other (Gemma 3's image-block mask) or get
    wrong positions (M-RoPE) is refused before any model is loaded, naming the key."""
    base = _base(kind, request)
    data = write_color_data(tmp_path, 4)
    recipe = _recipe(kind, base, data, tmp_path / "out", data={"packing": True})
    with pytest.raises(QllavaError, match=f"data.packing=true cannot train `{kind}` models.*set data.packing=false"):
        train(recipe, progress=False)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def _run_recipe(kind, base, data, out):
    return _recipe(
        kind,
        base,
        data,
        out,
        lora={"dropout": 0.1},
        optim={"lr": 1e-2, "projector_lr": 1e-2, "schedule": "constant"},
        train={"max_steps": 8, "micro_batch_size": 4, "grad_accum": 1, "save_every": 4, "log_every": 1},
    )


@pytest.fixture(scope="module", params=sorted(RELATIVES))
def relative_run(request, tmp_path_factory):
    """(kind, base, data, run dir) of an 8-step QLoRA run, checkpoints at steps 4 and 8."""
    kind = request.param
    base = _base(kind, request)
    root = tmp_path_factory.mktemp(f"{kind}-run")
    data = write_color_data(root, 12, sizes=SIZES)
    straight = root / "straight"
    train(_run_recipe(kind, base, data, straight), progress=False)
    return kind, base, data, straight


def test_a_few_steps_lower_the_loss_and_train_the_projector(relative_run):
    kind, base, _, run = relative_run
    losses = run_metrics(run, "loss")
    assert len(losses) == 8 and None not in losses
    assert sum(losses[-3:]) < 0.85 * sum(losses[:3]), losses
    family = family_of(AutoModelForImageTextToText.from_pretrained(base).config)
    trained = {k: v for k, v in adapter_tensors(run).items() if family.part_of(k) == "projector"}
    untrained = AutoModelForImageTextToText.from_pretrained(base).state_dict()
    assert trained and all(
        (v - untrained[k.removeprefix("base_model.model.")]).abs().max() > 1e-4 for k, v in trained.items()
    )


def test_resume_reproduces_the_uninterrupted_run(relative_run, tmp_path):
    kind, base, data, straight = relative_run
    resumed = tmp_path / "resumed"
    recipe = _run_recipe(kind, base, data, resumed)
    recipe.train.resume = str(straight / "checkpoint-4")
    train(recipe, progress=False)
    assert max_abs_diff(adapter_tensors(straight), adapter_tensors(resumed)) == 0.0

    def lines(run):
        return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in (run / "metrics.jsonl").open()]

    assert lines(resumed) == lines(straight)[4:]


def test_merge_verifies_and_the_export_loads_with_plain_transformers(relative_run, tmp_path):
    kind, base, _, run = relative_run
    report = merge_checkpoint(run / "final", tmp_path / "merged", dtype="fp32", verify_samples=6)
    assert report.verified and report.passed, report.summary()
    assert report.reply_positions > 0
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    family = family_of(merged.config)
    assert family.model_type == kind and type(merged).__name__ == family.class_name
    projector = {k: v for k, v in adapter_tensors(run).items() if family.part_of(k) == "projector"}
    state = merged.state_dict()
    for key, value in projector.items():
        torch.testing.assert_close(state[key.removeprefix("base_model.model.")], value.float())
    assert (
        type(AutoProcessor.from_pretrained(tmp_path / "merged")).__name__
        == type(AutoProcessor.from_pretrained(base)).__name__
    )
