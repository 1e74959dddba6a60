"""Relatives of LLaVA on tiny models built from transformers' own config classes: qllava's encoded samples equal
the model's own processor (ids, pixels, the extra forward inputs), the forward takes qllava's batches, and a short
QLoRA run lowers the loss, resumes exactly, merges with a passing verification and exports a model that plain
transformers loads."""

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from qllava.data.check import check_dataset
from qllava.data.dataset import collate, encoder_from_recipe
from qllava.data.templates import render
from qllava.data.validate import datasets_from_recipe
from qllava.errors import QllavaError
from qllava.export import merge_checkpoint
from qllava.model.families import family_named, family_of, forward_image_inputs
from qllava.model.load import load_processor
from qllava.recipe import load_recipe
from qllava.train.loop import train
from tests.conftest import (
    adapter_tensors,
    assert_each_sample_computes_alone,
    kinds,
    make_recipe,
    max_abs_diff,
    run_metrics,
    write_color_data,
)
from tests.test_inference import check_answer_and_chat

# kind -> (fixture, template, what the model's processor takes where qllava's data has `<image>`, training steps
# in which the loss falls by 15%: measured 0.80 after 20 steps for the tiny Qwen2.5-VL, 0.92 after 10; 0.74 after 20
# for the tiny InternVL, 0.82 after 10)
RELATIVES = {
    "gemma3": ("tiny_gemma3", "gemma", "<start_of_image>", 10),
    "qwen2_5_vl": ("tiny_qwen2_5_vl", "chatml", "<|vision_start|><|image_pad|><|vision_end|>", 20),
    "internvl": ("tiny_internvl", "chatml", "<IMG_CONTEXT>", 20),
}
# Qwen2.5-VL's and InternVL's processors need torchvision (the `torchvision` tier); Gemma 3's runs in the default one.
KINDS = kinds(*RELATIVES)
UNPACKED = kinds(*(kind for kind in RELATIVES if not family_named(kind).packing))
END_OF_TURN = {"gemma": "<end_of_turn>", "chatml": "<|im_end|>"}
SIZES = ((32, 32), (28, 40), (64, 20), (100, 300))


def _base(kind, request):
    return request.getfixturevalue(RELATIVES[kind][0])


def _recipe(kind, base, data_dir, out, **sections):
    data = {"template": RELATIVES[kind][1], "image_aspect": "resize", **sections.pop("data", {})}
    return make_recipe(base, data_dir, out, data=data, **sections)


@pytest.mark.parametrize("kind", KINDS)
def test_encoded_sample_equals_the_hf_processor(kind, request, tmp_path):
    """Token ids, pixel_values and the forward's extra inputs of qllava's items equal what the model's own processor
    gives for the same rendered text and image (`resize`: Gemma 3's processor stretches the image, too), and so do
    the model's logits on them."""
    base = _base(kind, request)
    data = write_color_data(tmp_path, 8, sizes=SIZES)
    recipe = _recipe(kind, base, data, tmp_path / "out")
    processor = load_processor(base)
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32).eval()
    model_config = model.config
    family = family_of(model_config)
    train_set, _ = datasets_from_recipe(recipe, processor, model_config, warn=lambda _: None)
    hf = AutoProcessor.from_pretrained(base)
    tag = RELATIVES[kind][2]
    checked = 0
    for i, sample in enumerate(train_set.samples):
        item = train_set[i]
        turns = [(role, text.replace("<image>", tag)) for role, text in sample.turns]
        text = render(turns, recipe.data.template, tokenizer=processor.tokenizer).text
        if not sample.images:
            theirs = hf(text=text, return_tensors="pt")
            assert item["input_ids"] == theirs["input_ids"][0].tolist(), sample.id
            continue
        with Image.open(data / "images" / sample.images[0]) as img:
            theirs = hf(images=img.convert("RGB"), text=text, return_tensors="pt")
        assert item["input_ids"] == theirs["input_ids"][0].tolist(), sample.id
        # Loss only on the replies and their end-of-turn token.
        replies = [text for role, text in sample.turns if role == "assistant"]
        trained = processor.tokenizer.decode([t for t in item["labels"] if t != -100])
        assert trained == "".join(f"{reply}{END_OF_TURN[recipe.data.template]}" for reply in replies), sample.id
        # One image: Qwen2.5-VL's processor returns its patches (patches, dim), InternVL's its tiles (tiles, 3, H, W),
        # Gemma 3's a batch of one.
        pixels = theirs["pixel_values"]
        torch.testing.assert_close(item["pixel_values"], pixels if family.tiles else pixels[0])
        for key in family.image_inputs:
            assert torch.equal(item[key], theirs[key][0]), (sample.id, key)
        batch = collate([item], processor.tokenizer.pad_token_id)
        ours = forward_image_inputs(batch, torch.device("cpu"), torch.float32, model_config)
        if family.token_types is not None:
            hf_key = "token_type_ids" if "token_type_ids" in theirs else "mm_token_type_ids"
            assert torch.equal(ours[family.token_types], theirs[hf_key]), sample.id
            assert ours[family.token_types].sum() > 0
        # Nothing the processor gives the forward is missing from qllava's inputs (InternVL: pixel_values alone).
        assert set(theirs) - {"input_ids", "attention_mask"} <= set(ours) | {family.token_types}, sample.id
        # The model on qllava's inputs is the model on the processor's (Qwen2.5-VL's 3-D positions included).
        with torch.no_grad():
            reference = model(**theirs, use_cache=False).logits
            torch.testing.assert_close(model(input_ids=batch["input_ids"], **ours, use_cache=False).logits, reference)
        checked += 1
    assert checked == 6


@pytest.mark.parametrize("kind", KINDS)
def test_forward_accepts_batches(kind, request, tmp_path):
    """A padded batch of images of several sizes and a text-only sample gives every sample the logits it gets
    alone (the extra inputs land on each sample's own image tokens), and so does the packed batch where the family
    packs (InternVL: 1-D RoPE, causal attention; the others are refused, test_packing_is_refused_at_start_up)."""
    base = _base(kind, request)
    data = write_color_data(tmp_path, 4, sizes=SIZES)
    recipe = _recipe(kind, base, data, tmp_path / "out")
    processor = load_processor(base)
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32).eval()
    family = family_of(model.config)
    train_set, _ = datasets_from_recipe(recipe, processor, model.config, warn=lambda _: None)
    items = [train_set[i] for i in range(4)]
    assert any(it["pixel_values"] is None for it in items)
    assert_each_sample_computes_alone(model, items, processor.tokenizer.pad_token_id, packed=family.packing)


@pytest.mark.parametrize("kind", UNPACKED)
def test_packing_is_refused_at_start_up(kind, request, tmp_path):
    """data.packing with a base whose packed samples would see each other (Gemma 3's image-block mask) or get
    wrong positions (M-RoPE) is refused before any model is loaded, naming the key."""
    base = _base(kind, request)
    data = write_color_data(tmp_path, 4)
    recipe = _recipe(kind, base, data, tmp_path / "out", data={"packing": True})
    refused = f"data.packing=true cannot train `{kind}` models.*set data.packing=false"
    with pytest.raises(QllavaError, match=refused):
        check_dataset(recipe)  # `qllava data check`
    with pytest.raises(QllavaError, match=refused):
        train(recipe, progress=False)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_pad_is_refused_where_the_export_could_not_pad(tiny_gemma3, tmp_path):
    """Gemma 3's processor cannot call a LLaVA padding image processor (measured: a TypeError on its pan-and-scan
    options), so `pad` is refused at start-up instead of making an export that cannot preprocess."""
    data = write_color_data(tmp_path, 4)
    recipe = _recipe("gemma3", tiny_gemma3, data, tmp_path / "out", data={"image_aspect": "pad"})
    with pytest.raises(QllavaError, match="data.image_aspect=pad cannot be used with `gemma3` models.*=resize"):
        check_dataset(recipe)


def _run_recipe(kind, base, data, out):
    steps = RELATIVES[kind][3]
    return _recipe(
        kind,
        base,
        data,
        out,
        lora={"dropout": 0.1},
        optim={"lr": 1e-2, "projector_lr": 1e-2, "schedule": "constant"},
        train={"max_steps": steps, "micro_batch_size": 4, "grad_accum": 1, "save_every": steps // 2, "log_every": 1},
    )


@pytest.fixture(scope="module", params=KINDS)
def relative_run(request, tmp_path_factory):
    """(kind, base, data, run dir) of a QLoRA run of the kind's steps, checkpoints halfway and at the end."""
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
    assert len(losses) == RELATIVES[kind][3] and None not in losses
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
    half = RELATIVES[kind][3] // 2
    recipe.train.resume = str(straight / f"checkpoint-{half}")
    train(recipe, progress=False)
    assert max_abs_diff(adapter_tensors(straight), adapter_tensors(resumed)) == 0.0

    def lines(run):
        return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in (run / "metrics.jsonl").open()]

    assert lines(resumed) == lines(straight)[half:]


def test_merge_verifies_and_the_export_loads_with_plain_transformers(relative_run, tmp_path):
    kind, base, data, run = relative_run
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
    exported = AutoProcessor.from_pretrained(tmp_path / "merged")
    assert type(exported).__name__ == type(AutoProcessor.from_pretrained(base)).__name__

    # The export's chat template and processor turn a conversation with an image into qllava's training prompt.
    recipe = load_recipe(run / "final" / "recipe.yaml")
    encoder = encoder_from_recipe(recipe, load_processor(base), merged.config)
    question = "What color is the shape?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = exported.apply_chat_template(messages, add_generation_prompt=True)
    with Image.open(data / "images" / "0.png") as img:
        theirs = exported(text=text, images=img.convert("RGB"), return_tensors="pt")["input_ids"][0].tolist()
        size = (img.height, img.width)
    assert theirs == encoder.prompt_ids([("user", question)], images=1, image_sizes=[size])


def test_generation_runs_on_the_trained_adapter(relative_run):
    """`qllava answer`'s path (base + adapter, the family's extra inputs in generate) on images and text alone."""
    from qllava.generate import generate_answers, load_for_inference

    _, _, data, run = relative_run
    recipe = load_recipe(run / "final" / "recipe.yaml")
    model, processor = load_for_inference(recipe.model.base, run / "final")
    questions = [("0.png", "What color is the shape?"), ("1.png", "What color is the shape?"), (None, "Say a color.")]
    answers = generate_answers(model, processor, recipe, questions, image_folder=data / "images")
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    # Left-padded together, each prompt gets the greedy answer it gets alone (positions and image inputs per row).
    alone = generate_answers(model, processor, recipe, questions, image_folder=data / "images", batch_size=1)
    assert answers == alone


def test_answer_and_chat_commands_on_the_trained_adapter(relative_run, tmp_path):
    _, base, data, run = relative_run
    check_answer_and_chat(base, run / "final", data / "images", tmp_path)
