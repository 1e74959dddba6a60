"""Token-weighted causal LM loss.

The loss of an optimizer step is the sum of the per-token losses of every trained token in the
whole accumulated batch (all micro-batches, all ranks) divided by the number of those tokens.
A mean of per-micro-batch means would weight a short answer in a small micro-batch as much as a
long answer in a full one.

Two ways to get the summed loss of a micro-batch:
- `loss_sum(logits, labels)`: from the model's logits at every position (batch x seq x vocab, upcast
  to fp32): for LLaVA-1.5-7B at 2048 tokens, 256 MiB per sample in fp32 plus as much for its gradient.
- `forward_loss_sum(model, labels, chunk_size, **inputs)`: the model returns its final hidden states at
  the trained positions only (lm_head swapped for an identity during the forward), and the logits are
  made `chunk_size` positions at a time, each chunk recomputed in backward, so at most one chunk's
  logits exist at once.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

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


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor):
    # The logits in lm_head's dtype, as the head runs inside the forward's autocast on a GPU (bf16 base,
    # bf16 autocast), then fp32 CE. The cast is needed: accelerate's autocast wrapper hands back the hidden
    # states in fp32, and this runs outside it (every GPU run crashed on it). Only an explicit bf16
    # autocast over an fp32 base (a CPU) differs: fp32 logits here, bf16 ones in the full-logits path.
    return F.cross_entropy(F.linear(hidden.to(weight.dtype), weight, bias).float(), targets, reduction="sum")


def chunked_loss_sum(
    hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Sum of CE(head(hidden[i]), targets[i]) over rows, `chunk_size` rows of logits at a time.

    `hidden` is (N, hidden_size) at trained positions only; each chunk's logits are freed after its
    forward and recomputed in backward (non-reentrant checkpoint), so the peak is one chunk's logits.
    """
    total = hidden[:0].sum().float()  # a zero attached to the graph, also when no position is trained
    for start in range(0, hidden.shape[0], chunk_size):
        end = start + chunk_size
        total = total + checkpoint(
            _chunk_loss, hidden[start:end], head.weight, head.bias, targets[start:end], use_reentrant=False
        )
    return total


def _llava(model: nn.Module) -> nn.Module:
    """The LlavaForConditionalGeneration inside DDP / PEFT wrappers (the module that owns lm_head)."""
    for module in model.modules():
        # `_modules`, not getattr: PEFT wrappers forward attribute reads to the model they wrap.
        if isinstance(module._modules.get("lm_head"), nn.Linear):
            return module
    raise TypeError(f"no module with an lm_head in {type(model).__name__}")


@contextlib.contextmanager
def _without_lm_head(model: nn.Module):
    """Swap lm_head for an identity during a forward; yields the real head."""
    owner = _llava(model)
    head = owner.lm_head
    owner.lm_head = nn.Identity()
    try:
        yield head
    finally:
        owner.lm_head = head


def forward_loss_sum(model: nn.Module, labels: torch.Tensor, chunk_size: int, **inputs) -> torch.Tensor:
    """Run `model(**inputs)` and return the summed next-token CE of `labels`, as `loss_sum` would.

    chunk_size > 0: lm_head is left out of the forward (which returns the hidden states at the trained
    positions through `logits_to_keep`), and `chunked_loss_sum` makes the logits chunk by chunk.
    chunk_size == 0: the full logits and `loss_sum`.
    """
    if chunk_size <= 0:
        return loss_sum(model(**inputs).logits, labels)
    # Position t predicts label t+1: keep the positions whose next label is trained.
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    keep = shifted != IGNORE_INDEX
    with _without_lm_head(model) as head:
        hidden = model(**inputs, logits_to_keep=keep).logits  # (trained tokens, hidden_size)
    return chunked_loss_sum(hidden, head, shifted[keep], chunk_size)
