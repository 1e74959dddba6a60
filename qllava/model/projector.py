"""The projector's own weights file: what stage 1 (projector alignment) writes and stage 2 starts from.

Stage 1 trains only the multimodal projector, so its checkpoints hold `projector.safetensors`
instead of a LoRA adapter. `model.projector_from` loads such a file (or LLaVA's own stage-1
`mm_projector.bin`) into the base before training, with a clear error when the shapes say it
was trained for another encoder or LLM.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qllava.errors import QllavaError
from qllava.model.families import family_of_model

PROJECTOR_FILE = "projector.safetensors"
# LLaVA's mlp2x_gelu is nn.Sequential(Linear, GELU, Linear): indices 0 and 2.
_LLAVA_NAMES = {"0": "linear_1", "2": "linear_2"}


def projector_of(model: torch.nn.Module) -> torch.nn.Module:
    """The projector module that trains (peft's trained copy when the model is wrapped)."""
    family = family_of_model(model)
    found = [m for name, m in model.named_modules() if family.is_module(name, "projector")]
    if not found:
        raise QllavaError(f"the model has no {family.projector}; is it a {family.model_type} model?")
    copies = getattr(found[0], "modules_to_save", None)  # peft's wrapper: the trained copy is "default"
    return copies["default"] if copies is not None else found[0]


def save_projector(model: torch.nn.Module, directory: Path) -> Path:
    """Write the projector's weights as `multi_modal_projector.*` tensors (its module name in the HF model)."""
    prefix = f"{family_of_model(model).projector_name}."
    state = {f"{prefix}{k}": v.detach().contiguous().cpu() for k, v in projector_of(model).state_dict().items()}
    path = Path(directory) / PROJECTOR_FILE
    save_file(state, str(path), metadata={"format": "pt"})
    return path


_ACCEPTED = (
    f"projector weights are read from a {PROJECTOR_FILE} (what a stage-1 run saves in its checkpoints) or "
    "LLaVA's stage-1 mm_projector.bin"
)


def _read(source: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors named like the module's own state dict (`linear_1.weight`, ...); `prefix`: the projector's
    module name and a dot, which a projector.safetensors puts before them."""
    if source.suffix == ".bin":
        try:
            raw = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling fails with many types (EOFError, KeyError, UnpicklingError, ...)
            raise QllavaError(f"{source} is not a PyTorch weights file ({type(exc).__name__}); {_ACCEPTED}") from None
        if not isinstance(raw, dict):
            raise QllavaError(f"{source} holds a {type(raw).__name__}, not a dict of weights; {_ACCEPTED}")
        out = {}
        for key, value in raw.items():
            match = re.search(r"mm_projector\.(\d+)\.(weight|bias)$", key)
            if not match or match.group(1) not in _LLAVA_NAMES:
                raise QllavaError(
                    f"{source}: `{key}` is not a weight of an mlp2x_gelu projector; only LLaVA's "
                    "mlp2x_gelu mm_projector.bin can be loaded"
                )
            out[f"{_LLAVA_NAMES[match.group(1)]}.{match.group(2)}"] = value
        return out
    try:
        raw = load_file(str(source))
    except SafetensorError as exc:
        raise QllavaError(f"{source} is not a safetensors file ({exc}); {_ACCEPTED}") from None
    return {k.split(prefix, 1)[1] if prefix in k else k: v for k, v in raw.items()}


def resolve_projector_file(source: str | Path) -> Path:
    path = Path(source)
    if path.is_dir():
        for name in (PROJECTOR_FILE, "mm_projector.bin"):
            if (path / name).is_file():
                return path / name
        raise QllavaError(
            f"model.projector_from `{source}` holds no {PROJECTOR_FILE} (a stage-1 run's final/ or "
            "checkpoint directory) nor mm_projector.bin"
        )
    if not path.is_file():
        raise QllavaError(f"model.projector_from `{source}` does not exist")
    return path


def projector_checkpoint(source: str | Path) -> Path | None:
    """The qllava checkpoint a projector source lies in (it records its base); None for a file of another origin."""
    folder = resolve_projector_file(source).parent
    return folder if (folder / "recipe.yaml").is_file() else None


@torch.no_grad()
def load_projector(model: torch.nn.Module, source: str | Path) -> Path:
    """Copy projector weights from `source` (file or directory) into the model's projector."""
    path = resolve_projector_file(source)
    tensors = _read(path, f"{family_of_model(model).projector_name}.")
    module = projector_of(model)
    expected = module.state_dict()
    if set(tensors) != set(expected):
        raise QllavaError(
            f"{path} holds {sorted(tensors)}, but this model's projector has {sorted(expected)}; "
            "was it trained for another projector type?"
        )
    for name, target in expected.items():
        if tensors[name].shape != target.shape:
            raise QllavaError(
                f"{path}: `{name}` has shape {tuple(tensors[name].shape)} but this model's projector needs "
                f"{tuple(target.shape)} (vision hidden {module.linear_1.in_features} -> LLM hidden "
                f"{module.linear_1.out_features}); it was trained for another vision encoder or LLM"
            )
    for name, param in module.state_dict(keep_vars=True).items():
        param.copy_(tensors[name].to(param.dtype))
    return path
