"""Modality-length grouped sampling (LLaVA-1.5), distributed-aware, seeded and resumable mid-epoch.

Image and text-only samples are shuffled separately and cut into buckets of
length_bucket * world_size * micro_batch samples; each bucket is sorted by length and cut into
megabatches of world_size * micro_batch, so that a micro-batch holds samples of similar length (less
padding), and rank r takes every world_size-th sample of a megabatch, so ranks get equal counts of
similar lengths. Full buckets of both kinds are then shuffled together; the samples of incomplete
buckets are mixed into the last megabatches. With length_bucket 1 this is LLaVA-1.5's code for one
process. The training loop passes length_bucket = grad_accum, so that a bucket is one optimizer
step: a single-modality global batch sorted by length, which is what LLaVA-1.5's 8-GPU runs (global
batch 128 = one megabatch) trained on. The order depends only on (seed, epoch), so a run can resume
mid-epoch by skipping the samples it has consumed.
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
        length_bucket: int = 1,
    ) -> None:
        self.lengths = lengths
        self.micro_batch = micro_batch
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.grouped = group_by_modality_length
        self.length_bucket = length_bucket
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
        full, tails = [], []
        size = mega * self.length_bucket
        for keep in (lambda n: n > 0, lambda n: n <= 0):
            idx = [i for i, n in enumerate(self.lengths) if keep(n)]
            perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            for bucket in _megabatches(perm, self.lengths, size):
                if len(bucket) == size:
                    full.append([bucket[i : i + mega] for i in range(0, size, mega)])
                else:
                    tails += bucket
        # Whole buckets are shuffled, their megabatches kept together: with length_bucket =
        # grad_accum a bucket is exactly one optimizer step, so sorting only moves samples
        # between the micro-batches of the step they were drawn for.
        order = torch.randperm(len(full), generator=g).tolist()
        return [mb for i in order for mb in full[i]] + _megabatches(tails, self.lengths, mega)

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
