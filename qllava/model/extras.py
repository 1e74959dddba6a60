"""The family's extra trainable parameters in the adapter file, beside the LoRA weights and the projector.

peft's `modules_to_save` holds modules, and LLaVA-NeXT's `model.image_newline` (the learned separator after
each row of image features) is a bare Parameter: peft would neither train nor save it. qllava trains it with
the projector, writes it into `adapter_model.safetensors` under its name in the peft model
(`base_model.model.model.image_newline`, the naming of peft's own keys), and restores it wherever qllava
loads an adapter (resume, chat, answer, merge). Plain `PeftModel.from_pretrained` ignores the extra key;
a merged export carries the trained value in the model itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qllava.errors import QllavaError
from qllava.model.families import family_of_model


def extra_trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The family's extra trainable parameters (`Family.extra_trainable`) by their name in `model` (peft
    prefixes included); empty for families without any."""
    family = family_of_model(model)
    if not family.extra_trainable:
        return {}
    return {name: param for name, param in model.named_parameters() if family.part_of(name) == "extra"}


def save_extras(model: torch.nn.Module, adapter_file: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Add the extra trainable parameters to an adapter file peft has written (`weights`: gathered values by
    name, which replace the model's own, as under FSDP)."""
    extras = {
        name: (weights[name] if weights is not None and name in weights else param).detach().float().cpu()
        for name, param in extra_trainable(model).items()
    }
    if not extras:
        return
    tensors = load_file(adapter_file)
    tensors.update({name: tensor.contiguous() for name, tensor in extras.items()})
    save_file(tensors, adapter_file, metadata={"format": "pt"})


def split_extras(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the extra trainable parameters from an adapter's tensors (peft would call them unexpected) and
    return them."""
    names = set(extra_trainable(model))
    return {name: tensors.pop(name) for name in list(tensors) if name in names}


@torch.no_grad()
def load_extras(model: torch.nn.Module, extras: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy saved extra parameters into `model`; an adapter of this family that lacks one is refused."""
    params = extra_trainable(model)
    missing = sorted(set(params) - set(extras))
    if missing:
        raise QllavaError(
            f"adapter `{source}` lacks {', '.join(missing)}, which this model trains beside the projector; "
            "was it trained on another architecture, or written by another tool?"
        )
    for name, param in params.items():
        if extras[name].shape != param.shape:
            raise QllavaError(
                f"adapter `{source}`: `{name}` has shape {tuple(extras[name].shape)}, the model needs "
                f"{tuple(param.shape)}; was it trained on another base?"
            )
        param.copy_(extras[name].to(param.dtype))
