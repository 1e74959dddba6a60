"""Optimizer parameter groups, optimizers and learning-rate schedules."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from qllava.errors import QllavaError
from qllava.model.families import family_of_model
from qllava.model.precision import gpu_layout
from qllava.recipe import Recipe


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    # Biases and norm weights (1-D) are not decayed; LoRA and projector matrices are.
    if name.endswith("_flat_param"):
        # FSDP: a 1-D flat parameter that holds one LoRA matrix (qllava's FSDP units; LoRA has no bias).
        return False
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name


def param_groups(model: torch.nn.Module, recipe: Recipe) -> list[dict]:
    """LoRA at optim.lr, projector (and the family's extra trainables) at optim.projector_lr; no weight decay
    on biases and norms."""
    buckets: dict[tuple[str, bool], list] = {}
    family = family_of_model(model)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # The family's extra trainable parameters (NeXT's image_newline) belong to the projector's features.
        kind = "projector" if family.part_of(name) in ("projector", "extra") else "lora"
        buckets.setdefault((kind, _no_decay(name, param)), []).append(param)
    groups = []
    for (kind, no_decay), params in sorted(buckets.items()):
        groups.append(
            {
                "params": params,
                "lr": recipe.optim.projector_lr if kind == "projector" else recipe.optim.lr,
                "weight_decay": 0.0 if no_decay else recipe.optim.weight_decay,
                "name": f"{kind}{'_no_decay' if no_decay else ''}",
            }
        )
    if not groups:
        raise QllavaError("no trainable parameters: check lora.target_modules")
    return groups


def resolve_optimizer(name: str, device: torch.device, fsdp: bool = False) -> str:
    """`auto` -> paged 8-bit AdamW on CUDA, AdamW on CPU and under FSDP (8-bit states do not shard).

    The GPU layout on a CPU (`qllava.model.precision`) takes the CUDA choice: bitsandbytes then runs
    its 8-bit AdamW without paging, which the GPU-layout tests exercise.
    """
    if name == "auto":
        return "paged_adamw_8bit" if gpu_layout(device) and not fsdp else "adamw"
    if fsdp and name != "adamw":
        raise QllavaError(
            f"optim.name={name} does not work under FSDP: FSDP's optimizer state dict drops its 8-bit "
            "states, so no checkpoint could resume; use optim.name=adamw (or auto)"
        )
    return name


def build_optimizer(
    model: torch.nn.Module, recipe: Recipe, device: torch.device, fsdp: bool = False
) -> torch.optim.Optimizer:
    """The optimizer over `model`'s trainable parameters (under FSDP: the wrapped model's flat ones)."""
    groups = param_groups(model, recipe)
    name = resolve_optimizer(recipe.optim.name, device, fsdp)
    betas = tuple(recipe.optim.betas)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.optim.lr, betas=betas)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, lr=recipe.optim.lr, betas=betas)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, total_steps: int):
    warmup = math.ceil(recipe.optim.warmup_ratio * total_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[recipe.optim.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
