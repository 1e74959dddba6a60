"""Merge a trained checkpoint into a plain transformers LLaVA and verify it against base + adapter.

The adapter was trained against the dequantized NF4 weights, dequant(quant(W)), not W. Merging
into anything else changes the model (measured on a tiny LLaVA: re-quantizing after the merge keeps
58% of top-1 predictions; the original 16-bit weights drift). So by default each quantized linear layer is
dequantized exactly as the training forward did, its LoRA delta is added in fp32, and the result is
cast once to the export dtype. Tensors stream into safetensors shards one at a time: the only
whole model in memory is the quantized one (about 4 GB for a 7B LLM).

Verification runs fixed prompts (the recipe's own samples when their files are there, else seeded
synthetic ones) through the model as trained and through the export loaded with plain
`from_pretrained`: KL and max |logit diff| over every text position, top-1 agreement over the
positions that predict a reply token.
"""

from __future__ import annotations

import copy
import gc
import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from peft.utils.integrations import dequantize_bnb_weight
from PIL import Image
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import GenerationConfig
from transformers.core_model_loading import revert_weight_conversion

from qllava.data.dataset import IGNORE_INDEX, encoder_from_recipe, parse_sample, read_records
from qllava.data.images import images_inputs, open_rgb, processor_to_save, sizes_of
from qllava.data.templates import chat_template, end_of_turn
from qllava.data.validate import eval_image_folder
from qllava.errors import QllavaError
from qllava.generate import MERGED_RECIPE, attach_adapter
from qllava.model.families import Family, config_of_model, family_of, family_of_model, forward_image_inputs, image_batch
from qllava.model.fingerprint import check_trained_on
from qllava.model.load import check_base, load_base, load_processor
from qllava.model.precision import autocast_for, precision_for
from qllava.model.projector import PROJECTOR_FILE
from qllava.recipe import Recipe, dump_recipe, load_recipe, with_values
from qllava.train.checkpoint import give_weights_the_umask_mode, run_dir_hint

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
METHODS = ("dequantized", "original")
REPORT_FILE = "merge_report.json"
FAILED_MARKER = "VERIFICATION_FAILED"
SHARD_BYTES = 5 * 1024**3
# Verification passes when the export predicts the trained model's next reply token (nearly) always
# and the distributions over all text positions are close. Measured on the demo (README): the
# dequantized merge has mean KL 8e-13 (fp32) to 1.3e-4 (bf16); the merge into the original weights
# 1.4e-2; a merge into re-quantized weights keeps 58% of top-1 predictions
# on a tiny LLaVA (measured when this module was written).
MIN_TOP1_AGREEMENT = 0.97
MAX_MEAN_KL = 0.01


@dataclass
class MergeReport:
    checkpoint: str
    base: str
    method: str
    dtype: str
    verified: bool = False
    passed: bool | None = None
    prompts: str = ""
    prompt_source: str = ""
    """The data file the verification prompts came from, or `synthetic`."""
    positions: int = 0
    """Text positions compared (KL, max |logit diff|)."""
    reply_positions: int = 0
    """Of those, the positions that predict a reply token (top-1 agreement)."""
    max_abs_logit_diff: float | None = None
    mean_kl: float | None = None
    top1_agreement: float | None = None
    min_top1_agreement: float = MIN_TOP1_AGREEMENT
    max_mean_kl: float = MAX_MEAN_KL
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.verified:
            return f"merged ({self.method}, {self.dtype}); not verified (--no-verify)"
        verdict = "PASSED" if self.passed else "FAILED"
        top1 = (
            f"top-1 agreement on {self.reply_positions} reply tokens {self.top1_agreement:.4f} "
            f"(>= {self.min_top1_agreement})"
            if self.top1_agreement is not None
            else "no reply token in the prompts to judge top-1 agreement on (all cut by data.max_length?)"
        )
        return (
            f"verification {verdict} on {self.positions} text positions ({self.prompts}): {top1}, "
            f"mean KL {self.mean_kl:.2e} (<= {self.max_mean_kl}), max |logit diff| {self.max_abs_logit_diff:.2e}"
        )


def read_checkpoint(checkpoint: str | Path) -> Recipe:
    """The recipe a checkpoint was trained with, after checking the files a merge needs."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise QllavaError(f"checkpoint `{checkpoint}` not found; pass a checkpoint-STEP/ or final/ directory of a run")
    hint = run_dir_hint(path)
    if hint:
        raise QllavaError(hint)
    if (path / PROJECTOR_FILE).is_file():
        raise QllavaError(
            f"checkpoint `{checkpoint}` is from a stage-1 run (projector only, no LoRA): there is nothing to merge; "
            f"train stage 2 from it with model.projector_from={path}"
        )
    missing = [
        f for f in ("adapter_config.json", "adapter_model.safetensors", "recipe.yaml") if not (path / f).is_file()
    ]
    if missing:
        raise QllavaError(
            f"checkpoint `{checkpoint}` is incomplete (missing {', '.join(missing)}); "
            "pass a checkpoint-STEP/ or final/ directory written by `qllava train`"
        )
    return load_recipe(path / "recipe.yaml")


def _dense_weight(layer: torch.nn.Module) -> torch.Tensor:
    """A linear layer's weight as its forward computes with it: dequantized when 4/8-bit, fp32."""
    if isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
        return dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None)).float()
    return layer.weight.float()


def merged_tensors(model: torch.nn.Module, dtype: torch.dtype):
    """Yield (name, tensor) of the plain model: LoRA folded in, 4/8-bit weights dequantized, cast to dtype.

    Names are the module names of the transformers model (peft prefixes removed).
    """
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    done: list[str] = []
    seen: set[int] = set()

    def out(name: str, tensor: torch.Tensor):
        tensor = tensor.detach()
        return name, (tensor.to(dtype) if tensor.is_floating_point() else tensor).to("cpu").contiguous()

    for name, module in inner.named_modules():
        prefix = f"{name}." if name else ""
        if any(prefix.startswith(d) for d in done):  # inside a module already written whole
            continue
        if isinstance(module, ModulesToSaveWrapper):  # the trained projector replaces the original
            for pname, param in module.modules_to_save[module.active_adapter].named_parameters():
                yield out(prefix + pname, param)
            done.append(prefix)
        elif isinstance(module, (LoraLayer, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            base = module.get_base_layer() if isinstance(module, LoraLayer) else module
            weight = _dense_weight(base)
            if isinstance(module, LoraLayer):
                for adapter in module.active_adapters:
                    weight = weight + module.get_delta_weight(adapter).float()
            yield out(prefix + "weight", weight)
            if base.bias is not None:
                yield out(prefix + "bias", base.bias)
            done.append(prefix)
        else:
            for pname, param in module.named_parameters(recurse=False):
                if id(param) in seen:  # tied weights are stored once, as save_pretrained does
                    continue
                seen.add(id(param))
                yield out(prefix + pname, param)
            for bname, buffer in module.named_buffers(recurse=False):
                if bname not in module._non_persistent_buffers_set:
                    yield out(prefix + bname, buffer)


class ShardWriter:
    """Write tensors into safetensors shards of at most `max_bytes`, named and indexed as transformers does."""

    def __init__(self, out: Path, model: torch.nn.Module, max_bytes: int = SHARD_BYTES) -> None:
        self.out, self.model, self.max_bytes = out, model, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.names: set[str] = set()
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor
        self.names.add(name)
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        # Same key names as save_pretrained writes (transformers 5 reverts its load-time renaming, so
        # the export also loads in vLLM and older transformers).
        shard = revert_weight_conversion(self.model, self.pending)
        save_file(shard, self.out / f"shard-{len(self.shards)}.tmp", metadata={"format": "pt"})
        self.shards.append(list(shard))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        if len(self.shards) == 1:
            (self.out / "shard-0.tmp").rename(self.out / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            filename = f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            (self.out / f"shard-{i}.tmp").rename(self.out / filename)
            weight_map.update(dict.fromkeys(names, filename))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _plain_config(config, dtype: torch.dtype):
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    for sub in (config, config.text_config, config.vision_config):
        sub.dtype = dtype
    return config


def _save_processor(processor, recipe: Recipe, out: Path, family: Family) -> None:
    """Processor and tokenizer as trained, with the training template as the chat template (an image part as the
    family's processor takes it)."""
    template = chat_template(recipe.data.template, recipe.data.system_prompt, family.image_prompt)
    if template is not None:
        processor.chat_template = template
        processor.tokenizer.chat_template = template
    processor_to_save(processor, recipe.data.image_aspect, tiles=family.tiles).save_pretrained(out)
    tokenizer = processor.tokenizer
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=end_of_turn(recipe.data.template, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(out)


def _verification_inputs(recipe: Recipe, processor, config, count: int) -> tuple[str, str, list[dict]]:
    """(source, description, prompts): up to `count` fixed prompts, the recipe's eval samples topped up with
    its train samples (source: those files, joined by ` + `), else seeded synthetic ones (source: `synthetic`).
    A small eval set alone would leave too few reply tokens for top-1 agreement to mean anything: one
    near-tie flip among 16 tokens is 94%."""
    encoder = encoder_from_recipe(recipe, processor, config)
    family = family_of(config)
    inputs, used = [], []
    for source, image_folder in (
        (recipe.data.eval, eval_image_folder(recipe)),
        (recipe.data.train, recipe.data.image_folder),
    ):
        if not source or not Path(source).is_file() or len(inputs) == count or source in (s for s, _ in used):
            continue
        before = len(inputs)
        folder = Path(image_folder) if image_folder else None
        for i, record in enumerate(read_records(source)):
            if len(inputs) == count:
                break
            try:
                sample = parse_sample(record, i, source)
            except QllavaError:
                continue
            if sample.images and (folder is None or not all((folder / name).is_file() for name in sample.images)):
                continue
            if sample.videos:  # the verification passes images and text only, no clip inputs
                continue
            image = {"pixel_values": None}
            if sample.images:
                image = images_inputs(
                    [open_rgb(folder / name) for name in sample.images],
                    recipe.data.image_aspect,
                    processor.image_processor,
                    tiles=family.tiles,
                    sample_inputs=family.sample_inputs,
                )
            encoded = encoder.encode(sample, sizes_of(image))
            # Positions whose next token is a reply token: what the fine-tune was trained to predict.
            replies = [label != IGNORE_INDEX for label in encoded["labels"][1:]] + [False]
            inputs.append({"input_ids": encoded["input_ids"], **image, "replies": replies})
        if len(inputs) > before:
            used.append((source, len(inputs) - before))
    if inputs:
        described = " and ".join(f"{n} samples of {source}" for source, n in used)
        return " + ".join(source for source, _ in used), described, inputs
    rng = random.Random(0)
    for i in range(count):
        size = (rng.randint(16, 96), rng.randint(16, 96))
        image = Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3)))
        pixels = images_inputs(
            [image],
            recipe.data.image_aspect,
            processor.image_processor,
            tiles=family.tiles,
            sample_inputs=family.sample_inputs,
        )
        question = ("Describe the image.", "What is in the picture?", "What colors do you see?")[i % 3]
        ids = encoder.prompt_ids([("user", question)], images=1, image_sizes=sizes_of(pixels))
        inputs.append({"input_ids": ids, **pixels, "replies": [True] * len(ids)})
    return "synthetic", f"{count} synthetic prompts (the recipe's data files were not found)", inputs


@torch.no_grad()
def _text_logits(model, inputs: list[dict], image_token_id: int) -> torch.Tensor:
    """fp32 logits at every non-image position of the prompts, concatenated (batch size 1: no padding)."""
    device = next(model.parameters()).device
    family = family_of_model(model)
    dtype = next(p for n, p in model.named_parameters() if family.part_of(n) == "vision").dtype
    result = []
    for item in inputs:
        ids = torch.tensor([item["input_ids"]], device=device)
        images = forward_image_inputs(image_batch([item]) | {"input_ids": ids}, device, dtype, config_of_model(model))
        with autocast_for(model):
            logits = model(input_ids=ids, **images, use_cache=False)
        logits = logits.logits[0]
        result.append(logits[ids[0] != image_token_id].float().cpu())
    return torch.cat(result)


def _reply_mask(inputs: list[dict], image_token_id: int) -> torch.Tensor:
    """Which of the `_text_logits` rows predict a reply token."""
    return torch.tensor(
        [r for item in inputs for r, t in zip(item["replies"], item["input_ids"]) if t != image_token_id]
    )


def compare_logits(reference: torch.Tensor, merged: torch.Tensor, replies: torch.Tensor) -> dict:
    """KL and max |diff| over every text position; top-1 agreement where a reply token is predicted.

    Top-1 over all positions would count argmax flips at near-ties (a system prompt the model never
    learned to predict), which 16-bit rounding alone causes; the replies are what the fine-tune is for.
    """
    ref, new = reference.double(), merged.double()
    ref_logp, new_logp = ref.log_softmax(-1), new.log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - new_logp)).sum(-1)
    agree = ref.argmax(-1) == new.argmax(-1)
    return {
        "positions": ref.shape[0],
        "reply_positions": int(replies.sum()),
        "max_abs_logit_diff": (ref - new).abs().max().item(),
        "mean_kl": kl.mean().item(),
        # None (JSON null) when no prompt kept a reply token, e.g. every reply cut by data.max_length
        "top1_agreement": agree[replies].float().mean().item() if replies.any() else None,
    }


def merge_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    dtype: str = "bf16",
    method: str = "dequantized",
    verify: bool = True,
    verify_samples: int = 16,
    device: str = "auto",
    shard_bytes: int = SHARD_BYTES,
    min_top1_agreement: float = MIN_TOP1_AGREEMENT,
    max_mean_kl: float = MAX_MEAN_KL,
    base: str | Path | None = None,
    force: bool = False,
) -> MergeReport:
    """Write a plain transformers model directory (the base's class) at `out`; verify it unless told not to.

    `base`: where the base the checkpoint was trained on is now (default: its recipe's model.base). A
    base that is not the one the checkpoint records is refused; `force` merges anyway, with a warning.
    """
    if dtype not in DTYPES:
        raise QllavaError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if method not in METHODS:
        raise QllavaError(f"--method {method}: choose one of {', '.join(METHODS)}")
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and any(out.iterdir()):
        raise QllavaError(f"--out {out} exists and is not empty; choose a new directory (nothing was written)")
    recipe = read_checkpoint(checkpoint)
    if base is None and not (Path(recipe.model.base) / "config.json").is_file():
        raise QllavaError(
            f"the base `{checkpoint}` was trained on, {recipe.model.base}, is not there any more; "
            "pass where it is now with --base DIR"
        )
    base = check_base(base or recipe.model.base)
    check_trained_on(
        checkpoint, base, force=force, remedy="pass the base it was trained on with --base DIR, or --force to merge"
    )
    recipe = with_values(recipe, {"model.base": str(base)})
    torch_device = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else device.replace("auto", "cpu")
    )
    report = MergeReport(
        str(checkpoint),
        recipe.model.base,
        method,
        dtype,
        min_top1_agreement=min_top1_agreement,
        max_mean_kl=max_mean_kl,
    )

    trained_dtype = precision_for(torch_device, recipe.train.mixed_precision).dtype  # the base as trained
    model = attach_adapter(
        load_base(recipe.model.base, bits=recipe.model.bits, device=torch_device, dtype=trained_dtype), checkpoint
    )
    model.eval()
    processor = load_processor(checkpoint)
    config = model.get_base_model().config
    if verify:
        report.prompt_source, report.prompts, inputs = _verification_inputs(recipe, processor, config, verify_samples)
        if report.prompt_source == "synthetic":
            files = ", ".join(f for f in (recipe.data.eval, recipe.data.train, recipe.data.image_folder) if f)
            report.warnings.append(
                f"none of the recipe's samples could be read (moved or deleted? {files}): verification ran "
                f"{verify_samples} seeded synthetic prompts instead of your samples, so its figures say less about "
                "your data"
            )
        reference = _text_logits(model, inputs, config.image_token_id)
    if method == "original":
        # The 16-bit weights the base was quantized from, in the export dtype: one whole model in memory.
        del model
        gc.collect()
        base16 = load_base(recipe.model.base, bits=16, device=torch.device("cpu"), dtype=DTYPES[dtype])
        model = attach_adapter(base16, checkpoint)

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    inner = model.get_base_model()
    config = _plain_config(inner.config, DTYPES[dtype])
    with torch.device("meta"):  # the key set save_pretrained would write, without allocating weights
        expected = set(family_of(config).model_class()(config).state_dict())
    writer = ShardWriter(tmp, inner, shard_bytes)
    for name, tensor in tqdm(merged_tensors(model, DTYPES[dtype]), total=len(expected), desc="merging", unit="tensor"):
        writer.add(name, tensor)
    missing, unexpected = expected - writer.names, writer.names - expected
    if unexpected or (missing and not getattr(config, "tie_word_embeddings", False)):
        raise QllavaError(
            f"internal error: merged tensors do not match the model (missing {missing}, extra {unexpected})"
        )
    writer.close()
    config.save_pretrained(tmp)
    _save_processor(processor, recipe, tmp, family_of(config))
    dump_recipe(recipe, tmp / MERGED_RECIPE)
    give_weights_the_umask_mode(tmp)
    del model, inner, writer
    gc.collect()
    if out.exists():
        out.rmdir()
    tmp.rename(out)

    if verify:
        merged, info = (
            family_of(config)
            .model_class()
            .from_pretrained(
                out,
                dtype=DTYPES[dtype],
                device_map={"": torch_device.type if torch_device.index is None else torch_device.index},
                output_loading_info=True,
            )
        )
        wrong = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if wrong:
            raise QllavaError(f"the export in {out} does not load cleanly: {wrong}")
        merged.eval()
        merged_logits = _text_logits(merged, inputs, config.image_token_id)
        stats = compare_logits(reference, merged_logits, _reply_mask(inputs, config.image_token_id))
        report.verified = True
        for key, value in stats.items():
            setattr(report, key, value)
        top1 = stats["top1_agreement"]
        report.passed = (top1 is None or top1 >= min_top1_agreement) and stats["mean_kl"] <= max_mean_kl
        if not report.passed:
            (out / FAILED_MARKER).write_text(
                "This merged model does not reproduce the trained base + adapter within tolerance; "
                f"see {REPORT_FILE}.\n"
            )
    (out / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report
