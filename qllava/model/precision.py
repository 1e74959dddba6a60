"""Which dtypes a run computes in: one decision for training, evaluation, generation and merge.

On a GPU the base's unquantized weights (vision tower, projector copy, embeddings, lm_head) and the
4-bit compute are bf16, the trained weights stay fp32 for the optimizer, and bf16 autocast joins the
two. On a CPU everything is fp32 and nothing autocasts.

`QLLAVA_GPU_LAYOUT=1` makes a CPU take the GPU's decision (bf16 weights, fp32 trainables, bf16
autocast). The GPU-layout test tier runs the real paths that way, so a dtype mismatch that would
crash every GPU run fails on a CPU first. It is a developer setting: bf16 on a CPU is slow.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

GPU_LAYOUT_ENV = "QLLAVA_GPU_LAYOUT"
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype
    """The base's unquantized weights and the 4-bit layers' compute dtype."""
    mixed_precision: str
    """accelerate's setting: bf16 or fp16 autocast around the forward, or no."""
    device_type: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _AUTOCAST.get(self.mixed_precision)

    def autocast(self):
        """The autocast the training forward runs under, for forwards outside accelerate's wrapper."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)


def gpu_layout(device: torch.device) -> bool:
    """Whether `device` gets the GPU's dtypes: on CUDA, or on a CPU under QLLAVA_GPU_LAYOUT=1."""
    return device.type == "cuda" or os.environ.get(GPU_LAYOUT_ENV) == "1"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def precision_for(device: torch.device, mixed_precision: str = "auto") -> Precision:
    """The dtypes for `device` and the recipe's `train.mixed_precision` (auto, bf16, fp16, no).

    GPU layout: `auto` is bf16 where the GPU has it, else fp16; the base is loaded in the autocast
    dtype, so the frozen weights and the autocast agree. `no` loads the base in fp32 (4-bit compute
    too): without autocast, bf16 frozen weights would meet the fp32 trained projector and fail.
    CPU: fp32 weights; an explicit bf16 autocasts over them.
    """
    if not gpu_layout(device):
        return Precision(torch.float32, "no" if mixed_precision == "auto" else mixed_precision, device.type)
    if mixed_precision == "auto":
        bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
        mixed_precision = "bf16" if bf16 else "fp16"
    dtype = _AUTOCAST.get(mixed_precision, torch.float32)
    return Precision(dtype, mixed_precision, device.type)
