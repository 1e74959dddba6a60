"""Load a local LLaVA for QLoRA training: what is quantized, what trains and which kernel runs.

Each of these decisions lives here once and is printed at start-up (`describe`):
- the language model's linear layers are NF4 with double quantization (or 8-bit / 16-bit);
  the vision tower, the projector and lm_head are never quantized;
- LoRA adapters on the language model's linear layers only; the projector trains fully and is
  saved inside the adapter files (peft `modules_to_save`); everything else is frozen;
- non-reentrant gradient checkpointing; flash-attention for the LLM when it can run, else sdpa.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoProcessor, BitsAndBytesConfig

from qllava.errors import QllavaError
from qllava.model.extras import extra_trainable
from qllava.model.families import FAMILIES, Family, family_of, family_of_model
from qllava.model.fingerprint import check_trained_on
from qllava.model.precision import precision_for
from qllava.model.projector import load_projector, projector_checkpoint, projector_of
from qllava.recipe import Recipe

# LLaVA-1.5's names, kept for callers from before the family layer; the library reads the model's `Family`.
SKIP_QUANTIZATION = FAMILIES["llava"].skip_quantization
LLM_PREFIX = FAMILIES["llava"].llm_prefix
PROJECTOR = FAMILIES["llava"].projector_name


def resolve_attention(choice: str, device: torch.device) -> str:
    """`auto` -> flash_attention_2 when flash-attn imports and the GPU is Ampere or newer, else sdpa."""
    flash_ok = (
        device.type == "cuda"
        and importlib.util.find_spec("flash_attn") is not None
        and torch.cuda.get_device_capability(device)[0] >= 8
    )
    if choice == "auto":
        return "flash_attention_2" if flash_ok else "sdpa"
    if choice == "flash_attention_2" and not flash_ok:
        raise QllavaError(
            "model.attention=flash_attention_2 needs a CUDA GPU (Ampere or newer) and the flash-attn "
            "package (pip install 'qllava[flash]'); use model.attention=sdpa"
        )
    return choice


def _looks_like_hub_id(name: str) -> bool:
    """`org/name` with the Hub's characters, as `llava-hf/llava-1.5-7b-hf`."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None


def check_base(base: str | Path) -> Path:
    path = Path(base)
    if not (path / "config.json").is_file():
        if not path.exists() and path.parts[0] == "checkpoints":
            # The shipped recipes' bases: a local folder to download into (the recipe's header names the Hub id).
            raise QllavaError(
                f"model.base `{base}` does not exist yet; put the base there once, as the recipe's first lines say "
                f"(`hf download ORG/NAME --local-dir {base}` from huggingface_hub, installed with transformers, or "
                "`qllava compose ... --out` for a composed base)"
            )
        if not path.exists() and _looks_like_hub_id(str(base)):
            # qllava never downloads (offline by design): say how to fetch it once.
            local = f"checkpoints/{str(base).split('/')[-1]}"
            raise QllavaError(
                f"model.base `{base}` looks like a Hugging Face Hub id, but qllava loads local directories only; "
                f"download it once with `hf download {base} --local-dir {local}` (from huggingface_hub, installed "
                f"with transformers), then pass model.base={local}"
            )
        raise QllavaError(
            f"model.base `{base}` is not a model directory (no config.json); "
            "download the checkpoint once and pass its local path"
        )
    config = AutoConfig.from_pretrained(path)
    try:
        family_of(config)
    except QllavaError as exc:
        raise QllavaError(f"model.base `{base}`: {exc}") from None
    return path


def quantization_config(
    bits: int,
    dtype: torch.dtype,
    quant_storage: torch.dtype = torch.uint8,
    family: Family = FAMILIES["llava"],
) -> BitsAndBytesConfig | None:
    """`quant_storage`: the dtype the packed 4-bit bytes are viewed as (FSDP needs the compute dtype).
    `family`: whose vision tower, projector and lm_head stay unquantized."""
    skip = family.skip_quantization
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=quant_storage,
            llm_int8_skip_modules=skip,
        )
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return None


def guard_cpu_repack(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU-kernel layout.

    On CPUs with AVX512-BF16, an eval-mode forward without grad repacks the weight in place, and
    without the `kernels` package every later forward (training included) computes garbage
    (seen: a run that learned scored below chance after one evaluation pass).
    Must run on every model that does a 4-bit forward on CPU: training, evaluation, generation, merge.
    """
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_base(
    base: str | Path,
    *,
    bits: int,
    device: torch.device,
    attention: str = "auto",
    dtype: torch.dtype | None = None,
    fsdp: bool = False,
):
    """The base as trained: quantized LLM, 16/32-bit vision tower, projector and lm_head (the class and the
    module names are its family's).

    `dtype` (default: `precision_for(device)`'s, bf16 on GPU, fp32 on CPU) is the compute dtype and
    that of unquantized weights.
    `fsdp`: store the packed 4-bit weights as `dtype` instead of uint8, because FSDP cannot flatten
    integer tensors and needs one dtype per flat parameter; the 4-bit values are the same.
    """
    path = check_base(base)
    family = family_of(AutoConfig.from_pretrained(path))
    dtype = dtype or precision_for(device).dtype
    attn = resolve_attention(attention, device)
    device_map = {"": device.index if device.type == "cuda" and device.index is not None else device.type}
    model = family.model_class().from_pretrained(
        path,
        dtype=dtype,
        quantization_config=quantization_config(bits, dtype, dtype if fsdp else torch.uint8, family),
        device_map=device_map,
        attn_implementation={"text_config": attn, "vision_config": "sdpa" if attn == "flash_attention_2" else attn},
    )
    guard_cpu_repack(model)
    return model


def load_processor(base: str | Path):
    processor = AutoProcessor.from_pretrained(base)
    # qllava calls the image processor itself (an image at a time, in the dataset's workers): give it the settings the
    # processor's `__call__` passes it over its own saved ones (InternVL's turns on crop_to_patches, which its
    # preprocessor_config.json leaves off: called alone, the image processor would make one tile of every image).
    for key, value in getattr(type(processor), "images_kwargs", {}).items():
        setattr(processor.image_processor, key, value)
    if processor.tokenizer.pad_token_id is None:
        # LLaVA pads with unk when the tokenizer has no pad token; labels mask padding anyway.
        processor.tokenizer.pad_token = processor.tokenizer.unk_token or processor.tokenizer.eos_token
    return processor


def lora_targets(model: torch.nn.Module, target_modules) -> str:
    """A peft regex that selects the language model's linear layers (never vision tower or projector)."""
    linear_types = (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    prefix = family_of_model(model).llm_prefix
    available = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if name.startswith(prefix) and isinstance(m, linear_types)
        }
    )
    wanted = available if target_modules == "all-linear" else list(target_modules)
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise QllavaError(
            f"lora.target_modules {unknown} are not linear layers of the language model; available: {available}"
        )
    return rf"{re.escape(prefix)}.*\.({'|'.join(map(re.escape, wanted))})"


def load_for_training(recipe: Recipe, device: torch.device, *, fsdp: bool = False):
    """Return (model, processor) ready to train as the recipe says.

    With LoRA (stage 2, the default) the model is a peft model whose adapter holds the projector;
    with `lora.enabled: false` (stage 1) it is the plain LLaVA with only its projector trainable.
    `fsdp`: load the 4-bit weights in an FSDP-shardable storage dtype (see `load_base`).
    """
    trained_on = projector_checkpoint(recipe.model.projector_from) if recipe.model.projector_from else None
    if trained_on is not None:
        check_trained_on(
            trained_on,
            check_base(recipe.model.base),
            remedy="set model.base to the base it was trained on or, to use it anyway, copy its "
            "projector.safetensors out of the checkpoint and set model.projector_from to the copy",
        )
    model = load_base(
        recipe.model.base,
        bits=recipe.model.bits,
        device=device,
        attention=recipe.model.attention,
        dtype=precision_for(device, recipe.train.mixed_precision).dtype,
        fsdp=fsdp,
    )
    processor = load_processor(recipe.model.base)
    family = family_of_model(model)
    if recipe.model.projector_from:
        load_projector(model, recipe.model.projector_from)
    model.requires_grad_(False)
    if recipe.model.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # transformers (here) and peft for 16-bit bases (in get_peft_model) hook every sub-model's input
    # embeddings to require grad, the vision tower's patch embedding included: its whole forward
    # would then be kept for a backward pass that updates nothing. Non-reentrant checkpointing does
    # not need the hooks. Each call forgets the handles of the previous one, so each set is removed
    # right after it is made.
    model.disable_input_require_grads()
    if recipe.lora.enabled:
        config = LoraConfig(
            r=recipe.lora.r,
            lora_alpha=recipe.lora.alpha,
            lora_dropout=recipe.lora.dropout,
            target_modules=lora_targets(model, recipe.lora.target_modules),
            modules_to_save=[family.projector_name],
            bias="none",
        )
        torch.manual_seed(recipe.train.seed)
        model = get_peft_model(model, config)
        model.base_model.model.disable_input_require_grads()
        # Bare parameters peft cannot hold (NeXT's image_newline) train with the projector; `qllava.model.extras`
        # saves them into the adapter file.
        for param in extra_trainable(model).values():
            param.requires_grad_(True)
    else:
        # Stage 1 saves the projector alone (projector.safetensors), so the extra parameters stay as composed.
        projector_of(model).requires_grad_(True)
    # Trainable weights stay fp32 for the optimizer; autocast joins them to the 16-bit base on GPU.
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return model, processor


def set_train_mode(model: torch.nn.Module) -> None:
    """Train mode for the adapters; the frozen vision tower always runs in eval mode."""
    model.train()
    family = family_of_model(model)
    for name, module in model.named_modules():
        if family.is_module(name, "vision"):
            module.eval()


def _group(name: str, family: Family) -> str:
    if "lora_" in name:
        return "LoRA adapters"
    part = family.part_of(name)
    if part == "projector":
        if "modules_to_save" in name:
            return "projector (trained copy)"
        return "projector (frozen original)" if "original_module" in name else "projector"
    if part == "extra":
        return name.rsplit(".", 1)[-1]
    if part == "vision":
        return "vision tower"
    if "lm_head" in name:
        return "lm_head"
    if "embed_tokens" in name:
        return "LLM embeddings"
    if re.search(r"_proj\.(base_layer\.)?(weight|bias)$", name):
        return "LLM linear layers"
    return "LLM norms"


def parameter_groups(model: torch.nn.Module) -> dict[str, dict]:
    """Module group -> dtypes, quantized?, trainable parameter count, parameter count."""
    groups: dict[str, dict] = {}
    family = family_of_model(model)
    for name, param in model.named_parameters():
        g = groups.setdefault(_group(name, family), {"dtypes": set(), "quantized": False, "trainable": 0, "params": 0})
        quantized = isinstance(param, (bnb.nn.Params4bit, bnb.nn.Int8Params)) or param.dtype == torch.uint8
        # Two 4-bit values per byte of storage, whatever dtype the bytes are viewed as (uint8, or bf16 for FSDP).
        count = param.numel() * (2 * param.element_size() if isinstance(param, bnb.nn.Params4bit) else 1)
        g["dtypes"].add("nf4" if isinstance(param, bnb.nn.Params4bit) else str(param.dtype).replace("torch.", ""))
        g["quantized"] |= quantized
        g["params"] += count
        g["trainable"] += count if param.requires_grad else 0
    return groups


def describe(model: torch.nn.Module) -> str:
    """The start-up table: one row per module group."""
    rows = [("group", "dtype", "quantized", "trainable", "params")]
    for group, g in parameter_groups(model).items():
        rows.append(
            (
                group,
                ",".join(sorted(g["dtypes"])),
                "yes" if g["quantized"] else "no",
                f"{g['trainable']:,}",
                f"{g['params']:,}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
