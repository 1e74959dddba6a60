"""`qllava plan`: the memory estimate against peaks measured on qllava's real CPU training step.

Measurement (CPU, fp32, as qllava trains there): load the model with `load_for_training`, run one
full step (forward, loss, backward, AdamW step) so the optimizer states exist, then measure a second
step with tools/peak_memory.py's `tensor_peak`: the bytes of every tensor alive before the step
(weights, quantization constants, optimizer states) plus the highest point of the profiler's memory
events during it.
Print the validation table with: PYTHONPATH=. python tests/test_plan.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from qllava.model.load import load_processor
from qllava.model.tiny import LLAVA_1_5_7B, build_tiny_llava, llava_config
from qllava.plan import estimate, largest_micro_batch, read_shape, shape_from_config
from qllava.recipe import RECIPES_DIR, build_recipe
from tools.peak_memory import tensor_peak

CORPUS = ["What color is the shape?", "red blue green", "Describe the image.", "a red circle"]


def build_llava(out: Path, processor_from: Path, *, hidden: int, layers: int, intermediate: int, vocab: int) -> Path:
    """A random LLaVA of the given LLM shape (64px CLIP, patch 8: 64 image tokens) with a tiny processor."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(processor_from)
    vision = dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=8
    )
    text = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=1024,
    )
    config = llava_config(processor.tokenizer, vision, text)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def make_recipe(base: Path, **overrides):
    raw = {
        "model": {"base": str(base), "bits": 4},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "data": {"train": "unused.json", "max_length": 256},
        "optim": {"name": "adamw"},
        "train": {"micro_batch_size": 2, "max_steps": 1},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    return build_recipe(raw)


_LOAD_PROCESSOR = load_processor


def _training_parts(base):
    """What the measured step reads of the processor: its tokenizer and image processor. With torchvision, qllava's
    own (InternVL's needs the settings its processor passes on each call); without, loaded apart, because
    transformers builds the whole processor of Qwen2.5-VL (and OneVision) only with torchvision."""
    import importlib.util
    from types import SimpleNamespace

    from transformers import AutoImageProcessor, AutoTokenizer

    if importlib.util.find_spec("torchvision"):
        return _LOAD_PROCESSOR(base)
    return SimpleNamespace(
        tokenizer=AutoTokenizer.from_pretrained(base), image_processor=AutoImageProcessor.from_pretrained(base)
    )


def measure_cpu_peak(recipe, micro_batch: int, seq_len: int) -> int:
    """Peak bytes of live tensors during qllava's training step on CPU (see the module docstring)."""
    from unittest import mock

    from qllava.data.dataset import collate
    from qllava.data.images import tiled_inputs
    from qllava.model.families import family_of, forward_image_inputs
    from qllava.model.load import load_for_training, set_train_mode
    from qllava.train.loss import forward_loss_sum
    from qllava.train.optim import build_optimizer

    device = torch.device("cpu")
    with mock.patch("qllava.model.load.load_processor", _training_parts):
        model, processor = load_for_training(recipe, device)
    set_train_mode(model)
    optimizer = build_optimizer(model, recipe, device)
    config = AutoConfig.from_pretrained(recipe.model.base)
    shape = read_shape(recipe.model.base, max_image_tokens=seq_len)
    # The count includes the tokens InternVL's processor wraps each image in (`encoder_from_recipe`), text here.
    wrapping = set(getattr(processor, "image_token_ids", ())) - {config.image_token_id}
    image_text = processor.tokenizer(family_of(config).image_text, add_special_tokens=False)["input_ids"]
    image_tokens = shape.image_tokens - sum(token in wrapping for token in image_text)
    g = torch.Generator().manual_seed(0)
    items = []
    for _ in range(micro_batch):
        ids = torch.randint(10, config.text_config.vocab_size, (seq_len,), generator=g)
        ids[ids == config.image_token_id] = 10
        ids[:image_tokens] = config.image_token_id
        labels = ids.clone()
        labels[:image_tokens] = -100
        item = {"input_ids": ids.tolist(), "labels": labels.tolist(), "truncated": False}
        if shape.worst_image is None:
            item["pixel_values"] = torch.randn(3, shape.image_size, shape.image_size, generator=g)
        else:
            # The plan's worst image, as its processor makes it (AnyRes tiles, Qwen2.5-VL's patches).
            height, width = shape.worst_image
            image = Image.fromarray(torch.randint(0, 255, (height, width, 3), generator=g, dtype=torch.uint8).numpy())
            item |= {k: v for k, v in tiled_inputs(image, processor.image_processor).items() if k != "size"}
        items.append(item)
    batch = collate(items, processor.tokenizer.pad_token_id)

    def step():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        inputs |= forward_image_inputs(batch, device, torch.float32, config)
        loss = forward_loss_sum(model, batch["labels"], recipe.train.loss_chunk_size, **inputs, use_cache=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    del items, item  # the batch holds its own copies; the last item's pixels would count as live
    return tensor_peak(step)


# (name, LLM shape, recipe overrides, micro_batch, seq_len); measured by `python tests/test_plan.py`
S = dict(hidden=256, layers=4, intermediate=688, vocab=8000)
M = dict(hidden=512, layers=4, intermediate=1376, vocab=4000)
CASES = [
    ("h256-L4-v8k nf4 ckpt", S, {}, 2, 256),
    ("h256-L4-v8k nf4 ckpt full-logits", S, {"train__loss_chunk_size": 0}, 2, 256),
    ("h256-L4-v8k nf4 no-ckpt", S, {"model__gradient_checkpointing": False}, 2, 256),
    ("h256-L4-v8k nf4 ckpt", S, {}, 4, 512),
    ("h512-L4-v32k nf4 ckpt full-logits", dict(M, vocab=32000), {"train__loss_chunk_size": 0}, 2, 256),
    ("h512-L4-v4k nf4 ckpt", M, {}, 4, 512),
    ("h512-L4-v4k nf4 no-ckpt", M, {"model__gradient_checkpointing": False}, 4, 512),
    ("h512-L4-v4k 16bit ckpt r64", M, {"model__bits": 16, "lora__r": 64}, 2, 512),
]


def validation_table(root: Path, cases=CASES) -> list[tuple]:
    processor_dir = build_tiny_llava(root / "tiny", CORPUS, seed=0)
    rows, built = [], {}
    for name, dims, overrides, mb, seq in cases:
        key = json.dumps(dims, sort_keys=True)
        if key not in built:
            built[key] = build_llava(root / f"m{len(built)}", processor_dir, **dims)
        recipe = make_recipe(built[key], **overrides)
        predicted = estimate(read_shape(str(built[key])), recipe, mb, seq, device="cpu").peak
        measured = measure_cpu_peak(recipe, mb, seq)
        rows.append((name, mb, seq, predicted, measured, predicted / measured))
    return rows


TOLERANCE = 0.02


@pytest.fixture(scope="module")
def small_base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plan")
    return build_llava(root / "model", build_tiny_llava(root / "tiny", CORPUS, seed=0), **S)


# Largest |predicted / measured - 1| in the table printed by `python tests/test_plan.py` is 0.003
# (8 cases: 4-bit and 16-bit, with and without checkpointing, full and chunked logits). The test
# runs the two fastest (chunked loss + checkpointing under the profiler takes ~30 s on 2 cores),
# with a tolerance that catches a term gone wrong, well inside the 10%.
@pytest.mark.parametrize("case", CASES[1:3], ids=lambda c: f"{c[0]}-b{c[3]}-s{c[4]}")
def test_estimate_matches_measured_cpu_peak(small_base, case):
    name, _, overrides, micro_batch, seq_len = case
    recipe = make_recipe(small_base, **overrides)
    predicted = estimate(read_shape(str(small_base)), recipe, micro_batch, seq_len, device="cpu").peak
    measured = measure_cpu_peak(recipe, micro_batch, seq_len)
    assert abs(predicted / measured - 1) <= TOLERANCE, (name, predicted, measured)


NEXT_PINPOINTS = [[64, 128], [128, 64], [128, 128]]  # 1x2, 2x1 and 2x2 grids of 64 px tiles


def build_llava_next(out: Path, processor_from: Path, **dims) -> Path:
    """`build_llava`'s shape as a LLaVA-NeXT: AnyRes over NEXT_PINPOINTS (the worst image: 5 tiles of 64 tokens)."""
    from transformers import AutoProcessor, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next import LlavaNextImageProcessorPil

    from qllava.model.tiny import CLIP_MEAN, CLIP_STD

    tokenizer = AutoProcessor.from_pretrained(processor_from).tokenizer
    base = AutoConfig.from_pretrained(build_llava(out / "llava", processor_from, **dims))
    config = LlavaNextConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_id=base.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=NEXT_PINPOINTS,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(config).save_pretrained(out / "next")
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 64},
        crop_size={"height": 64, "width": 64},
        image_grid_pinpoints=NEXT_PINPOINTS,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(out / "next")
    return out / "next"


def _image_token_count(processor, height: int, width: int) -> int:
    """Image tokens the processor's own `__call__` puts in a prompt for one image of this size."""
    image = Image.new("RGB", (width, height), (120, 60, 30))
    ids = processor(images=image, text="<image>\nhi", return_tensors="pt")["input_ids"][0]
    return int((ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum())


# Sizes around and beyond the grids (tall, wide, tiny, huge): none may get more image tokens than the plan assumes.
SWEEP = [(1, 1), (20, 700), (700, 20), (33, 65), (64, 128), (128, 64), (127, 129), (128, 128), (300, 300), (999, 500)]


def test_next_plan_assumes_the_processors_worst_image(tiny_next):
    from transformers import AutoProcessor

    shape = read_shape(str(tiny_next))
    processor = AutoProcessor.from_pretrained(tiny_next)
    assert shape.worst_image is not None and shape.tiles == 5  # base image + the 2x2 grid
    assert shape.image_tokens == _image_token_count(processor, *shape.worst_image)
    assert max(_image_token_count(processor, h, w) for h, w in SWEEP) == shape.image_tokens


@pytest.mark.parametrize("name", ["llava-v1.6-mistral-7b-hf", "llava-v1.6-vicuna-7b-hf"])
def test_shipped_next_settings_count_as_their_processor(name):
    """The shipped settings, made into a real LlavaNextProcessor (a tiny tokenizer: counts never read it), give the
    plan's worst image the tokens the plan assumes: 2928 for 672x672 with CLIP-L/336."""
    from transformers import AutoImageProcessor, LlavaNextProcessor

    from qllava.bases import BASES_DIR
    from qllava.model.tiny import build_tokenizer

    folder = BASES_DIR / name
    settings = json.loads((folder / "processor_config.json").read_text())
    settings.pop("processor_class")
    processor = LlavaNextProcessor(
        image_processor=AutoImageProcessor.from_pretrained(folder), tokenizer=build_tokenizer(CORPUS), **settings
    )
    shape = read_shape(f"llava-hf/{name}")
    assert (shape.worst_image, shape.image_tokens, shape.tiles) == ((672, 672), 2928, 5)
    assert _image_token_count(processor, 672, 672) == 2928
    assert _image_token_count(processor, 336, 336) == 1176
    assert max(_image_token_count(processor, 2 * h, 2 * w) for h, w in SWEEP) <= 2928


def test_shipped_onevision_settings_give_the_worst_image():
    """OneVision's worst image lies between its grids, just under AnyRes-max's pooling threshold: 8765 tokens, more
    than any grid's own size gets (8154 at 1920x768)."""
    shape = read_shape("llava-hf/llava-onevision-qwen2-7b-ov-hf")
    assert (shape.worst_image, shape.image_tokens, shape.tiles) == ((1248, 1024), 8765, 37)


@pytest.mark.torchvision
def test_shipped_onevision_settings_count_as_their_processor():
    """The processor built from the shipped settings counts the plan's worst image as the plan does, and no more for
    any image of a 16 px sweep up to the largest grid."""
    from transformers import AutoImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    from qllava.bases import BASES_DIR
    from qllava.model.tiny import build_tokenizer

    folder = BASES_DIR / "llava-onevision-qwen2-7b-ov-hf"
    settings = json.loads((folder / "processor_config.json").read_text())
    for key in ("processor_class", "video_token"):
        settings.pop(key)
    processor = LlavaOnevisionProcessor(
        image_processor=AutoImageProcessor.from_pretrained(folder),
        tokenizer=build_tokenizer(CORPUS),
        video_processor=LlavaOnevisionVideoProcessor(),
        **settings,
    )
    assert _image_token_count(processor, 1920, 768) == 8154
    assert _image_token_count(processor, 1248, 1024) == _image_token_count(processor, 1168, 960) == 8765
    sizes = [[h, w] for h in range(16, 2305, 16) for w in range(16, 2305, 16)]
    assert max(processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens) == 8765


@pytest.fixture(scope="module")
def next_base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plan-next")
    return build_llava_next(root / "model", build_tiny_llava(root / "tiny", CORPUS, seed=0), **S)


def test_next_estimate_matches_measured_cpu_peak(next_base):
    """The worst image's 5 tiles through the vision tower and the projector, at full logits and checkpointing."""
    recipe = make_recipe(next_base, train__loss_chunk_size=0)
    predicted = estimate(read_shape(str(next_base)), recipe, 2, 512, device="cpu").peak
    measured = measure_cpu_peak(recipe, 2, 512)
    assert abs(predicted / measured - 1) <= TOLERANCE, (predicted, measured)


def build_relative(
    out: Path,
    family: str,
    *,
    hidden: int,
    layers: int,
    intermediate: int,
    vocab: int,
    vision_hidden: int = 64,
    max_side: int = 128,
    **text,
) -> Path:
    """A random Gemma 3 or Qwen2.5-VL of the given LLM shape (8 heads, 4 KV heads; `text`: other text settings), on
    the tiny builder's vision tower (`vision_hidden` wide) and tokenizer. Qwen2.5-VL: images up to `max_side` px
    square (128: 256 patches of 8 px, 64 tokens); its processor files are the image processor's alone
    (transformers builds the whole processor only with torchvision), with the processor class named as the real
    base's preprocessor_config.json names it."""
    import shutil

    from transformers import AutoConfig, AutoModelForImageTextToText

    from qllava.model.tiny import build_tiny_gemma3, build_tiny_internvl, build_tiny_qwen2_5_vl

    tiny = out.parent / f"{out.name}-tiny"
    if family == "gemma3":
        build_tiny_gemma3(tiny, CORPUS, vision_hidden=vision_hidden)
    elif family == "internvl":
        build_tiny_internvl(tiny, CORPUS, vision_hidden=vision_hidden)
    else:
        build_tiny_qwen2_5_vl(tiny, CORPUS, processor=False, vision_hidden=vision_hidden)
    config = AutoConfig.from_pretrained(tiny)
    dims = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    for key, value in {**dims, **text}.items():
        setattr(config.text_config, key, value)
    if family == "qwen2_5_vl":
        config.vision_config.out_hidden_size = hidden  # the merger projects into the LLM
    # One layer type per layer (Gemma 3: local layers and a last global one, as its 5:1 pattern ends).
    local = "sliding_attention" if family == "gemma3" else "full_attention"
    config.text_config.layer_types = [local] * (layers - 1) + ["full_attention"]
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(out)
    for name in tiny.iterdir():
        if name.suffix == ".json" and name.name not in ("config.json", "generation_config.json"):
            shutil.copy(name, out / name.name)
    if family == "qwen2_5_vl":
        from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

        from qllava.model.tiny import CLIP_MEAN, CLIP_STD, PATCH_SIZE

        Qwen2VLImageProcessorPil(
            patch_size=PATCH_SIZE,
            merge_size=2,
            temporal_patch_size=2,
            size={"shortest_edge": 16 * 16, "longest_edge": max_side * max_side},
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        ).save_pretrained(out)
        settings = json.loads((out / "preprocessor_config.json").read_text())
        settings["processor_class"] = "Qwen2_5_VLProcessor"
        (out / "preprocessor_config.json").write_text(json.dumps(settings))
    return out


# (name, family, LLM shape, recipe overrides, micro_batch, seq_len); Gemma 3: head_dim apart from hidden / heads,
# a vocabulary large beside the hidden size, a sliding window shorter than the sequence.
GEMMA = dict(hidden=256, layers=4, intermediate=688, vocab=32000, head_dim=48, sliding_window=128)
QWEN = dict(hidden=256, layers=4, intermediate=688, vocab=8000)
# A wide ViT over a 512x512 image (4096 patches) before a small LLM: the vision tower's forward is the peak.
QWEN_VISION = dict(hidden=256, layers=1, intermediate=256, vocab=2000, vision_hidden=384, max_side=512)
INTERNVL_NO_CKPT = {"model__gradient_checkpointing": False, "train__loss_chunk_size": 0}
RELATIVE_CASES = [
    ("gemma3 h256-L4-v32k nf4 ckpt", "gemma3", GEMMA, {}, 2, 256),
    ("gemma3 h256-L4-v32k nf4 ckpt full-logits", "gemma3", GEMMA, {"train__loss_chunk_size": 0}, 2, 256),
    ("gemma3 h256-L4-v32k nf4 no-ckpt", "gemma3", GEMMA, {"model__gradient_checkpointing": False}, 2, 256),
    ("qwen2.5-vl h256-L4-v8k nf4 ckpt", "qwen2_5_vl", QWEN, {}, 2, 256),
    ("qwen2.5-vl h256-L4-v8k nf4 ckpt full-logits", "qwen2_5_vl", QWEN, {"train__loss_chunk_size": 0}, 2, 256),
    ("qwen2.5-vl h256-L4-v8k nf4 no-ckpt", "qwen2_5_vl", QWEN, {"model__gradient_checkpointing": False}, 2, 256),
    ("qwen2.5-vl vision-bound ViT h384 4096 patches", "qwen2_5_vl", QWEN_VISION, {}, 1, 1100),
    # InternVL (its processor needs torchvision: the torchvision tier), at full logits: with chunked logits the plan's
    # worst chunk is the one of a sample with the smallest image (the most text), which this measurement, every sample
    # at the worst image, does not build (1.023 there; 0.9997 at full logits).
    ("internvl h256-L4-v8k nf4 ckpt full-logits", "internvl", QWEN, {"train__loss_chunk_size": 0}, 2, 256),
    ("internvl h256-L4-v8k nf4 no-ckpt full-logits", "internvl", QWEN, INTERNVL_NO_CKPT, 2, 256),
]


def relatives_table(root: Path, cases=RELATIVE_CASES) -> list[tuple]:
    rows, built = [], {}
    for name, family, dims, overrides, mb, seq in cases:
        key = family + json.dumps(dims, sort_keys=True)
        if key not in built:
            built[key] = build_relative(root / f"r{len(built)}", family, **dims)
        recipe = make_recipe(built[key], **overrides)
        predicted = estimate(read_shape(str(built[key]), seq), recipe, mb, seq, device="cpu").peak
        measured = measure_cpu_peak(recipe, mb, seq)
        rows.append((name, mb, seq, predicted, measured, predicted / measured))
    return rows


@pytest.fixture(scope="module")
def relative_bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan-relatives")
    return {
        "gemma3": build_relative(root / "gemma3", "gemma3", **GEMMA),
        "qwen2_5_vl": build_relative(root / "qwen2_5_vl", "qwen2_5_vl", **QWEN),
    }


# `python tests/test_plan.py` prints the seven relative cases, ratios 0.990-1.018 (the largest |ratio - 1|: Qwen2.5-VL
# without checkpointing); the test runs one per family: Gemma 3 without checkpointing (0.990), Qwen2.5-VL where its
# vision tower's forward is the peak (0.990).
@pytest.mark.parametrize("case", [RELATIVE_CASES[2], RELATIVE_CASES[6]], ids=lambda c: f"{c[0]}-b{c[4]}-s{c[5]}")
def test_relative_estimate_matches_measured_cpu_peak(relative_bases, case):
    """Gemma 3 (head_dim apart from hidden / heads, its four norms and q/k norms, tied 32k vocabulary, a sliding
    window) and Qwen2.5-VL (the worst image at its own resolution through the windowed ViT: the step's peak)."""
    name, family, _, overrides, micro_batch, seq_len = case
    recipe = make_recipe(relative_bases[family], **overrides)
    shape = read_shape(str(relative_bases[family]), seq_len)
    predicted = estimate(shape, recipe, micro_batch, seq_len, device="cpu").peak
    measured = measure_cpu_peak(recipe, micro_batch, seq_len)
    assert abs(predicted / measured - 1) <= TOLERANCE, (name, predicted, measured)


@pytest.mark.torchvision
@pytest.mark.parametrize("case", RELATIVE_CASES[7:], ids=lambda c: f"{c[0]}-b{c[4]}-s{c[5]}")
def test_internvl_estimate_matches_measured_cpu_peak(case, tmp_path):
    """InternVL: the worst image's tiles (a grid by its aspect ratio plus a thumbnail) through InternViT, pixel
    shuffle and the projector."""
    name, family, dims, overrides, micro_batch, seq_len = case
    base = build_relative(tmp_path / "internvl", family, **dims)
    recipe = make_recipe(base, **overrides)
    shape = read_shape(str(base), seq_len)
    assert shape.tiles > 1 and shape.tile_tokens * 4 == shape.vision_tokens - 1  # pixel shuffle; CLS dropped
    predicted = estimate(shape, recipe, micro_batch, seq_len, device="cpu").peak
    measured = measure_cpu_peak(recipe, micro_batch, seq_len)
    assert abs(predicted / measured - 1) <= TOLERANCE, (name, predicted, measured)


def test_relative_shapes_read_the_worst_image(relative_bases):
    """The tiny Qwen2.5-VL's processor admits up to 128x128 px: 64 tokens of 4 patches; bounded by a length, the
    largest image that fits. Gemma 3's count does not depend on the image."""
    qwen = read_shape(str(relative_bases["qwen2_5_vl"]))
    assert (qwen.image_tokens, qwen.worst_image, qwen.vision_tokens, qwen.tiles) == (64, (128, 128), 256, 1)
    bounded = read_shape(str(relative_bases["qwen2_5_vl"]), max_image_tokens=40)
    assert bounded.image_tokens <= 40 < bounded.largest_image_tokens == 64
    gemma = read_shape(str(relative_bases["gemma3"]))
    assert (gemma.image_tokens, gemma.worst_image, gemma.q_dim, gemma.tied) == (4, None, 8 * 48, True)


def test_shipped_relative_settings():
    """The shipped Qwen2.5-VL-7B and Gemma 3 4B settings, as the plan reads them (SOURCES.md)."""
    qwen = read_shape("Qwen/Qwen2.5-VL-7B-Instruct")
    assert (qwen.hidden, qwen.layers, qwen.intermediate, qwen.vocab, qwen.kv_dim) == (3584, 28, 18944, 152064, 512)
    # max_pixels 12845056 = 3584^2: 128x128 patch pairs merged 2x2, 16384 tokens; 4096 tokens (data.max_length of
    # the recipe) hold at most a 1792x1792 image.
    assert (qwen.largest_image_tokens, qwen.worst_image, qwen.vision_tokens) == (16384, (3584, 3584), 65536)
    bounded = read_shape("Qwen/Qwen2.5-VL-7B-Instruct", max_image_tokens=4096)
    assert (bounded.image_tokens, bounded.worst_image, bounded.vision_tokens) == (4096, (1792, 1792), 16384)
    assert not qwen.tied and 8.2e9 < sum(qwen.params.values()) < 8.4e9
    gemma = read_shape("google/gemma-3-4b-it")
    assert (gemma.hidden, gemma.layers, gemma.intermediate, gemma.vocab) == (2560, 34, 10240, 262208)
    assert (gemma.q_dim, gemma.kv_dim, gemma.image_tokens, gemma.vision_tokens, gemma.tied) == (
        2048,
        1024,
        256,
        4096,
        True,
    )
    assert 4.2e9 < sum(gemma.params.values()) < 4.4e9


@pytest.mark.torchvision
def test_shipped_qwen_settings_count_as_their_processor():
    """The processor built from the shipped settings counts what the plan assumes, and no image gets more."""
    from transformers import AutoImageProcessor, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl import Qwen2VLVideoProcessor

    from qllava.bases import BASES_DIR
    from qllava.model.tiny import build_tokenizer

    folder = BASES_DIR / "Qwen2.5-VL-7B-Instruct"
    processor = Qwen2_5_VLProcessor(
        image_processor=AutoImageProcessor.from_pretrained(folder),
        tokenizer=build_tokenizer(CORPUS + ["<|image_pad|>", "<|video_pad|>"]),
        video_processor=Qwen2VLVideoProcessor(),
    )
    counted = processor._get_num_multimodal_tokens(image_sizes=[[3584, 3584], [1792, 1792], [9000, 300]])
    assert counted.num_image_tokens[:2] == [16384, 4096] and counted.num_image_tokens[2] <= 16384
    pixels = processor.image_processor(images=Image.new("RGB", (1792, 1792)), return_tensors="pt")
    assert pixels["pixel_values"].shape[0] == 16384 and pixels["image_grid_thw"].tolist() == [[1, 128, 128]]


def _config_7b(vocab: int = 32064) -> LlavaConfig:
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**LLAVA_1_5_7B["vision"]),
        text_config=LlamaConfig(**{**LLAVA_1_5_7B["text"], "vocab_size": vocab}),
        image_token_id=32000,
        image_seq_length=576,
    )


@pytest.fixture(scope="module")
def base_7b(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llava7b")
    _config_7b().save_pretrained(out)
    return out


def _shipped(name: str, base: Path):
    raw = yaml.safe_load((RECIPES_DIR / name).read_text())
    raw["model"]["base"] = str(base)
    return build_recipe(raw)


def test_7b_shape_counts():
    shape = shape_from_config(_config_7b())
    assert shape.image_tokens == 576
    assert 6.4e9 < shape.params["llm_linear"] < 6.6e9  # 32 x 202M
    assert 300e6 < shape.params["vision"] < 310e6  # CLIP-L/336


@pytest.mark.parametrize("name", ["llava-1.5-7b-qlora.yaml", "llava-1.5-7b-qlora-12gb.yaml"])
def test_7b_plans(base_7b, name):
    recipe = _shipped(name, base_7b)
    shape = read_shape(str(base_7b))
    e = estimate(shape, recipe, 1, 2048)
    weights = dict((n, b) for n, b, _ in e.rows)["LLM linear layers"]
    assert 3.2e9 < weights < 3.6e9  # 6.48e9 params x 0.516 B
    b12 = largest_micro_batch(shape, recipe, 2048, 12 * 10**9)
    b24 = largest_micro_batch(shape, recipe, 2048, 24 * 10**9)
    assert 1 <= b12 < b24


def test_cli_plan(base_7b, tmp_path):
    from typer.testing import CliRunner

    from qllava.cli import app

    recipe = tmp_path / "r.yaml"
    raw = yaml.safe_load((RECIPES_DIR / "llava-1.5-7b-qlora.yaml").read_text())
    raw["model"]["base"] = str(base_7b)
    recipe.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    ok = runner.invoke(app, ["plan", str(recipe), "--gpu-memory", "24"])
    assert ok.exit_code == 0, ok.output
    assert "LLM linear layers" in ok.output and "largest micro-batch that fits" in ok.output
    small = runner.invoke(app, ["plan", str(recipe), "--gpu-memory", "4"])
    assert small.exit_code == 0
    assert (
        "does NOT fit even at micro-batch 1" in small.output
        and "LLM linear layers" in small.output.split("biggest")[-1]
    )
    table = runner.invoke(app, ["plan", str(recipe), "train.micro_batch_size=1"])
    assert all(f"{gb} GB:" in table.output for gb in (12, 16, 24, 40, 80))
    bad = runner.invoke(app, ["plan", str(recipe), "lora.rr=3"])
    assert bad.exit_code == 1 and "lora.r" in bad.output


def test_loss_chunk_shrinks_logits(base_7b):
    recipe = _shipped("llava-1.5-7b-qlora.yaml", base_7b)
    shape = read_shape(str(base_7b))
    recipe.train.loss_chunk_size = 0
    full = estimate(shape, recipe, 8, 2048)
    recipe.train.loss_chunk_size = 1024
    chunked = estimate(shape, recipe, 8, 2048)
    assert chunked.peak < full.peak


if __name__ == "__main__":
    import importlib.util
    import tempfile

    # InternVL's processor needs torchvision: its cases run where it is installed.
    cases = [c for c in RELATIVE_CASES if c[1] != "internvl" or importlib.util.find_spec("torchvision")]
    with tempfile.TemporaryDirectory() as d:
        print("| shape | micro-batch | seq | predicted MiB | measured MiB | ratio |\n|---|---|---|---|---|---|")
        for name, mb, seq, pred, meas, ratio in validation_table(Path(d)) + relatives_table(Path(d), cases):
            print(f"| {name} | {mb} | {seq} | {pred / 2**20:.1f} | {meas / 2**20:.1f} | {ratio:.3f} |", flush=True)


def test_plan_refuses_the_fp32_base_it_does_not_model():
    """train.mixed_precision=no loads the base in fp32 on a GPU; the plan's rows are 16-bit."""
    from qllava.errors import QllavaError
    from qllava.plan import plan

    recipe = build_recipe({"model": {"base": "unused"}, "data": {"train": "t"}, "train": {"mixed_precision": "no"}})
    with pytest.raises(QllavaError, match="mixed_precision=no"):
        plan(recipe, gpu_memory=24)


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES_DIR.glob("*.yaml")))
def test_every_shipped_recipe_plans_before_its_base_is_downloaded(name, tmp_path, monkeypatch):
    """No recipe's base exists here: the hub bases are planned from the settings qllava ships, the demo's built."""
    from typer.testing import CliRunner

    from qllava.cli import app

    monkeypatch.chdir(tmp_path)  # the recipes' `checkpoints/...` bases are relative paths: none exists here
    result = CliRunner().invoke(app, ["plan", str(RECIPES_DIR / name), "--gpu-memory", "24"])
    assert result.exit_code == 0, result.output
    assert "largest micro-batch that fits" in result.output
    assert "does NOT fit" not in result.output  # every shipped recipe's micro-batch is meant for 24 GB or less
    base = yaml.safe_load((RECIPES_DIR / name).read_text())["model"]["base"]
    if not base.startswith("demo:"):
        assert f"model.base `{base}` is not there yet" in result.output and "that qllava ships" in result.output


@pytest.mark.parametrize("name", ["gemma-3-4b-qlora.yaml", "qwen2.5-vl-7b-qlora.yaml"])
def test_relative_recipes_print_a_micro_batch_table(name, tmp_path, monkeypatch):
    """Without --gpu-memory (and no GPU) the plan prints its table of the largest micro-batch per GPU size, from the
    shipped settings only: no model file exists."""
    from qllava.plan import plan
    from qllava.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    text = plan(load_recipe(str(RECIPES_DIR / name), []))
    verdicts = [line for line in text.splitlines() if line.split(" GB:")[0] in {"12", "16", "24", "40", "80"}]
    assert len(verdicts) == 5 and all("largest micro-batch that fits" in line for line in verdicts[1:])
    if name.startswith("qwen"):
        assert "image tokens 4096 included: the most one image gets, at 1792x1792" in text
        assert "the largest image becomes 16384 tokens, more than seq_len=4096 holds" in text
    else:
        assert "image tokens 256 included" in text and "262208 logits" in text


def test_plan_base_prefers_the_local_base(base_7b):
    from qllava.errors import QllavaError
    from qllava.plan import plan_base

    assert plan_base(str(base_7b)) == (base_7b, None)
    folder, note = plan_base("llava-hf/llava-1.5-13b-hf")
    assert folder.name == "llava-1.5-13b-hf" and "llava-hf/llava-1.5-13b-hf" in note
    assert read_shape("llava-hf/llava-1.5-13b-hf").layers == 40
    with pytest.raises(QllavaError, match="hf download someone/other-model"):
        plan_base("someone/other-model")


def test_plan_assumes_the_largest_image_that_fits_the_length():
    from qllava.plan import plan
    from qllava.recipe import load_recipe

    recipe = load_recipe(str(RECIPES_DIR / "llava-v1.6-mistral-7b-qlora.yaml"), ["data.max_length=2048"])
    text = plan(recipe, gpu_memory=24)
    assert "the largest image becomes 2928 tokens, more than seq_len=2048 holds" in text
    assert "the plan assumes the largest image that fits, 2046 tokens" in text and "at 352x576" in text
    assert "note:" not in plan(load_recipe(str(RECIPES_DIR / "llava-v1.6-mistral-7b-qlora.yaml"), []), 24)


def test_a_micro_batch_beyond_the_search_is_not_printed_as_found():
    """The demo's stage-1 recipe (a tiny base, projector only) fits any micro-batch the search tries at 80 GB: the plan
    says so instead of printing the search's limit as the largest that fits."""
    from qllava.plan import MICRO_BATCH_LIMIT, plan
    from qllava.recipe import load_recipe

    text = plan(load_recipe(str(RECIPES_DIR / "demo-pretrain-projector.yaml"), []), gpu_memory=80)
    assert f"largest micro-batch that fits: >= {MICRO_BATCH_LIMIT} (the search stops there)" in text
    assert str(MICRO_BATCH_LIMIT - 1) not in text
