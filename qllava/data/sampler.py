"""Modality-length grouped sampling (LLaVA-1.5), distributed-aware, seeded and resumable mid-epoch.

Image and text-only samples are shuffled separately and cut into megabatches of
world_size * micro_batch; each megabatch is sorted by length so that a micro-batch holds samples of
similar length (less padding), and rank r takes every world_size-th sample of it, so ranks get
equal counts of similar lengths. Full megabatches of both kinds are then shuffled together; the
incomplete tails of the two kinds are mixed into the last megabatches. The order depends only on
(seed, epoch), so a run can resume mid-epoch by skipping the samples it has consumed.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


def _megabatches(indices: list[int], lengths: list[int], size: int) -> list[list[int]]:
    chunks = [indices[i : i + size] for i in range(0, len(indices), size)]
    return [sorted(chunk, key=lambda i: -abs(lengths[i])) for chunk in chunks]


class GroupedSampler(Sampler[int]):
    """Yields this rank's sample indices, in micro-batch order, for one epoch."""

    def __init__(
        self,
        lengths: list[int],
        micro_batch: int,
        *,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
        group_by_modality_length: bool = True,
    ) -> None:
        self.lengths = lengths
        self.micro_batch = micro_batch
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.grouped = group_by_modality_length
        self.epoch = 0
        self.skip = 0
        # Every rank yields the same number of full micro-batches; fewer than world_size * micro_batch
        # leftover samples per epoch are left out (a different few each epoch).
        self.num_samples = len(self.rank_stream())

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's order; `skip` samples of this rank's stream (already consumed) are left out."""
        self.epoch = epoch
        self.skip = skip

    def global_order(self) -> list[list[int]]:
        """The epoch's megabatches, each world_size * micro_batch long (the last ones may be shorter)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        mega = self.micro_batch * self.world_size
        if not self.grouped:
            perm = torch.randperm(len(self.lengths), generator=g).tolist()
            return [perm[i : i + mega] for i in range(0, len(perm), mega)]
        groups = []
        for keep in (lambda n: n > 0, lambda n: n <= 0):
            idx = [i for i, n in enumerate(self.lengths) if keep(n)]
            perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            groups.append(_megabatches(perm, self.lengths, mega))
        full = [mb for group in groups for mb in group if len(mb) == mega]
        tails = [i for group in groups for mb in group if len(mb) < mega for i in mb]
        order = torch.randperm(len(full), generator=g).tolist()
        return [full[i] for i in order] + _megabatches(tails, self.lengths, mega)

    def rank_stream(self) -> list[int]:
        stream = []
        for mb in self.global_order():
            if len(mb) < self.micro_batch * self.world_size:
                continue
            stream += mb[self.rank :: self.world_size]
        return stream

    def __iter__(self):
        return iter(self.rank_stream()[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip
