"""What a training run logs: one step's figures, the window of steps a metrics line averages, the log.

A step's figures are summed over the processes in one all-reduce (`StepSums.over_processes`); the
window adds steps until `train.log_every` asks for a line; `MetricsLog` writes the line to
`metrics.jsonl` (and TensorBoard when installed) from the main process.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from accelerate import Accelerator


@dataclass
class StepSums:
    """One process's share of a step's logged figures: every field is summed over the processes."""

    loss: torch.Tensor | float = 0.0
    """Summed loss of this process's trained tokens."""
    tokens: torch.Tensor | float = 0.0
    """Tokens that ran (the attention mask's sum: padding excluded)."""
    truncated: torch.Tensor | float = 0.0
    """Samples cut by data.max_length."""
    stop_requested: float = 0.0
    """1 where this process saw a Ctrl-C: every process must take the same branch after the step."""
    grad_norm: torch.Tensor | float = 0.0
    """This process's 1/world_size share of the (already reduced, so equal) gradient norm."""

    def over_processes(self, accelerator: Accelerator) -> StepSums:
        """The sums over every process: one all-reduce and one host sync for all of them."""
        names = [f.name for f in fields(self)]
        local = [torch.as_tensor(getattr(self, name), dtype=torch.float64, device=accelerator.device) for name in names]
        return StepSums(**dict(zip(names, accelerator.reduce(torch.stack(local), "sum").tolist())))


@dataclass
class MetricsWindow:
    """Sums over the optimizer steps since the last metrics line."""

    loss: float = 0.0
    grad_norm: float = 0.0
    steps: int = 0
    empty_steps: int = 0
    """Steps without a trained token in the whole global batch: skipped, no update."""
    overflow_steps: int = 0
    """fp16 only: steps whose loss-scaled gradients overflowed; the scaler skipped the update."""
    nonfinite_steps: int = 0
    """Steps whose loss or gradient norm was NaN or inf: skipped, no update."""
    skipped: int = 0
    """Samples left out because their image could not be read (data.on_bad_sample=skip)."""
    tokens: int = 0
    truncated: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(
        self, sums: StepSums, trained_tokens: int, *, empty: bool, overflow: bool, nonfinite: bool, skipped: int
    ) -> None:
        """Add one step, whose `sums` are over the processes and whose global batch trained `trained_tokens`."""
        if not nonfinite:  # its loss would turn the line's mean into NaN
            self.loss += sums.loss / max(trained_tokens, 1)
        self.steps += 1
        self.empty_steps += int(empty)
        self.overflow_steps += int(overflow)
        self.nonfinite_steps += int(nonfinite)
        self.skipped += skipped
        self.tokens += int(sums.tokens)
        self.truncated += int(sums.truncated)
        self.grad_norm += sums.grad_norm

    def record(self, step: int, lrs: tuple[float | None, float | None], epoch: int) -> dict:
        with_loss = self.steps - self.empty_steps - self.nonfinite_steps
        updated = with_loss - self.overflow_steps
        record = {
            "step": step,
            "loss": self.loss / with_loss if with_loss else None,
            "grad_norm": self.grad_norm / updated if updated else None,
            "lr": lrs[0],
            "projector_lr": lrs[1],
            "tokens_per_s": self.tokens / (time.perf_counter() - self.start),
            "truncated": self.truncated,
            "empty_steps": self.empty_steps,
            "nonfinite_steps": self.nonfinite_steps,
            "skipped": self.skipped,
            "epoch": epoch,
        }
        if self.overflow_steps:
            record["overflow_steps"] = self.overflow_steps
        return record

    def sums(self) -> dict:
        """The window so far, as a checkpoint keeps it: the sums and the seconds it has run."""
        sums = {name: value for name, value in asdict(self).items() if name != "start"}
        return sums | {"seconds": time.perf_counter() - self.start}

    @classmethod
    def resumed(cls, sums: dict) -> MetricsWindow:
        """The window a checkpoint kept (`sums`), continued; empty for checkpoints written before they kept it."""
        sums = dict(sums)
        seconds = sums.pop("seconds", 0.0)
        return cls(**sums, start=time.perf_counter() - seconds)


class MetricsLog:
    """`metrics.jsonl` (one JSON object per line) and the trackers; the main process writes, the others skip."""

    def __init__(self, path: Path, accelerator: Accelerator, trackers: str | None) -> None:
        self.path, self.accelerator, self.trackers = path, accelerator, trackers

    def write(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
