"""Which base a checkpoint was trained on: recorded in every checkpoint, checked wherever it meets a base.

A LoRA adapter or a trained projector only reproduces its training on the weights it was trained
against. Put on another base of the same shapes, or on an export that already has it merged in, it
loads without an error and answers wrongly. So each checkpoint records its base (`BASE_RECORD`), and
chat, answer, merge and `model.projector_from` compare it with the base they are given.

The fingerprint reads no weights in full (a 7B base is 14 GB). It hashes:
- the layout: config.json's model_type and architectures, and every safetensors tensor's name, shape
  and dtype, from the files' headers;
- the weights: `SAMPLE_BYTES` from the middle of every tensor. A merged export has its base's names,
  shapes and dtype, but each matrix with LoRA merged in differs from the base's at every element, as
  does another fine-tune of the same architecture, so one sample per tensor tells them apart.
Cost: per safetensors file one header read, per tensor one read of `SAMPLE_BYTES`.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from qllava.errors import QllavaError

BASE_RECORD = "qllava_base.json"
"""Written into every checkpoint: the identity of the base it was trained on."""
MERGED_RECIPE = "qllava_recipe.yaml"
"""Written by `qllava merge` beside the export: how prompts were rendered in training."""
SAMPLE_BYTES = 64


@dataclass(frozen=True)
class BaseIdentity:
    path: str
    """Where the base was when fingerprinted; informative only (a moved copy is the same base)."""
    model_type: str
    architectures: list
    parameters: int
    layout: str
    """Hash of the architecture, tensor names, shapes and dtypes."""
    weights: str
    """Hash of a sample of every tensor's bytes."""

    def describe(self) -> str:
        return f"{self.path} ({self.model_type}, {self.parameters:,} parameters)"


def is_merged_export(model_path: str | Path) -> bool:
    return (Path(model_path) / MERGED_RECIPE).is_file()


def _header(file: Path) -> tuple[dict, int]:
    """A safetensors file's header (tensor name -> dtype, shape, data_offsets) and where its data starts."""
    with file.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def identify(base: str | Path) -> BaseIdentity:
    """The fingerprint of a model directory, read from its config.json and safetensors files."""
    path = Path(base)
    config = json.loads((path / "config.json").read_text())
    layout = hashlib.sha256(json.dumps([config.get("model_type"), config.get("architectures")]).encode())
    weights = hashlib.sha256()
    parameters = 0
    for file in sorted(path.glob("*.safetensors")):
        header, data_start = _header(file)
        with file.open("rb", buffering=0) as f:  # unbuffered: each sample reads its bytes, not a buffer's worth
            for name in sorted(header):
                info = header[name]
                begin, end = info["data_offsets"]
                layout.update(json.dumps([name, info["shape"], info["dtype"]]).encode())
                parameters += math.prod(info["shape"])
                f.seek(data_start + max(begin, (begin + end) // 2 - SAMPLE_BYTES // 2))
                weights.update(f.read(min(SAMPLE_BYTES, end - begin)))
    return BaseIdentity(
        path=str(path.resolve()),
        model_type=str(config.get("model_type")),
        architectures=config.get("architectures") or [],
        parameters=parameters,
        layout=layout.hexdigest(),
        weights=weights.hexdigest(),
    )


def record_base(base: str | Path, checkpoint: Path) -> None:
    """Write the base's identity into a checkpoint directory."""
    (checkpoint / BASE_RECORD).write_text(json.dumps(asdict(identify(base)), indent=2) + "\n")


def read_record(checkpoint: Path) -> BaseIdentity | None:
    """The recorded base of a checkpoint; None for one written before qllava recorded it."""
    file = checkpoint / BASE_RECORD
    return BaseIdentity(**json.loads(file.read_text())) if file.is_file() else None


def warn(message: str) -> None:
    print(f"qllava: warning: {message}", file=sys.stderr)


def _mismatch(checkpoint: Path, base: Path) -> str | None:
    """Why `checkpoint` does not belong on `base`, or None when it does (or cannot be told)."""
    record = read_record(checkpoint)
    if record is not None:
        current = identify(base)
        if (current.layout, current.weights) == (record.layout, record.weights):
            return None
    trained_on = f"`{checkpoint}` was trained on {record.describe() if record else 'its base'}"
    if is_merged_export(base):
        return (
            f"`{base}` is a merged export: it already has an adapter merged in ({MERGED_RECIPE}); {trained_on}, "
            "and applying it on top of an export would apply a fine-tune twice. Use the export alone"
        )
    if record is None:
        warn(f"`{checkpoint}` does not record its base (written before qllava did); assuming `{base}` is that base")
        return None
    if current.layout != record.layout:
        return (
            f"{trained_on}, and `{base}` is another model ({current.model_type}, {current.parameters:,} "
            "parameters: another architecture, or other tensor shapes or dtypes)"
        )
    return f"{trained_on}, and `{base}` has the same architecture and shapes but other weights (another fine-tune?)"


def check_trained_on(checkpoint: str | Path, base: str | Path, *, force: bool = False, remedy: str) -> None:
    """Refuse a checkpoint on a base it was not trained on (`remedy`: what to do); with `force`, warn instead."""
    problem = _mismatch(Path(checkpoint), Path(base))
    if problem is None:
        return
    if force:
        warn(f"{problem}; --force: loading it anyway")
        return
    raise QllavaError(f"{problem}; {remedy}")
