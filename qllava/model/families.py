"""One entry per supported architecture (`model_type`): the facts about it that cannot be derived.

Everything architecture-specific is read from here, never named elsewhere: the quantization skip list,
the LoRA target regex, what trains and what stays frozen, the start-up table's groups, the merge, the
planner. How many image tokens an image becomes is asked of the model's processor
(`_get_num_multimodal_tokens`, what vLLM's transformers backend relies on), never copied as a formula.

Adding an architecture is one entry here plus its tests (and a tiny builder in `qllava.model.tiny`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import torch

from qllava.errors import QllavaError


@dataclass(frozen=True)
class Family:
    """What differs between the image-text-to-text architectures qllava trains."""

    model_type: str
    """`config.model_type` of the top-level config."""
    class_name: str
    """The transformers class a checkpoint of this type loads as (also what `AutoModelForImageTextToText` gives)."""
    vision: str = "model.vision_tower"
    """Module path of the vision encoder: frozen, never quantized."""
    projector: str = "model.multi_modal_projector"
    """Module path of the multimodal projector: trains fully, never quantized, saved inside the adapter."""
    language_model: str = "model.language_model"
    """Module path of the decoder: its linear layers are 4-bit and carry LoRA."""
    extra_trainable: tuple[str, ...] = ()
    """Bare parameters (not modules) that train with the projector, by full name: peft's `modules_to_save`
    holds modules only, so these are saved into the adapter file and restored beside it (LLaVA-NeXT's
    `model.image_newline`, the learned separator after each row of image features)."""
    tiles: bool = False
    """An image goes to the processor as it is and becomes a number of pieces that depends on its size: AnyRes
    tiles (pixel_values (tiles, 3, H, W) per image), InternVL's tiles of its aspect-ratio grid (likewise) or
    Qwen2.5-VL's flattened patches at the image's own resolution ((patches, dim) per image). A batch concatenates
    them; the model splits them again by the family's `image_inputs` (InternVL's needs none: its features fill the
    image tokens in order), and the image's token count is asked of the processor for its size."""
    image_inputs: tuple[str, ...] = ()
    """Processor outputs the forward needs beside pixel_values, one row per image, stacked over the batch's
    images in sample order (`image_sizes`: (height, width) of each original image, which the AnyRes forward
    needs to split the tile stacks and unpad the features; `image_grid_thw`: Qwen2.5-VL's (frames, rows, columns)
    of patches per image, which splits the patches and places the 3-D positions)."""
    sample_inputs: tuple[str, ...] = ()
    """Processor outputs the forward needs once per sample with images, concatenated over the batch's samples
    (OneVision's `batch_num_images`: each image of a sample that has several becomes one untiled square, one
    that is alone its tiles; the processor and the forward both decide by it)."""
    packing: bool = True
    """Whether 1-D packing (position ids restarting per sample, `data.packing`) is valid: false for 3-D (M-)RoPE
    models, and for Gemma 3, whose image-block mask (token_type_ids) in transformers 5.24 undoes the packed
    samples' separation (measured: packed logits off by up to 0.6 from each sample's own)."""
    default_template: str = "vicuna_v1"
    """The template a recipe uses when the base names none (its tokenizer has no chat template)."""
    image_text: str = "<image>"
    """What a sample's `<image>` tag becomes in the prompt text: the text the model's processor puts there, with
    the image token (`config.image_token_id`) once; the encoder repeats that token as many times as the processor
    counts. LLaVA's processors expand the tag itself; Gemma 3's wraps its soft tokens in begin/end-of-image tokens
    and blank lines; Qwen2.5-VL's chat format wraps its pad token in vision start/end tokens; InternVL's processor wraps
    its context tokens in `<img>` `</img>`."""
    pad: bool = True
    """Whether `data.image_aspect: pad` is available: a merged export then pads through a LLaVA padding image
    processor inside the family's processor, which Gemma 3's processor cannot call (it passes its pan-and-scan
    options to its image processor). Families with `tiles` never pad."""
    image_prompt: str = "<image>"
    """What the model's processor takes in the text for one image, and what the chat template written into a merged
    export puts for an image part: Gemma 3's `<start_of_image>` (its processor expands it to `image_text`), Qwen2.5-VL's
    pad token between vision start/end tokens, InternVL's `<IMG_CONTEXT>` (expanded to `image_text`)."""
    token_types: str | None = None
    """The forward's per-token modality input (1 on image tokens, 0 elsewhere), made from input_ids for each batch:
    Gemma 3's `token_type_ids` (image tokens attend to their whole block, both ways), Qwen2.5-VL's
    `mm_token_type_ids` (where its 3-D M-RoPE positions come from). None when the forward takes none."""
    video_text: str | None = None
    """What a sample's `<video>` tag becomes in the prompt text, with the video token (`config.video_token_id`) once,
    which the encoder repeats as many times as the processor counts for the clip (OneVision's `<video>`, Qwen2.5-VL's
    video pad token between vision start/end tokens). None: the architecture takes no video, and a sample with one
    is refused at start-up."""
    video_inputs: tuple[str, ...] = ()
    """Processor outputs the forward needs beside `pixel_values_videos`, one row per clip, stacked over the batch's
    clips in sample order (Qwen2.5-VL's `video_grid_thw`, which splits the patches and places the 3-D positions, and
    `second_per_grid_ts`, the seconds between temporal patches that space their positions)."""
    video_token_type: int | None = None
    """The value `token_types` takes on video tokens (Qwen2.5-VL: 2, which `get_rope_index` reads as video, as the
    processor's `mm_token_type_ids` has it); None when video tokens are not marked."""

    @property
    def skip_quantization(self) -> list[str]:
        """`llm_int8_skip_modules`: full module names (transformers 5 anchors them at the start of the name;
        short names like "vision_tower" silently match nothing). Passing a list also drops transformers' own
        default skips, so lm_head is named here."""
        return [self.vision, self.projector, "lm_head"]

    @property
    def llm_prefix(self) -> str:
        return f"{self.language_model}."

    @property
    def projector_name(self) -> str:
        """The projector module's own name, what peft's `modules_to_save` matches (`multi_modal_projector`)."""
        return self.projector.rsplit(".", 1)[-1]

    @cached_property
    def _patterns(self) -> dict[str, re.Pattern]:
        # A module path at a name-segment boundary, so that peft's prefixes ("base_model.model.") and
        # wrappers ("modules_to_save.default.") around it do not matter.
        def at_boundary(path: str) -> re.Pattern:
            return re.compile(rf"(^|\.){re.escape(path)}(\.|$)")

        return {
            "projector": at_boundary(self.projector),
            "vision": at_boundary(self.vision),
            "llm": at_boundary(self.language_model),
            "extra": re.compile(rf"(^|\.)({'|'.join(map(re.escape, self.extra_trainable)) or '(?!)'})$"),
        }

    def part_of(self, name: str) -> str | None:
        """Which part a parameter or module name (peft-, DDP- or FSDP-wrapped or not) belongs to: `projector`,
        `extra` (an extra trainable parameter), `vision`, `llm`, or None (lm_head, anything else).

        The projector is asked first: in some architectures it lies inside the vision module."""
        name = _unwrapped(name)
        for part in ("projector", "extra", "vision", "llm"):
            if self._patterns[part].search(name):
                return part
        return None

    def is_module(self, name: str, part: str) -> bool:
        """Whether `name` (wrapped or not) is the module of a part itself (`vision`, `projector`, `llm`), not
        one inside it."""
        path = {"vision": self.vision, "projector": self.projector, "llm": self.language_model}[part]
        return re.search(rf"(^|\.){re.escape(path)}$", _unwrapped(name)) is not None

    def model_class(self):
        import transformers

        return getattr(transformers, self.class_name)


def _unwrapped(name: str) -> str:
    # FSDP and activation checkpointing insert these between a module and its children.
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


_ANYRES = dict(extra_trainable=("model.image_newline",), tiles=True, image_inputs=("image_sizes",))

FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family("llava", "LlavaForConditionalGeneration"),
        # LLaVA-NeXT (v1.6): AnyRes tiles, an unpadded grid of features with a learned newline per row.
        Family("llava_next", "LlavaNextForConditionalGeneration", **_ANYRES),
        # LLaVA-OneVision: AnyRes-max (features pooled down above a tile budget), usually a Qwen2 LLM.
        Family(
            "llava_onevision",
            "LlavaOnevisionForConditionalGeneration",
            **_ANYRES,
            sample_inputs=("batch_num_images",),
            default_template="chatml",
            video_text="<video>",
        ),
        # Qwen2.5-VL: a windowed ViT at each image's own resolution whose patch merger (the projector) lies inside the
        # vision module; 3-D M-RoPE positions, placed from mm_token_type_ids and image_grid_thw.
        Family(
            "qwen2_5_vl",
            "Qwen2_5_VLForConditionalGeneration",
            vision="model.visual",
            projector="model.visual.merger",
            tiles=True,
            image_inputs=("image_grid_thw",),
            packing=False,
            default_template="chatml",
            image_text="<|vision_start|><|image_pad|><|vision_end|>",
            image_prompt="<|vision_start|><|image_pad|><|vision_end|>",
            token_types="mm_token_type_ids",
            video_text="<|vision_start|><|video_pad|><|vision_end|>",
            video_inputs=("video_grid_thw", "second_per_grid_ts"),
            video_token_type=2,
        ),
        # Gemma 3: SigLIP, a projector that pools the patch features to a fixed count, bidirectional attention
        # inside each image block (token_type_ids).
        Family(
            "gemma3",
            "Gemma3ForConditionalGeneration",
            default_template="gemma",
            packing=False,
            pad=False,
            image_text="\n\n<start_of_image><image_soft_token><end_of_image>\n\n",
            image_prompt="<start_of_image>",
            token_types="token_type_ids",
        ),
        # InternVL (2.5, 3): InternViT tiles of the image's aspect-ratio grid plus a thumbnail, pixel-shuffled and
        # projected by an MLP into a Qwen2 LLM with plain 1-D RoPE and causal attention; the processor wraps each
        # image's context tokens in `<img>` `</img>`, which its token count includes.
        Family(
            "internvl",
            "InternVLForConditionalGeneration",
            tiles=True,
            default_template="chatml",
            image_text="<img><IMG_CONTEXT></img>",
            image_prompt="<IMG_CONTEXT>",
        ),
    )
}


def family_named(model_type: str) -> Family:
    """The entry for a `model_type`; an unsupported one is an error naming the supported ones."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise QllavaError(
            f"`{model_type}` models are not supported; supported architectures (config.json model_type): "
            f"{', '.join(FAMILIES)}"
        )
    return family


def family_of(config) -> Family:
    """The entry for a model config (a transformers config object, or config.json as a dict)."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return family_named(str(model_type))


def config_of_model(model: torch.nn.Module):
    """The top-level config of a loaded model of a supported family, through DDP / FSDP / peft wrappers."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "model_type", None) in FAMILIES:
            return config
    raise QllavaError(f"{type(model).__name__} is none of the supported architectures ({', '.join(FAMILIES)})")


def family_of_model(model: torch.nn.Module) -> Family:
    """The entry for a loaded model, through DDP / FSDP / peft wrappers."""
    return FAMILIES[config_of_model(model).model_type]


def image_tokens(processor, sizes: list[tuple[int, int]]) -> list[int]:
    """Image tokens the processor expands each image of (height, width) into when it is a sample's only image,
    as its own `__call__` does."""
    from qllava.data.images import input_size

    # transformers 5.24's LlavaProcessor counts from the image processor's crop_size even where it does not crop
    # (SigLIP's has none; a padding LlavaImageProcessor keeps a 224 px default with do_center_crop off), while
    # `__call__` counts from the pixels it made: tell it the size the pixels have. AnyRes processors count from
    # `size` and ignore it.
    height, width = input_size(processor.image_processor)
    kwargs = {"crop_size": {"height": height, "width": width}}
    counted = processor._get_num_multimodal_tokens(image_sizes=[list(s) for s in sizes], **kwargs)
    return [int(n) for n in counted.num_image_tokens]


def several_image_tokens(processor, family: Family, count: int) -> int | None:
    """Image tokens each image of a sample with `count` (> 1) images becomes where the family's processor
    treats such images alike whatever their size (OneVision: one untiled square and one newline each), else
    None: each counts by its size as when alone (`image_tokens`).

    `_get_num_multimodal_tokens` knows only the single-image count; `replace_image_token`, what `__call__`
    expands each image with, decides by the images per sample and, for several, reads nothing else (given
    nothing else, a transformers that changes that fails loudly here instead of miscounting)."""
    if "batch_num_images" not in family.sample_inputs:
        return None
    inputs = {"batch_num_images": [count]}
    return processor.replace_image_token(inputs, 0).count(processor.image_token)


IMAGE_INPUTS = tuple(sorted({key for family in FAMILIES.values() for key in family.image_inputs}))
"""Every architecture's extra image inputs: the keys a dataset item or batch may carry beside pixel_values."""
SAMPLE_INPUTS = tuple(sorted({key for family in FAMILIES.values() for key in family.sample_inputs}))
"""Every architecture's per-sample image inputs (`Family.sample_inputs`)."""
VIDEO_INPUTS = tuple(sorted({key for family in FAMILIES.values() for key in family.video_inputs}))
"""Every architecture's video inputs beside pixel_values_videos (`Family.video_inputs`)."""
VIDEO_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.video_text is not None)
"""The architectures that take video."""


def video_refusal(family: Family) -> str | None:
    """Why a sample with a video cannot train a family that takes none (None when it takes video)."""
    if family.video_text is not None:
        return None
    return f"`{family.model_type}` models take no video; architectures that take video: {', '.join(VIDEO_FAMILIES)}"


def _rows(tensor: torch.Tensor, dims: int) -> torch.Tensor:
    # An item holds one image's inputs as the processor makes them (a (2,) size, a (3,) grid) and several stacked.
    return tensor[None] if tensor.dim() < dims else tensor


def image_batch(items: list[dict]) -> dict:
    """The batch's image and video inputs from dataset items, samples and their images in order: pixel_values
    concatenated (an item's one image of 3 dims, or its stack of images or AnyRes tiles, `Family.tiles`), each
    of the family's `image_inputs` (one row per image) and `sample_inputs` (one per sample) concatenated;
    pixel_values None when no sample has an image. Clips (`video_batch`) join them when a sample has one."""
    batch = video_batch(items)
    with_image = [it for it in items if it["pixel_values"] is not None]
    if not with_image:
        return {"pixel_values": None} | batch
    # An item's one untiled image is (3, H, W); tile stacks, stacks of several images and Qwen2.5-VL's patch
    # blocks are concatenated as they are.
    pixels = [it["pixel_values"] for it in with_image]
    batch["pixel_values"] = torch.cat([p[None] if p.dim() == 3 else p for p in pixels])
    for key in IMAGE_INPUTS:
        if key in with_image[0]:
            batch[key] = torch.cat([_rows(it[key], 2) for it in with_image])
    for key in SAMPLE_INPUTS:
        if key in with_image[0]:
            batch[key] = torch.cat([it[key] for it in with_image])
    return batch


def video_batch(items: list[dict]) -> dict:
    """The clips of the items that have one, in sample order: pixel_values_videos and the family's `video_inputs`,
    each as the processor made it for one clip, concatenated (OneVision's (1, frames, 3, H, W) clips; Qwen2.5-VL's
    patch blocks); empty when no sample has a clip."""
    with_video = [it for it in items if it.get("pixel_values_videos") is not None]
    if not with_video:
        return {}
    keys = ("pixel_values_videos",) + tuple(key for key in VIDEO_INPUTS if key in with_video[0])
    return {key: torch.cat([it[key] for it in with_video]) for key in keys}


def forward_image_inputs(batch: dict, device: torch.device, dtype: torch.dtype, config) -> dict:
    """The forward's image and video keyword arguments from a collated batch and the model's config: pixel_values
    (and pixel_values_videos) in the vision dtype, the other image and video inputs (`image_sizes`, `batch_num_images`,
    `video_grid_thw`) as they are and, for a family with `token_types`, that input marking the batch's image (and
    video) tokens (from its input_ids), on `device`."""
    pixels = batch["pixel_values"]
    inputs = {"pixel_values": None if pixels is None else pixels.to(device, dtype)}
    if batch.get("pixel_values_videos") is not None:
        inputs["pixel_values_videos"] = batch["pixel_values_videos"].to(device, dtype)
    for key in IMAGE_INPUTS + SAMPLE_INPUTS + VIDEO_INPUTS:
        if batch.get(key) is not None:
            inputs[key] = batch[key].to(device)
    family = family_of(config)
    if family.token_types is not None:
        types = (batch["input_ids"] == config.image_token_id).long()
        if family.video_token_type is not None:
            types[batch["input_ids"] == config.video_token_id] = family.video_token_type
        inputs[family.token_types] = types.to(device)
    return inputs
