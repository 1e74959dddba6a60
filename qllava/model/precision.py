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


def autocast_for(model: torch.nn.Module):
    """The autocast a loaded model's forward needs outside training: that of its 16-bit base, where the base
    meets fp32 trained weights (LoRA, projector) as in training (`precision_for` loads the base in the autocast
    dtype); none for an fp32 base."""
    weight = model.get_input_embeddings().weight
    if weight.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(weight.device.type, dtype=weight.dtype)


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
    CPU: fp32 weights; an explicit bf16 autocasts over them (training refuses fp16 off CUDA, see
    `qllava.train.loop.make_accelerator`; an fp16-trained adapter still loads here, on fp32 weights).
    """
    if not gpu_layout(device):
        return Precision(torch.float32, "no" if mixed_precision == "auto" else mixed_precision)
    if mixed_precision == "auto":
        # Native bf16 only: torch's default also says yes where bf16 is emulated (T4, V100, RTX 20xx), slowly.
        bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)
        mixed_precision = "bf16" if bf16 else "fp16"
    dtype = _AUTOCAST.get(mixed_precision, torch.float32)
    return Precision(dtype, mixed_precision)
