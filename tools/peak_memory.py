"""How the bench and the memory checks measure peak memory; one place, so their figures compare.

- `PeakMemory`: the peak over a stretch of real training, cheap enough to leave on while timing.
  CUDA: torch.cuda max allocated / reserved since `reset()`. CPU: the rise of the resident set's
  high-water mark (VmHWM) over the resident size at `reset()`; the mark is reset through
  /proc/self/clear_refs (Linux). The CPU figure counts what the allocator took from the system, so
  it includes allocator slack and is not comparable to tensor bytes.
- `tensor_peak(fn)`: the exact peak of live CPU tensor bytes while `fn` runs, for the planner and
  loss-memory checks: the bytes of every tensor alive before (`live_tensor_bytes`) plus the highest
  point of the running sum, in time order, of each profiler event's own (exclusive) memory change
  (torch.profiler, profile_memory=True; frees outside any op come as `[memory]` events). Slow: a
  profiled step takes several times as long as a plain one.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

MIB = 2**20


class PeakMemory:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._rss_at_reset = 0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # the high-water mark then holds since process start: an overestimate
        self._rss_at_reset = _status_kib("VmRSS")

    def read(self) -> tuple[float, float | None]:
        """(peak MiB, peak reserved MiB or None on CPU) since `reset()`."""
        if self.cuda:
            return torch.cuda.max_memory_allocated() / MIB, torch.cuda.max_memory_reserved() / MIB
        return max(0, _status_kib("VmHWM") - self._rss_at_reset) / 1024, None

    @property
    def method(self) -> str:
        return "torch.cuda max allocated / reserved" if self.cuda else "peak RSS (VmHWM) rise over the timed steps"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


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
    before = live_tensor_bytes() if include_live else 0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return before + peak
