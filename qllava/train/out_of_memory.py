"""What to do when a training step runs out of GPU memory: a smaller micro-batch, same samples per step.

The sampler's order depends on micro_batch x data.length_bucket (its buckets) and each optimizer step
takes micro_batch x grad_accum samples of it, so dividing the micro-batch by k and multiplying
grad_accum and length_bucket by k trains the same samples in every step, in smaller pieces: a
checkpoint resumes under it (`checkpoint.resumable_state`).
"""

from __future__ import annotations

from accelerate import Accelerator

from qllava.recipe import Recipe


def _gpu_bytes(accelerator: Accelerator) -> int | None:
    import torch

    if accelerator.device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(accelerator.device).total_memory


def _planned_micro_batch(recipe: Recipe, seq_len: int, budget: int | None) -> int | None:
    """The largest micro-batch `qllava plan` predicts to fit `budget` bytes at `seq_len` tokens (None: no GPU)."""
    if budget is None:
        return None
    from qllava.plan import largest_micro_batch, read_shape

    return largest_micro_batch(read_shape(recipe.model.base, max_image_tokens=seq_len), recipe, seq_len, budget)


def smaller_micro_batch(micro_batch: int, planned: int | None) -> int:
    """The largest divisor of `micro_batch` below it (and within `planned` when known); 0 when it is 1."""
    limit = micro_batch - 1 if planned is None else min(micro_batch - 1, planned)
    return max((d for d in range(1, limit + 1) if micro_batch % d == 0), default=0)


def out_of_memory_message(recipe: Recipe, step: int, batch: dict, accelerator: Accelerator) -> str:
    """One message: what failed, what `qllava plan` predicts for this GPU, and the command that resumes."""
    micro, accum = recipe.train.micro_batch_size, recipe.train.grad_accum
    seq_len = batch["input_ids"].shape[1]
    budget = _gpu_bytes(accelerator)
    planned = _planned_micro_batch(recipe, recipe.data.max_length, budget)
    shape = (
        f"{micro} sample(s) packed into {seq_len} tokens"
        if "position_ids" in batch
        else f"{micro} sample(s) x {seq_len} tokens"
    )
    failed = f"step {step} ran out of GPU memory in a micro-batch of {shape} (data.max_length={recipe.data.max_length})"
    if planned is not None:
        failed += (
            f"; `qllava plan` predicts micro-batch {planned} as the largest that fits this GPU's "
            f"{budget / 1e9:.0f} GB at {recipe.data.max_length} tokens"
        )
    smaller = smaller_micro_batch(micro, planned)
    if not smaller:
        return (
            f"{failed}. Micro-batch 1 does not fit: lower data.max_length, keep model.gradient_checkpointing on "
            "and train.loss_chunk_size above 0, or use a GPU with more memory"
        )
    k = micro // smaller
    settings = f"train.micro_batch_size={smaller} train.grad_accum={accum * k}"
    if recipe.data.length_bucket:  # unset, it follows grad_accum
        settings += f" data.length_bucket={recipe.data.length_bucket * k}"
    return (
        f"{failed}. Resume with {settings} (the same samples in every optimizer step, in smaller "
        f"micro-batches): qllava train {recipe.output.dir}/recipe.yaml train.resume=auto {settings}"
    )
