"""FSDP (version 1) for QLoRA: what is sharded, what is replicated, how a sharded run saves and resumes.

Selected by an accelerate config with `distributed_type: FSDP` (recipes/accelerate/fsdp-qlora.yaml).
Each decision fixes a failure seen with the installed torch / accelerate / peft / bitsandbytes:
- The packed 4-bit weights are stored as the compute dtype, not uint8 (`load_base(fsdp=True)`):
  FSDP cannot flatten integer tensors, and a flat parameter holds one dtype.
- FSDP units: each decoder layer of the LLM, and each trainable LoRA matrix on its own (peft's
  policy), since a flat parameter also holds one requires_grad and LoRA trains in fp32 beside 16-bit
  frozen weights. The layer class comes from the model (Llama, Mistral, Qwen2 ...), not from
  `_no_split_modules`, which for LLaVA names a class the model does not have.
- The vision tower and the projector stay out of FSDP, replicated as under DDP: a text-only batch
  skips them, and a rank that skips a sharded module's all-gather while another runs it deadlocks.
  Their gradients are averaged here once per optimizer step (`average_replicated_grads`).
- use_orig_params=False (with True, the full state dict fails on Linear4bit), so the optimizer is
  built on the wrapped model's flat parameters. FSDP's own mixed precision is off: bf16 autocast
  computes as under DDP, where FSDP's policy would reduce gradients in bf16 and cast every buffer
  (RoPE's inv_freq too) to bf16.
- A checkpoint holds the same adapter files as a DDP run (gathered unit by unit: the frozen base is
  never gathered) and FSDP's full optimizer state dict, keyed by parameter name.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from peft.utils.other import fsdp_auto_wrap_policy
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from transformers import AutoConfig

from qllava.errors import QllavaError
from qllava.model.families import FAMILIES, family_of
from qllava.model.load import check_base
from qllava.recipe import Recipe

DEEPSPEED_UNSUPPORTED = (
    "DeepSpeed is not supported by qllava's training loop (it accumulates gradients itself, which "
    "DeepSpeed's engine does not allow); use recipes/accelerate/ddp.yaml or fsdp-qlora.yaml"
)
_PREFIX = "_fsdp_wrapped_module."
# The vision towers and projectors (module names) of every family: each rank keeps them whole.
_REPLICATED = tuple(sorted({path.rsplit(".", 1)[-1] for f in FAMILIES.values() for path in (f.vision, f.projector)}))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def refuse_deepspeed() -> None:
    """`accelerate launch` with a DeepSpeed config sets ACCELERATE_USE_DEEPSPEED in every process."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise QllavaError(DEEPSPEED_UNSUPPORTED)


def enable_on_cpu(accelerator: Accelerator) -> None:
    """Let an FSDP config run on a CPU (gloo) process group, as CI does.

    accelerate 1.15 turns FSDP on only for GPU-like backends: on CPU processes it silently trains
    with DDP instead. FSDP itself runs on CPU, so qllava switches the state to FSDP with the plugin
    that accelerate would have built from the launcher's FSDP_* variables, and the device from
    `cpu:0` to `cpu` (FSDP checks that its device_id is the device the parameters are on).
    """
    if _env_flag("ACCELERATE_USE_FSDP") and accelerator.distributed_type == DistributedType.MULTI_CPU:
        for state in (accelerator.state, PartialState()):
            state.distributed_type = DistributedType.FSDP
            state.device = torch.device("cpu")
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()


def enabled(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def check(plugin: FullyShardedDataParallelPlugin, recipe: Recipe) -> None:
    """Every setting that breaks QLoRA under FSDP, reported at once before the model loads."""
    problems = []
    if plugin.fsdp_version != 1:
        problems.append("fsdp_version must be 1 (FSDP2 is not supported)")
    if plugin.use_orig_params:
        problems.append("fsdp_use_orig_params must be false (the full state dict fails on 4-bit layers with true)")
    if plugin.activation_checkpointing:
        problems.append(
            "fsdp_activation_checkpointing must be false: qllava checkpoints the decoder layers itself "
            "(model.gradient_checkpointing)"
        )
    if not recipe.lora.enabled:
        problems.append(
            "lora.enabled=false (stage 1) trains only the projector, which FSDP leaves replicated, and a rank "
            "whose batch has no image would skip the backward pass through the sharded layers; use DDP "
            "(recipes/accelerate/ddp.yaml)"
        )
    if recipe.optim.name not in ("auto", "adamw"):
        problems.append(
            f"optim.name={recipe.optim.name}: FSDP's optimizer state dict drops 8-bit optimizer states, so no "
            "checkpoint could resume; use optim.name=adamw (auto is adamw under FSDP)"
        )
    if recipe.model.bits == 8:
        problems.append("model.bits=8 cannot be sharded (FSDP cannot flatten int8 weights); use model.bits=4")
    family = family_of(AutoConfig.from_pretrained(check_base(recipe.model.base)))
    if family.extra_trainable:
        # FSDP1 leaves modules out of its units (the projector is replicated that way), not bare parameters: the
        # root unit would flatten the fp32 trained parameter with the 16-bit frozen embeddings ("uniform dtype").
        problems.append(
            f"`{family.model_type}` bases train {', '.join(family.extra_trainable)} beside the projector, a bare "
            "parameter that FSDP cannot keep out of its sharded root unit; use DDP (recipes/accelerate/ddp.yaml), "
            "where each process holds the whole 4-bit model"
        )
    if problems:
        raise QllavaError("the FSDP accelerate config does not work for qllava:\n  " + "\n  ".join(problems))


def decoder_layer_class(model: torch.nn.Module) -> str:
    """Class name of the LLM's decoder layers (LlamaDecoderLayer, MistralDecoderLayer, ...)."""
    for name, module in model.named_modules():
        if name.endswith("language_model.layers") and isinstance(module, torch.nn.ModuleList) and len(module):
            return type(module[0]).__name__
    raise QllavaError("FSDP: the model has no language_model.layers to shard; is it a LLaVA model?")


def prepare(accelerator: Accelerator, model: torch.nn.Module):
    """Wrap `model` in FSDP; return (wrapped model, replicated trainable parameters, a one-line summary)."""
    plugin = accelerator.state.fsdp_plugin
    replicated_modules = [m for name, m in model.named_modules() if name.endswith(_REPLICATED)]
    replicated_ids = {id(p) for m in replicated_modules for p in m.parameters()}
    sharded_total = sum(p.numel() for p in model.parameters() if id(p) not in replicated_ids)
    layer = decoder_layer_class(model)
    # peft's policy: each trainable leaf (a LoRA matrix) is a unit, and so is each module of the
    # classes named in FSDP_TRANSFORMER_CLS_TO_WRAP (its default, _no_split_modules, fails on LLaVA).
    previous = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
    os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] = layer
    try:
        plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
    finally:
        if previous is None:
            del os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"]
        else:
            os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] = previous
    plugin.ignored_modules = replicated_modules
    plugin.mixed_precision_policy = None
    wrapped = accelerator.prepare(model)
    replicated = [p for m in replicated_modules for p in m.parameters() if p.requires_grad]
    local = sum(p.numel() for p in wrapped.parameters() if id(p) not in replicated_ids)
    units = sum(1 for m in wrapped.modules() if isinstance(m, FSDP))
    summary = (
        f"FSDP {plugin.sharding_strategy.name} over {accelerator.num_processes} processes: {units} units "
        f"({layer}s, each LoRA matrix), vision tower and projector replicated; this process holds "
        f"{local:,} of {sharded_total:,} sharded parameter elements ({local / sharded_total:.0%})"
    )
    return wrapped, replicated, summary


def average_replicated_grads(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Average the replicated parameters' gradients over the ranks, as DDP does (a collective).

    A rank whose batches had no image has no projector gradient and adds zeros; a gradient that no
    rank has stays None, so the optimizer skips the projector that step as it would in one process.
    """
    if not params or world_size == 1:
        return
    device = params[0].device
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], device=device)
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [present])
    torch.distributed.all_reduce(flat)
    offset = 0
    for param, grad, seen in zip(params, grads, flat[-len(params) :].tolist()):
        size = grad.numel()
        if seen:
            param.grad = (flat[offset : offset + size] / world_size).view_as(param).to(param.dtype)
        offset += size


def gather_trainable(model: FSDP) -> dict[str, torch.Tensor]:
    """Every trainable parameter in full, named as peft sees it in the unwrapped model (a collective).

    Only the units that hold trainable weights are gathered, one at a time, never the frozen base.
    Rank 0 gets the tensors, on CPU; the other ranks an empty dict. The names keep the
    `_fsdp_wrapped_module.` of nested units, as peft's module names do (it selects adapter weights
    by module name); `strip_wrapper_names` removes them from the written file.
    """
    rank0 = torch.distributed.get_rank() == 0
    out = {}
    for name, unit in model.named_modules():
        if not isinstance(unit, FSDP) or not any(p.requires_grad for p in unit.module.parameters(recurse=False)):
            continue
        # Every rank gathers (a LoRA matrix is small): rank0_only=True fails in torch 2.13 on CPU.
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            if rank0:
                prefix = name.removeprefix(_PREFIX) + "."
                out.update({prefix + n: p.detach().cpu().clone() for n, p in unit.named_parameters()})
    if rank0:  # the replicated trainable parameters (projector) are plain ones
        for name, param in model.named_parameters():
            if param.requires_grad and not name.endswith("_flat_param"):
                out[name.removeprefix(_PREFIX)] = param.detach().cpu().clone()
    return out


def strip_wrapper_names(adapter_file: Path) -> None:
    """Rewrite an adapter file written from `gather_trainable`'s names with the names of a DDP run."""
    tensors = load_file(adapter_file)
    save_file({k.replace(_PREFIX, ""): v for k, v in tensors.items()}, adapter_file, metadata={"format": "pt"})


def _full_state_dicts(model: FSDP, rank0_only: bool):
    return FSDP.state_dict_type(
        model,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=True, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=True, rank0_only=rank0_only),
    )


def optimizer_state(model: FSDP, optimizer: torch.optim.Optimizer) -> dict:
    """The full optimizer state keyed by parameter name, on rank 0 (a collective: all ranks call it)."""
    with _full_state_dicts(model, rank0_only=True):
        return FSDP.optim_state_dict(model, optimizer)


def load_optimizer_state(model: FSDP, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Shard a state written by `optimizer_state` into this rank's optimizer (a collective)."""
    with _full_state_dicts(model, rank0_only=False):
        optimizer.load_state_dict(FSDP.optim_state_dict_to_load(model, optimizer, state))
