"""Logits memory of the loss: full fp32 logits vs the chunked cross-entropy (train.loss_chunk_size).

    PYTHONPATH=. python tools/loss_memory.py [--vocab 32064] [--seq 2048] [--chunk 1024] [--hidden 256]

Prints (1) the bytes computed for a LLaVA-1.5-7B shape and (2) the peak measured on the CPU by
tools/peak_memory.py's `tensor_peak` (torch.profiler's memory events, the tensors alive before left
out), over the loss's forward and backward from the final hidden states (every position trained, the
worst case).
Logits memory does not depend on the hidden size, so a small one keeps the matmuls quick.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from qllava.train.loss import chunked_loss_sum, loss_sum
from tools.peak_memory import MIB, tensor_peak


def measure(batch: int, seq: int, vocab: int, hidden: int, chunk: int) -> tuple[int, int]:
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    states = torch.randn(batch, seq, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq))
    labels[:, 0] = -100

    def full():
        loss_sum(head(states), labels).backward()

    def chunked():
        keep = F.pad(labels[:, 1:], (0, 1), value=-100) != -100
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)[keep]
        chunked_loss_sum(states[keep], head, targets, chunk).backward()

    return tensor_peak(full, include_live=False), tensor_peak(chunked, include_live=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32064)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 3, 4])
    args = parser.parse_args()
    v, s, c = args.vocab, args.seq, args.chunk
    print(f"vocab {v}, seq {s}, chunk {c}; MiB")
    print(
        "| micro-batch | fp32 logits, full (computed) | one fp32 chunk (computed) "
        "| peak full (measured) | peak chunked (measured) |"
    )
    print("|---|---|---|---|---|")
    for b in args.batches:
        full, chunked = measure(b, s, v, args.hidden, c)
        print(
            f"| {b} | {b * s * v * 4 / MIB:.0f} | {min(c, b * s) * v * 4 / MIB:.0f} "
            f"| {full / MIB:.0f} | {chunked / MIB:.0f} |"
        )


if __name__ == "__main__":
    main()
