"""Padding-free micro-batches: the samples of a micro-batch concatenated into one row.

`collate_packed` keeps the sampler's micro-batches (same samples, same order, same accumulation and
token weighting) and only drops the padding: the row is as long as the samples together (at most
train.micro_batch_size * data.max_length), `position_ids` restart at 0 for each sample, and the
images are stacked in sample order, so LLaVA's masked_scatter puts each image's features at its own
`<image>` tokens. The model must then run with `attention_mask=None` and no cache: transformers 5
builds the block-diagonal causal mask from the position_ids only then (`find_packed_sequence_indices`);
with an attention mask or a cache the samples would silently attend to each other.

`padding_fraction` measures what padding costs a sampler's order (tools/padding_report.py).
"""

from __future__ import annotations

import torch

from qllava.data.dataset import IGNORE_INDEX
from qllava.model.families import image_batch


def collate_packed(items: list[dict], pad_token_id: int | None = None) -> dict:
    """One row of the micro-batch's samples back to back (pad_token_id unused: nothing is padded)."""
    input_ids, labels, positions = [], [], []
    for it in items:
        n = len(it["input_ids"])
        sample_labels = list(it["labels"])
        # Shifted inside the loss, the first label would be predicted from the previous sample's last
        # token. It is a prompt token (masked) already; mask it regardless.
        sample_labels[0] = IGNORE_INDEX
        input_ids += it["input_ids"]
        labels += sample_labels
        positions += range(n)
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        # Counts the tokens for tokens/s; the forward passes attention_mask=None for a packed batch.
        "attention_mask": torch.ones((1, len(input_ids)), dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        **image_batch(items),
        "truncated": sum(int(it["truncated"]) for it in items),
    }


def padding_fraction(lengths: list[int], order: list[int], micro_batch: int, *, packed: bool = False) -> float:
    """Padded tokens / all tokens of the right-padded micro-batches that `order` makes (0 when packed).

    `lengths` are token counts (image tokens included, already cut to data.max_length); `order` is a
    sampler's index stream, cut into micro-batches of `micro_batch` (a short last one is dropped).
    """
    real = padded = 0
    for start in range(0, len(order) - micro_batch + 1, micro_batch):
        batch = [lengths[i] for i in order[start : start + micro_batch]]
        real += sum(batch)
        padded += sum(batch) if packed else max(batch) * len(batch)
    return 1 - real / padded if padded else 0.0
