"""Token-weighted causal LM loss.

The loss of an optimizer step is the sum of the per-token losses of every trained token in the
whole accumulated batch (all micro-batches, all ranks) divided by the number of those tokens.
A mean of per-micro-batch means would weight a short answer in a small micro-batch as much as a
long answer in a full one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qllava.data.dataset import IGNORE_INDEX


def trained_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Number of tokens that carry loss (labels shift by one: position t predicts token t+1)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the next-token cross-entropy over the tokens that carry loss, in fp32."""
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
