"""Tiny LLaVA models built from configs, for the demo and the tests (nothing is downloaded).

The model is a real `LlavaForConditionalGeneration` (CLIP-style vision tower, Llama-style LLM,
mlp2x_gelu projector) with its own byte-level BPE tokenizer and a `LlavaProcessor`, saved as a
standard HF directory so that it goes through exactly the loading path of a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipConfig,
    SiglipModel,
    SiglipTextConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.clip import CLIPImageProcessorPil
from transformers.models.siglip import SiglipImageProcessorPil

from qllava.data.templates import TEMPLATE_TEXTS

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|im_start|>", "<|im_end|>"]
IMAGE_SIZE = 32
PATCH_SIZE = 8
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]


def _train_bpe(corpus: list[str], specials: list[str], *, unk: str, bos: str | None, vocab_size: int) -> Tokenizer:
    """Byte-level BPE trained on `corpus` plus the templates' fixed text; `bos` prefixed when given."""
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) + list(TEMPLATE_TEXTS), trainer=trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def build_tokenizer(corpus: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus` plus the templates' fixed text, Llama-style specials."""
    tok = _train_bpe(corpus, SPECIAL_TOKENS, unk="<unk>", bos="<s>", vocab_size=vocab_size)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        additional_special_tokens=["<image>", "<|im_start|>", "<|im_end|>"],
        model_max_length=512,
    )


LLAVA_1_5_7B = {
    "vision": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    ),
    "text": dict(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    ),
}
"""LLaVA-1.5-7B's shape (CLIP-L/336 vision tower, Llama-2-7B / Vicuna LLM), for `llava_config`."""


def llava_config(tokenizer, vision: dict, text: dict) -> LlavaConfig:
    """A LLaVA-1.5-style config (CLIP vision, Llama LLM, mlp2x_gelu, layer -2, CLS dropped) of the
    given shapes; the vocabulary is the tokenizer's unless `text` sets vocab_size."""
    vision_config = CLIPVisionConfig(**vision)
    text_config = LlamaConfig(
        **{
            "vocab_size": len(tokenizer),
            "tie_word_embeddings": False,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **text,
        }
    )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
    )


def llava_processor(tokenizer, image_size: int, patch_size: int) -> LlavaProcessor:
    """The processor of a `llava_config` model: CLIP normalization, the CLS token dropped."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def _tiny_dims(vision_hidden: int, text_hidden: int, text_layers: int, text_intermediate: int) -> tuple[dict, dict]:
    """(vision, text) config dimensions of the tiny models: 32 px images in 8 px patches, 2 vision layers."""
    vision = dict(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=vision_hidden,
    )
    text = dict(
        hidden_size=text_hidden,
        intermediate_size=text_intermediate,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return vision, text


def _save_random(model_class, config, tokenizer, out: Path, seed: int) -> None:
    """Save a `model_class` with weights drawn from `seed` that generates with `tokenizer`'s pad and eos."""
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)


def build_tiny_llava(
    out_dir: str | Path,
    corpus: list[str],
    *,
    seed: int = 0,
    vision_hidden: int = 64,
    text_hidden: int = 128,
    text_layers: int = 2,
    text_intermediate: int = 256,
) -> Path:
    """Create and save a randomly initialised tiny LLaVA with processor; return its directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(corpus)
    config = llava_config(tokenizer, *_tiny_dims(vision_hidden, text_hidden, text_layers, text_intermediate))
    _save_random(LlavaForConditionalGeneration, config, tokenizer, out, seed)
    llava_processor(tokenizer, IMAGE_SIZE, PATCH_SIZE).save_pretrained(out)
    return out


def build_tiny_vision(
    out_dir: str | Path, kind: str = "clip", *, hidden: int = 64, seed: int = 0, full: bool = False
) -> Path:
    """Save a random tiny CLIP or SigLIP vision encoder with its image processor; return its directory.

    `full` saves the dual encoder (CLIPModel / SiglipModel, text tower included), the form in which
    real encoders such as openai/clip-vit-large-patch14-336 are published.
    """
    if kind not in ("clip", "siglip"):
        raise ValueError(f"kind must be clip or siglip, not {kind!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    text = dict(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=4,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    if kind == "clip":
        vision = CLIPVisionConfig(**shape, projection_dim=hidden)
        if full:
            config = CLIPConfig(
                text_config=CLIPTextConfig(**text).to_dict(),
                vision_config=vision.to_dict(),
                projection_dim=hidden,
            )
            model = CLIPModel(config)
        else:
            model = CLIPVisionModel(vision)
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        )
    else:
        vision = SiglipVisionConfig(**shape)
        if full:
            config = SiglipConfig(text_config=SiglipTextConfig(**text).to_dict(), vision_config=vision.to_dict())
            model = SiglipModel(config)
        else:
            model = SiglipVisionModel(vision)
        image_processor = SiglipImageProcessorPil(
            size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD
        )
    model.save_pretrained(out)
    image_processor.save_pretrained(out)
    return out


# family -> (config class, model class, special tokens, bos, eos, pad, unk); Llama and Mistral have
# no pad token, like the released tokenizers, and none of them has <image>: compose adds those.
_TINY_LLMS = {
    "llama": (LlamaConfig, LlamaForCausalLM, ["<unk>", "<s>", "</s>"], "<s>", "</s>", None, "<unk>"),
    "mistral": (MistralConfig, MistralForCausalLM, ["<unk>", "<s>", "</s>"], "<s>", "</s>", None, "<unk>"),
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        None,
        "<|im_end|>",
        "<|endoftext|>",
        None,
    ),
}
TINY_LLM_CORPUS = ["What color is the shape?", "red blue green", "Describe the image.", "a red circle"]


def _tiny_llm_tokenizer(family: str, corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE as in `build_tokenizer`, with the family's own special tokens only."""
    *_, specials, bos, eos, pad, unk = _TINY_LLMS[family]
    tok = _train_bpe(corpus, specials, unk=unk, bos=bos, vocab_size=vocab_size)
    named = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **{k: v for k, v in named.items() if v is not None},
        additional_special_tokens=[t for t in specials if t not in named.values()],
        model_max_length=512,
    )


def build_tiny_llm(
    out_dir: str | Path,
    family: str = "llama",
    corpus: list[str] | None = None,
    *,
    hidden: int = 128,
    seed: int = 0,
    tie_word_embeddings: bool | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save a random tiny causal LM (llama, mistral or qwen2) with its tokenizer; return its directory.

    The tokenizer has no `<image>` (and Llama's and Mistral's no pad token), as released LLMs. Qwen2, like
    the released small ones, ties lm_head to the embeddings and pads its embedding matrix beyond the
    tokenizer (`tie_word_embeddings` overrides the family's default).
    """
    if family not in _TINY_LLMS:
        raise ValueError(f"family must be one of {', '.join(_TINY_LLMS)}, not {family!r}")
    config_class, model_class, *_ = _TINY_LLMS[family]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_llm_tokenizer(family, TINY_LLM_CORPUS if corpus is None else corpus, vocab_size=512)
    vocab_size = len(tokenizer)
    if family == "qwen2":
        vocab_size = 64 * (vocab_size // 64 + 2)  # padded: room for added tokens without a resize
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=family == "qwen2" if tie_word_embeddings is None else tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = model_class(config).to(dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# AnyRes grids of the tiny vision tower's 32 px tiles: 1x2, 2x1 and 2x2 tiles (LLaVA-NeXT's 336 px grid shrunk),
# so that images of different shapes get 3 or 5 tiles (the base image plus the grid).
NEXT_PINPOINTS = [[IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE], [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]
# OneVision's grids go up to 3 tiles a side; "anyres_max_2" pools the features of images whose grid holds more
# than about 2 tiles' worth, so that the tiny model exercises both of AnyRes-max's paths.
ONEVISION_PINPOINTS = [[IMAGE_SIZE * h, IMAGE_SIZE * w] for h in (1, 2, 3) for w in (1, 2, 3)]
ONEVISION_ASPECT = "anyres_max_2"


def build_tiny_llava_next(
    out_dir: str | Path,
    corpus: list[str],
    *,
    seed: int = 0,
    vision_hidden: int = 64,
    text_hidden: int = 128,
    text_layers: int = 2,
    text_intermediate: int = 256,
) -> Path:
    """Create and save a random tiny LLaVA-NeXT (v1.6: CLIP-style vision, Llama-style LLM, AnyRes over
    `NEXT_PINPOINTS`) with its `LlavaNextProcessor`; return its directory."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next import LlavaNextImageProcessorPil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(corpus)
    vision, text = _tiny_dims(vision_hidden, text_hidden, text_layers, text_intermediate)
    base = llava_config(tokenizer, vision, text)
    config = LlavaNextConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_id=base.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=NEXT_PINPOINTS,
        tie_word_embeddings=False,
    )
    _save_random(LlavaNextForConditionalGeneration, config, tokenizer, out, seed)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=NEXT_PINPOINTS,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(out)
    return out


def _require_torchvision(model: str, video_processor: str) -> None:
    """transformers builds the processors of models with a video path only with torchvision (their video processor)."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        raise RuntimeError(f"a {model} processor needs torchvision (transformers' {video_processor} requires it)")


def build_tiny_llava_onevision(
    out_dir: str | Path,
    corpus: list[str],
    *,
    seed: int = 0,
    vision_hidden: int = 64,
    text_hidden: int = 128,
    processor: bool = True,
) -> Path:
    """Create and save a random tiny LLaVA-OneVision (SigLIP-style vision, all its features; Qwen2-style LLM with
    tied, padded embeddings; chatml; AnyRes-max over `ONEVISION_PINPOINTS`) with its processor.

    transformers' `LlavaOnevisionProcessor` cannot be built, nor loaded, without torchvision (its video
    processor needs it); `processor=False` saves the tokenizer alone, enough to load the model (`load_base`).
    """
    if processor:
        _require_torchvision("LLaVA-OneVision", "LlavaOnevisionVideoProcessor")
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(corpus, specials, unk=None, bos=None, vocab_size=512),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        additional_special_tokens=["<|im_start|>", "<image>", "<video>"],
        model_max_length=512,
    )
    vision, text = _tiny_dims(vision_hidden, text_hidden, 2, 2 * text_hidden)
    vision.pop("projection_dim")
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**vision),
        text_config=Qwen2Config(
            **text,
            vocab_size=64 * (len(tokenizer) // 64 + 2),  # padded, as Qwen2's
            tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=ONEVISION_PINPOINTS,
        vision_aspect_ratio=ONEVISION_ASPECT,
        tie_word_embeddings=True,
    )
    _save_random(LlavaOnevisionForConditionalGeneration, config, tokenizer, out, seed)
    if not processor:
        tokenizer.save_pretrained(out)
        return out
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil, LlavaOnevisionVideoProcessor

    settings = dict(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
    LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(image_grid_pinpoints=ONEVISION_PINPOINTS, **settings),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(**settings),
        num_image_tokens=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=ONEVISION_ASPECT,
    ).save_pretrained(out)
    return out


GEMMA3_SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
GEMMA3_IMAGE_TOKENS = 4
"""Image tokens of the tiny Gemma 3: its projector pools the 4x4 patches of a 32 px image to 2x2."""


def build_tiny_gemma3(
    out_dir: str | Path, corpus: list[str], *, seed: int = 0, vision_hidden: int = 64, text_hidden: int = 128
) -> Path:
    """Create and save a random tiny Gemma 3 (SigLIP-style vision, Gemma 3 LLM with tied embeddings, the `gemma`
    turn format) with its `Gemma3Processor`; return its directory."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig
    from transformers.models.gemma3 import Gemma3ImageProcessorPil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(
            list(corpus) + ["user\n model\n"], GEMMA3_SPECIALS, unk="<unk>", bos="<bos>", vocab_size=512
        ),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        model_max_length=512,
    )
    vision, _ = _tiny_dims(vision_hidden, text_hidden, 2, 2 * text_hidden)
    vision.pop("projection_dim")
    vision["vision_use_head"] = False  # Gemma 3's SigLIP has no pooling head
    head_dim = text_hidden // 4
    config = Gemma3Config(
        vision_config=SiglipVisionConfig(**vision),
        text_config=Gemma3TextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden,
            intermediate_size=2 * text_hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        mm_tokens_per_image=GEMMA3_IMAGE_TOKENS,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.image_token_id,
        tie_word_embeddings=True,
    )
    _save_random(Gemma3ForConditionalGeneration, config, tokenizer, out, seed)
    image_processor = Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD
    )
    Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=GEMMA3_IMAGE_TOKENS
    ).save_pretrained(out)
    return out


def _qwen2_tokenizer(corpus: list[str], specials: list[str], **special_tokens) -> PreTrainedTokenizerFast:
    """A tiny Qwen2-style tokenizer (no BOS, chatml's end of turn as EOS, `<|endoftext|>` padding) with `specials`."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(corpus, specials, unk=None, bos=None, vocab_size=512),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=512,
        **special_tokens,
    )


def _qwen2_text(tokenizer, hidden: int, **settings) -> dict:
    """A tiny Qwen2-style LLM's text config (2 layers, 4 heads, 2 KV heads) for `tokenizer`, with `settings`."""
    return dict(
        vocab_size=64 * (len(tokenizer) // 64 + 2),  # padded, as Qwen2's
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )


QWEN2_5_VL_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def build_tiny_qwen2_5_vl(
    out_dir: str | Path,
    corpus: list[str],
    *,
    seed: int = 0,
    vision_hidden: int = 64,
    text_hidden: int = 128,
    processor: bool = True,
) -> Path:
    """Create and save a random tiny Qwen2.5-VL (its windowed ViT with the patch merger inside the vision module,
    Qwen2-style LLM with 3-D M-RoPE, chatml) with its `Qwen2_5_VLProcessor`; return its directory. Images keep
    their own resolution between 16x16 and 64x64 px (8 px patches, merged 2x2 into one token).

    transformers' `Qwen2_5_VLProcessor` cannot be built, nor loaded, without torchvision (its video processor
    needs it); `processor=False` saves the tokenizer alone, enough to load the model (`load_base`).
    """
    if processor:
        _require_torchvision("Qwen2.5-VL", "Qwen2VLVideoProcessor")
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _qwen2_tokenizer(corpus, QWEN2_5_VL_SPECIALS, additional_special_tokens=QWEN2_5_VL_SPECIALS[1:])
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=2,
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            num_heads=4,
            patch_size=PATCH_SIZE,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=2 * 2 * PATCH_SIZE,  # windows of 2x2 merged tokens
            out_hidden_size=text_hidden,
            fullatt_block_indexes=[1],
        ),
        text_config=_qwen2_text(
            tokenizer,
            text_hidden,
            # The temporal, height and width sections of the rotary half-dimension: 16 of head_dim 32 here
            # (Qwen2.5-VL-7B: 16, 24, 24 of 64).
            rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0},
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    _save_random(Qwen2_5_VLForConditionalGeneration, config, tokenizer, out, seed)
    if not processor:
        tokenizer.save_pretrained(out)
        return out
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor

    settings = dict(
        patch_size=PATCH_SIZE,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(**settings),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**settings),
    ).save_pretrained(out)
    return out


INTERNVL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
INTERNVL_TILE_TOKENS = 4
"""Image tokens per 32 px tile of the tiny InternVL: its 4x4 patches pixel-shuffled (downsample 0.5) to 2x2."""
INTERNVL_MAX_TILES = 4
"""Tiles of the tiny InternVL's grid (InternVL3: 12), plus a thumbnail of the whole image when there are several."""


def build_tiny_internvl(
    out_dir: str | Path, corpus: list[str], *, seed: int = 0, vision_hidden: int = 64, text_hidden: int = 128
) -> Path:
    """Create and save a random tiny InternVL (InternViT-style vision with pixel-shuffle downsampling, Qwen2-style LLM
    with tied, padded embeddings, chatml) with its `InternVLProcessor`; return its directory. Images become a grid of
    up to `INTERNVL_MAX_TILES` 32 px tiles chosen by their aspect ratio, plus a thumbnail.

    transformers' `InternVLProcessor` cannot be built, nor loaded, without torchvision (its video processor needs it).
    """
    _require_torchvision("InternVL", "InternVLVideoProcessor")
    from transformers import GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.internvl import InternVLVideoProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The processor finds its wrapper, context and video tokens by these names on the tokenizer, as on the released one.
    tokenizer = _qwen2_tokenizer(
        corpus,
        INTERNVL_SPECIALS,
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        additional_special_tokens=["<|im_start|>"],
    )
    tile = [IMAGE_SIZE, IMAGE_SIZE]
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=tile,
            patch_size=[PATCH_SIZE, PATCH_SIZE],
        ),
        text_config=_qwen2_text(tokenizer, text_hidden, model_type="qwen2", tie_word_embeddings=True),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=INTERNVL_TILE_TOKENS,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        tie_word_embeddings=True,
    )
    _save_random(InternVLForConditionalGeneration, config, tokenizer, out, seed)
    settings = dict(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    # crop_to_patches stays off in the image processor's own settings, as in the released preprocessor_config.json:
    # the processor turns it on for each call, which a direct call of the image processor would miss.
    InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(
            crop_to_patches=False, min_patches=1, max_patches=INTERNVL_MAX_TILES, **settings
        ),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(**settings),
        image_seq_length=INTERNVL_TILE_TOKENS,
    ).save_pretrained(out)
    return out
