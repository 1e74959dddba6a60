"""AnyRes data (LLaVA-NeXT, LLaVA-OneVision): image tokens as the HF processor expands them, tile stacks and
image_sizes through batching, and the model's forward on qllava's batches."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from qllava.data.validate import datasets_from_recipe
from qllava.model.load import load_processor
from tests.conftest import assert_each_sample_computes_alone, kinds, make_recipe, template_of, tiny_of, write_color_data

# (height, width): tiny, square, tall, wide, just off the tile size, and far beyond the largest grid.
SIZES = [
    (1, 1),
    (2, 3),
    (5, 300),
    (300, 5),
    (16, 16),
    (28, 40),
    (32, 32),
    (33, 31),
    (40, 28),
    (63, 64),
    (64, 64),
    (64, 65),
    (96, 32),
    (32, 96),
    (100, 20),
    (20, 100),
    (128, 512),
    (512, 128),
    (480, 640),
    (640, 480),
    (1000, 1000),
    (1500, 2000),
    (4000, 300),
    (300, 4000),
]
QUESTION = "What color is the shape?"


def _sized_data(root, sizes):
    (root / "images").mkdir(parents=True)
    records = []
    for i, (h, w) in enumerate(sizes):
        Image.new("RGB", (w, h), (40 + i * 7 % 200, 90, 160)).save(root / "images" / f"{i}.png")
        convs = [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": "blue"}]
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": convs})
    (root / "train.json").write_text(json.dumps(records))
    return root


@pytest.mark.parametrize("kind", kinds("llava_next", "llava_onevision"))
def test_image_tokens_and_tiles_equal_the_hf_processor(kind, request, tmp_path):
    base = tiny_of(kind, request)
    data = _sized_data(tmp_path / "data", SIZES)
    recipe = make_recipe(base, data, tmp_path / "out", data={"max_length": 512, "template": template_of(kind)})
    processor = load_processor(base)
    config = AutoConfig.from_pretrained(base)
    train_set, _ = datasets_from_recipe(recipe, processor, config, warn=lambda _: None)
    hf = AutoProcessor.from_pretrained(base)
    counts = set()
    for i, (h, w) in enumerate(SIZES):
        item = train_set[i]
        with Image.open(data / "images" / f"{i}.png") as img:
            theirs = hf(images=img.convert("RGB"), text=f"<image>\n{QUESTION}", return_tensors="pt")
        ours = item["input_ids"].count(config.image_token_id)
        assert ours == (theirs["input_ids"] == config.image_token_id).sum().item(), (h, w)
        assert torch.equal(item["pixel_values"], theirs["pixel_values"][0]), (h, w)
        assert item["image_sizes"].tolist() == [h, w] == theirs["image_sizes"][0].tolist()
        counts.add(ours)
    assert len(counts) >= 4, counts  # the sizes do lead to different counts: the test can tell them apart


@pytest.mark.parametrize("kind", kinds("llava_next", "llava_onevision"))
def test_forward_accepts_batches_of_different_tile_counts(kind, request, tmp_path):
    """A padded and a packed batch (3-tile and 5-tile images, a text-only sample) give every sample the logits
    it gets alone: each image's features land on its own tokens."""
    base = tiny_of(kind, request)
    data = write_color_data(tmp_path, 4, sizes=((64, 64), (20, 60), (40, 28)))
    recipe = make_recipe(base, data, tmp_path / "out", data={"template": template_of(kind)})
    processor = load_processor(base)
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32).eval()
    train_set, _ = datasets_from_recipe(recipe, processor, model.config, warn=lambda _: None)
    items = [train_set[i] for i in range(4)]
    assert len({it["pixel_values"].shape[0] for it in items if it["pixel_values"] is not None}) > 1
    assert any(it["pixel_values"] is None for it in items)
    batch = assert_each_sample_computes_alone(model, items, processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].dim() == 4 and batch["image_sizes"].shape == (3, 2)


@pytest.mark.parametrize("kind", kinds("llava_next", "llava_onevision"))
def test_a_few_qlora_steps_lower_the_loss(kind, request, tmp_path):
    """12 steps of `qllava.train.loop.train` on images of 3 and 5 tiles: the loss falls (measured on the tiny NeXT:
    5.74 -> 4.44, first three steps' mean to the last three's), and image_newline is trained and saved."""
    from qllava.train.loop import train

    base = tiny_of(kind, request)
    data = write_color_data(tmp_path, 12, sizes=((32, 32), (64, 32), (40, 28), (20, 60)))
    recipe = make_recipe(
        base,
        data,
        tmp_path / "run",
        data={"template": template_of(kind)},
        optim={"lr": 1e-2, "projector_lr": 1e-2, "schedule": "constant"},
        train={"max_steps": 12, "micro_batch_size": 4, "grad_accum": 1, "log_every": 1},
    )
    final = train(recipe, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and None not in losses
    assert sum(losses[-3:]) < 0.85 * sum(losses[:3]), losses
    newline = load_file(final / "adapter_model.safetensors")["base_model.model.model.image_newline"]
    untrained = AutoModelForImageTextToText.from_pretrained(base).model.image_newline.detach()
    assert (newline - untrained).abs().max() > 1e-3


def test_length_grouping_counts_a_typical_image_where_size_is_a_pixel_budget():
    """Qwen2.5-VL's processor keeps min/max pixel COUNTS in `size` (shortest_edge / longest_edge): the typical image
    that length grouping counts is a photo's size, not min_pixels 3136 read as a side (12544 tokens). One-tile and
    AnyRes processors keep their input size."""
    from transformers import AutoImageProcessor

    from qllava.bases import BASES_DIR
    from qllava.data.images import TYPICAL_PHOTO, typical_size
    from qllava.model.families import image_tokens
    from qllava.plan import counting_processor

    processor = counting_processor(BASES_DIR / "Qwen2.5-VL-7B-Instruct")
    assert typical_size(processor.image_processor) == TYPICAL_PHOTO == (480, 640)
    assert image_tokens(processor, [TYPICAL_PHOTO, (3136, 3136)]) == [391, 12544]  # 391: 476x644 px, 17x23 tokens
    assert typical_size(AutoImageProcessor.from_pretrained(BASES_DIR / "llava-v1.6-mistral-7b-hf")) == (336, 336)
    assert typical_size(AutoImageProcessor.from_pretrained(BASES_DIR / "gemma-3-4b-it")) == (896, 896)


@pytest.mark.torchvision
def test_qwen_encoder_counts_a_typical_photo(tiny_qwen2_5_vl):
    """The encoder of a Qwen2.5-VL recipe (what modality_lengths adds per image) counts TYPICAL_PHOTO as the
    processor does, not its shortest_edge (256 pixels) read as a 256x256 image."""
    from qllava.data.dataset import encoder_from_recipe
    from qllava.data.images import TYPICAL_PHOTO
    from qllava.recipe import build_recipe

    processor = load_processor(tiny_qwen2_5_vl)
    recipe = build_recipe({"model": {"base": str(tiny_qwen2_5_vl)}, "data": {"train": "t", "template": "chatml"}})
    encoder = encoder_from_recipe(recipe, processor, AutoConfig.from_pretrained(tiny_qwen2_5_vl))
    counted = processor._get_num_multimodal_tokens(image_sizes=[list(TYPICAL_PHOTO), [256, 256]]).num_image_tokens
    assert encoder.image_tokens == counted[0] != counted[1]
