"""Compose a new LLaVA from a vision encoder and a language model (`qllava compose`).

The result is a standard `LlavaForConditionalGeneration` (`--arch llava`, LLaVA-1.5) or
`LlavaNextForConditionalGeneration` (`--arch llava_next`, LLaVA-NeXT's AnyRes) directory with its processor:
the encoder's and the LLM's weights unchanged, a freshly initialised projector (and, for NeXT, the row
separator `image_newline`), `<image>` (and `<pad>` when the LLM has none) added to the LLM's tokenizer, and the
chat template qllava trains with. As in LLaVA, the projector then needs aligning (stage 1: `plain` template,
captions) before instruction tuning.

The sources are loaded once and the LLaVA is assembled around the loaded modules (built on the meta
device, submodules assigned), so composing never holds two copies of the weights.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextProcessor,
    LlavaProcessor,
    SiglipVisionModel,
)
from transformers.models.llava_next import LlavaNextImageProcessorPil
from transformers.utils import logging as hf_logging

from qllava.data.images import input_size
from qllava.data.templates import TEMPLATES, chat_template
from qllava.errors import QllavaError
from qllava.model.families import family_named

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
# model_type -> (vision model class, vision_feature_select_strategy, tokens the encoder adds before the patches).
# A dual encoder (`clip`, `siglip`) contributes its vision_config and vision weights.
VISION_ENCODERS = {
    "clip_vision_model": (CLIPVisionModel, "default", 1),  # CLS token first: "default" drops it
    "siglip_vision_model": (SiglipVisionModel, "full", 0),  # patches only
}
DUAL_ENCODERS = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}
LLM_TYPES = ("llama", "mistral", "qwen2")
DEFAULT_TEMPLATES = {"llama": "vicuna_v1", "mistral": "mistral_instruct", "qwen2": "chatml"}
# projector name -> activation between linear_1 and linear_2 of transformers' LlavaMultiModalProjector
PROJECTORS = {"mlp2x_gelu": "gelu", "linear": "linear", "mlp1x_gelu": "linear"}
# --arch -> (config class, processor class); the model class is the family's (`qllava.model.families`).
ARCHS = {"llava": (LlavaConfig, LlavaProcessor), "llava_next": (LlavaNextConfig, LlavaNextProcessor)}


def anyres_pinpoints(side: int) -> list[list[int]]:
    """LLaVA-1.6's AnyRes grids for an encoder of `side` pixels: 1x2, 2x1, 2x2, 3x1 and 1x3 tiles ((height, width);
    336 -> [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], llava-v1.6's `image_grid_pinpoints`)."""
    return [[side * h, side * w] for h, w in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]


def _anyres_image_processor(encoder_processor, pinpoints: list[list[int]]):
    """NeXT's tiling image processor with the encoder's own input size, resizing, crop and normalisation: every
    tile, and the downscaled whole image, reach the encoder as its own processor would prepare them."""
    height, width = input_size(encoder_processor)
    size = encoder_processor.size
    return LlavaNextImageProcessorPil(
        size=dict(size) if "shortest_edge" in size else {"height": height, "width": width},
        crop_size={"height": height, "width": width},
        do_center_crop=bool(getattr(encoder_processor, "do_center_crop", False)),
        resample=encoder_processor.resample,
        do_rescale=encoder_processor.do_rescale,
        rescale_factor=encoder_processor.rescale_factor,
        do_normalize=encoder_processor.do_normalize,
        image_mean=list(encoder_processor.image_mean),
        image_std=list(encoder_processor.image_std),
        image_grid_pinpoints=pinpoints,
    )


def projector_activation(projector: str) -> str:
    """The `projector_hidden_act` that makes LlavaMultiModalProjector the named LLaVA projector."""
    if projector in PROJECTORS:
        return PROJECTORS[projector]
    deep = re.fullmatch(r"mlp(\d+)x_gelu", projector)
    if deep and int(deep.group(1)) >= 3:
        raise QllavaError(
            f"--projector {projector}: transformers' LlavaForConditionalGeneration has exactly two linear layers "
            "(linear_1, act, linear_2), so a deeper MLP would not load as a standard LLaVA; use mlp2x_gelu"
        )
    raise QllavaError(f"unknown --projector `{projector}`; choose one of {', '.join(PROJECTORS)}")


def _read_config(path: Path, option: str):
    if not (path / "config.json").is_file():
        raise QllavaError(
            f"{option} `{path}` is not a model directory (no config.json); "
            "download the checkpoint once and pass its local path"
        )
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, OSError, KeyError) as exc:
        raise QllavaError(f"{option} `{path}`: transformers cannot read its config.json ({exc})") from None


def _vision_config(path: Path):
    """(vision config, model_type of the checkpoint) for a vision-only or dual-encoder checkpoint."""
    config = _read_config(path, "--vision")
    kind = config.model_type
    if kind in DUAL_ENCODERS:
        return config.vision_config, kind
    if kind in VISION_ENCODERS:
        return config, kind
    supported = ", ".join([*VISION_ENCODERS, *DUAL_ENCODERS])
    raise QllavaError(f"--vision `{path}` is a `{kind}` model; supported vision encoders: {supported}")


def _stored_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


@contextlib.contextmanager
def _quiet_transformers():
    """Silence load reports: a dual encoder's text weights are expected to be left out; we check what is missing."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _load(model_class, path: Path, option: str, **kwargs):
    try:
        with _quiet_transformers():
            model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
    except OSError as exc:  # no weight files
        raise QllavaError(f"{option} `{path}`: cannot load its weights ({exc})") from None
    missing = sorted(info["missing_keys"]) + sorted(k for k, *_ in info.get("mismatched_keys", []))
    if missing:
        raise QllavaError(
            f"{option} `{path}`: the checkpoint lacks weights the model needs ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); is it a complete checkpoint?"
        )
    return model


def _tokenizer(llm: Path):
    """(the LLM's tokenizer with `<image>` registered as its image token and a pad token, tokens added)."""
    try:
        original = set(AutoTokenizer.from_pretrained(llm).get_vocab())
        # A `*_token` keyword registers a named special token (saved with the tokenizer, found by
        # LlavaProcessor as tokenizer.image_token) and adds it to the vocabulary when missing.
        tokenizer = AutoTokenizer.from_pretrained(llm, image_token=IMAGE_TOKEN)
    except (ValueError, OSError) as exc:
        raise QllavaError(f"--llm `{llm}`: no usable tokenizer in the directory ({exc})") from None
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer, [t for t in (IMAGE_TOKEN, PAD_TOKEN) if t in tokenizer.get_vocab() and t not in original]


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def compose_llava(
    vision: str | Path,
    llm: str | Path,
    out: str | Path,
    *,
    projector: str = "mlp2x_gelu",
    template: str | None = None,
    vision_feature_layer: int = -2,
    seed: int = 0,
    arch: str = "llava",
) -> Path:
    """Write a new LLaVA (vision encoder + projector + LLM) with its processor to `out`; return `out`.

    `vision`: a CLIP or SigLIP checkpoint, vision-only or dual encoder. `llm`: a Llama, Mistral or
    Qwen2 causal LM. `template`: the conversation template written as the chat template (default by
    LLM family); a training recipe's `data.template` must name the same one. `arch`: `llava` (one square
    image of the encoder's size) or `llava_next` (AnyRes tiles over LLaVA-1.6's grids for the encoder's size).
    Prints a summary.
    """
    vision, llm, out = Path(vision), Path(llm), Path(out)
    if arch not in ARCHS:
        raise QllavaError(f"unknown --arch `{arch}`; choose one of {', '.join(ARCHS)}")
    config_class, processor_class = ARCHS[arch]
    act = projector_activation(projector)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QllavaError(f"--out {out} exists and is not empty; choose a new directory (nothing was written)")
    vision_config, vision_kind = _vision_config(vision)
    vision_class, strategy, extra_tokens = VISION_ENCODERS[vision_config.model_type]
    layers = vision_config.num_hidden_layers
    if not -(layers + 1) <= vision_feature_layer <= layers:
        raise QllavaError(
            f"--vision-feature-layer {vision_feature_layer}: the encoder has {layers} layers, so hidden states "
            f"{-(layers + 1)}..{layers} (LLaVA-1.5 uses -2, the second to last)"
        )
    llm_config = _read_config(llm, "--llm")
    if llm_config.model_type not in LLM_TYPES:
        raise QllavaError(
            f"--llm `{llm}` is a `{llm_config.model_type}` model; supported language models: {', '.join(LLM_TYPES)}"
        )
    template = template or DEFAULT_TEMPLATES[llm_config.model_type]
    if template not in TEMPLATES:
        raise QllavaError(f"unknown --template `{template}`; choose one of {', '.join(TEMPLATES)}")
    if not (vision / "preprocessor_config.json").is_file():
        raise QllavaError(
            f"--vision `{vision}` has no preprocessor_config.json; the encoder's own image processor is needed"
        )
    image_processor = AutoImageProcessor.from_pretrained(vision)
    tokenizer, added_tokens = _tokenizer(llm)
    jinja = chat_template(template) if template != "tokenizer" else tokenizer.chat_template
    if not jinja:
        raise QllavaError(f"--template tokenizer: the tokenizer of `{llm}` has no chat_template; pick another one")

    dtype = _stored_dtype(llm_config)
    vision_model = _load(vision_class, vision, "--vision", config=vision_config, dtype=dtype)
    language_model = _load(AutoModelForCausalLM, llm, "--llm", dtype=dtype)
    rows = language_model.get_input_embeddings().weight.shape[0]
    needed = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    if needed > rows:
        # New rows are drawn around the mean of the old ones (transformers' mean_resizing); the old
        # rows are copied unchanged, lm_head is resized alike and re-tied when the LLM ties it.
        torch.manual_seed(seed)
        with _quiet_transformers():
            language_model.resize_token_embeddings(needed, mean_resizing=True)
    text_config = language_model.config
    if text_config.pad_token_id is None:
        text_config.pad_token_id = tokenizer.pad_token_id

    num_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    anyres = {}
    if arch == "llava_next":
        anyres = {"image_grid_pinpoints": anyres_pinpoints(vision_config.image_size)}
        image_processor = _anyres_image_processor(image_processor, anyres["image_grid_pinpoints"])
    config = config_class(
        vision_config=vision_model.config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=num_patches,
        projector_hidden_act=act,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=text_config.tie_word_embeddings,
        **anyres,
    )
    for sub in (config, config.text_config, config.vision_config):
        sub.dtype = dtype

    with torch.device("meta"):
        model = family_named(arch).model_class()(config)
    torch.manual_seed(seed)
    mm_projector = type(model.model.multi_modal_projector)(config)  # torch's default nn.Linear init
    if act == "linear":
        with torch.no_grad():  # identity second layer: the projector is exactly linear_1 at composition
            mm_projector.linear_2.weight.copy_(torch.eye(text_config.hidden_size))
            mm_projector.linear_2.bias.zero_()
    mm_projector.to(dtype)
    if arch == "llava_next":
        # LLaVA-1.6's (and transformers') initialisation of the learned row separator: normal, std 1/sqrt(hidden).
        newline = torch.randn(text_config.hidden_size) / text_config.hidden_size**0.5
        model.model.image_newline = torch.nn.Parameter(newline.to(dtype))
    model.model.vision_tower = vision_model
    model.model.multi_modal_projector = mm_projector
    model.model.language_model = language_model.model
    model.lm_head = language_model.lm_head
    model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise QllavaError(f"internal error: composed model has unassigned weights {left[:5]}")
    model.generation_config = language_model.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()

    tokenizer.chat_template = jinja
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra_tokens,
        chat_template=jinja,
    )

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    tmp.rename(out)

    encoder = vision_kind if vision_kind in VISION_ENCODERS else f"{vision_kind} (its vision tower)"
    counts = [_count(vision_model), _count(mm_projector), _count(language_model)]
    image = f"{num_patches} image tokens"
    newline = ""
    if arch == "llava_next":
        counts.insert(2, text_config.hidden_size)  # image_newline, trained with the projector
        newline = f" + image_newline {text_config.hidden_size:,}"
        grids = ", ".join(f"{h}x{w}" for h, w in anyres["image_grid_pinpoints"])
        image = f"AnyRes tiles over {grids} (+ newline), {num_patches} tokens per tile"
    print(
        f"qllava compose: {arch}: {encoder} {counts[0]:,} + projector {projector} {counts[1]:,}{newline} + "
        f"{llm_config.model_type} {counts[-1]:,} = {sum(counts):,} parameters ({str(dtype).removeprefix('torch.')})\n"
        f"  image: feature layer {vision_feature_layer}, strategy {strategy}, {image}, "
        f"<image> id {config.image_token_id}\n"
        f"  tokenizer: added {', '.join(added_tokens) or 'nothing'}; "
        f"embedding rows {rows} -> {text_config.vocab_size}\n"
        f"  template: {template} (the chat template; instruction tuning needs data.template={template}, "
        "stage-1 alignment uses plain)\n"
        f"  written to {out}",
        flush=True,
    )
    return out
