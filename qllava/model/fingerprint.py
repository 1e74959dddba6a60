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
A base with no safetensors file has PyTorch `.bin` weights, whose tensors cannot be listed without
unpickling: each file counts by name and size in the layout, and by `FILE_SAMPLES` samples spread
over it in the weights.
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
FILE_SAMPLES = 64
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth")


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
        counted = f", {self.parameters:,} parameters" if self.parameters else ""  # 0: .bin weights only
        return f"{self.path} ({self.model_type}{counted})"


def is_merged_export(model_path: str | Path) -> bool:
    return (Path(model_path) / MERGED_RECIPE).is_file()


def _header(file: Path) -> tuple[dict, int]:
    """A safetensors file's header (tensor name -> dtype, shape, data_offsets) and where its data starts."""
    with file.open("rb") as f:
        start = f.read(8)
        size = struct.unpack("<Q", start)[0] if len(start) == 8 else -1
        try:
            # A size past the end of the file: a git-lfs pointer or a cut download, not weights.
            if not 0 < size <= file.stat().st_size - 8:
                raise ValueError(f"header size {size} for a file of {file.stat().st_size} bytes")
            header = json.loads(f.read(size))
        except ValueError as exc:
            raise QllavaError(
                f"`{file}` is not a readable safetensors file ({exc}); is the download complete (git lfs pull)?"
            ) from None
    header.pop("__metadata__", None)
    return header, 8 + size


def _hash_weights(path: Path, layout, weights) -> int:
    """Feed the weight files of `path` into the `layout` and `weights` hashes; return the parameters counted."""
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
    # transformers loads these only when there is no safetensors file (some repositories ship both).
    pickled = [] if parameters else sorted(f for pattern in PICKLED_WEIGHTS for f in path.glob(pattern))
    for file in pickled:
        size = file.stat().st_size
        layout.update(json.dumps([file.name, size]).encode())
        with file.open("rb", buffering=0) as f:
            for i in range(FILE_SAMPLES):
                f.seek(size * i // FILE_SAMPLES)
                weights.update(f.read(SAMPLE_BYTES))
    return parameters


def identify(base: str | Path) -> BaseIdentity:
    """The fingerprint of a model directory, read from its config.json and weight files."""
    path = Path(base)
    config = json.loads((path / "config.json").read_text())
    layout = hashlib.sha256(json.dumps([config.get("model_type"), config.get("architectures")]).encode())
    weights = hashlib.sha256()
    parameters = _hash_weights(path, layout, weights)
    return BaseIdentity(
        path=str(path.resolve()),
        model_type=str(config.get("model_type")),
        architectures=config.get("architectures") or [],
        parameters=parameters,
        layout=layout.hexdigest(),
        weights=weights.hexdigest(),
    )


def weights_digest(directory: str | Path) -> str:
    """One short hash of a directory's weights (an adapter's too): what was saved there, not where."""
    digest = hashlib.sha256()
    _hash_weights(Path(directory), digest, digest)
    return digest.hexdigest()[:16]


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
