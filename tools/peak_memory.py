"""How the bench and the memory checks measure peak memory; one place, so their figures compare.

- `tensor_peak(fn)` / `PeakMemory.step()` on the CPU: the peak of live CPU tensor bytes while `fn`
  (or the `with` block) runs: the bytes of every tensor alive before (`live_tensor_bytes`: weights,
  quantization constants, optimizer states) plus the highest point of the running sum of every
  tensor allocation and free that torch.profiler's memory timeline records, in order. Summing each
  op's net (exclusive) memory change instead misses what an op allocates and frees inside itself:
  for the loss on 2048 positions of a 32064 vocabulary that read 501 MiB where the timeline reads
  751 MiB (`PYTHONPATH=. python tools/loss_memory.py`). Slow: a profiled step takes several times as
  long as a plain one, so the bench profiles one extra, untimed step.
- `PeakMemory` on CUDA: torch.cuda max allocated / reserved since `reset()`, the same quantity
  (tensor bytes, allocator slack aside) measured by the allocator itself, plus the paged optimizer
  states bitsandbytes created since the PeakMemory was made: they live in CUDA managed memory that
  torch's allocator never sees (a rank-128 7B LLaVA's 8-bit AdamW states: about 0.65 GB), counted
  in full as `qllava plan` counts them.
"""

from __future__ import annotations

import contextlib
import gc

import torch

MIB = 2**20


class PeakMemory:
    """CUDA: the allocator's peak since `reset()`. CPU: the tensor peak of the last `step()` block."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._cpu_peak: int | None = None
        self._paged_before = len(_paged_tensors())

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    @contextlib.contextmanager
    def step(self):
        """Wrap one training step; on the CPU it is profiled (slow: do not time it)."""
        if self.cuda:
            yield
            return
        with _timeline() as peak:
            yield
        self._cpu_peak = peak()

    def read(self) -> tuple[float | None, float | None]:
        """(peak MiB, peak reserved MiB; None where not measured)."""
        if self.cuda:
            paged = sum(t.numel() * t.element_size() for t in _paged_tensors()[self._paged_before :])
            return (torch.cuda.max_memory_allocated() + paged) / MIB, (torch.cuda.max_memory_reserved() + paged) / MIB
        return (None if self._cpu_peak is None else self._cpu_peak / MIB), None

    @property
    def method(self) -> str:
        if self.cuda:
            return (
                "torch.cuda max allocated / reserved over the timed steps and the memory step, + paged optimizer states"
            )
        return "CPU tensor peak of one extra, untimed step on the same micro-batch for every row (tools/peak_memory.py)"


def _paged_tensors() -> list:
    """Every paged optimizer state bitsandbytes has made in this process (its global page manager)."""
    from bitsandbytes.functional import GlobalPageManager

    return GlobalPageManager.get_instance().paged_tensors


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every CPU tensor reachable by the garbage collector."""
    gc.collect()
    seen = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        except Exception:  # noqa: BLE001 - tensor subclasses without a plain storage
            continue
    return sum(seen.values())


def tensor_peak(fn, *, include_live: bool = True) -> int:
    """Peak bytes of live CPU tensors while `fn` runs (those alive before included unless told not)."""
    with _timeline(include_live) as peak:
        fn()
    return peak()


@contextlib.contextmanager
def _timeline(include_live: bool = True):
    # The timeline is torch's private memory profiler (torch.profiler._memory_profiler, torch 2.13);
    # it needs shapes and stacks recorded to follow each allocation.
    from torch.profiler._memory_profiler import Action

    before = live_tensor_bytes() if include_live else 0
    result: list[int] = []
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        yield lambda: result[0]
    running = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            running += size
        elif action == Action.DESTROY:
            running -= size
        peak = max(peak, running)
    result.append(before + peak)
