"""Padding fraction of random, modality-length grouped and packed micro-batches on LLaVA-1.5-mix-like lengths.

    PYTHONPATH=. python tools/padding_report.py [--samples 20000] [--micro-batch 8 16] [--max-length 2048]
        [--length-bucket 50]

Synthetic lengths: image samples are 576 image tokens + a log-normal number of text tokens (median 120,
clipped to 20..1500); 12% are text-only samples of a log-normal length (median 250, clipped to
20..2048). All are cut to max_length as the Encoder does. The grouped sampler sees LLaVA's approximate
lengths (text tokens as words, 0.75 per token), as it does in training: with data.length_bucket 1
(LLaVA-1.5's grouping) and with --length-bucket micro-batches sorted together.
"""

from __future__ import annotations

import argparse

import torch

from qllava.data.packing import padding_fraction
from qllava.data.sampler import GroupedSampler

IMAGE_TOKENS = 576


def synthetic_lengths(n: int, seed: int = 0, text_only: float = 0.12) -> tuple[list[int], list[int]]:
    """(token lengths, modality lengths as LlavaDataset.modality_lengths gives them: negative = text-only)."""
    g = torch.Generator().manual_seed(seed)
    is_text = torch.rand(n, generator=g) < text_only
    normal = torch.randn(n, generator=g)
    image_text = (torch.exp(torch.log(torch.tensor(120.0)) + 0.9 * normal)).clamp(20, 1500)
    text = (torch.exp(torch.log(torch.tensor(250.0)) + 0.9 * normal)).clamp(20, 2048)
    tokens, modality = [], []
    for i in range(n):
        if is_text[i]:
            t = int(text[i])
            tokens.append(t)
            modality.append(-int(0.75 * t))
        else:
            t = int(image_text[i])
            tokens.append(IMAGE_TOKENS + t)
            modality.append(IMAGE_TOKENS + int(0.75 * t))
    return tokens, modality


def report(samples: int, micro_batches: list[int], max_length: int, bucket: int = 50, seed: int = 0) -> list[tuple]:
    tokens, modality = synthetic_lengths(samples, seed)
    tokens = [min(t, max_length) for t in tokens]
    rows = []
    for micro in micro_batches:
        random = list(GroupedSampler(modality, micro, seed=seed, group_by_modality_length=False))
        grouped = list(GroupedSampler(modality, micro, seed=seed))
        bucketed = list(GroupedSampler(modality, micro, seed=seed, length_bucket=bucket))
        # LLaVA's megabatches span the ranks: with 8 ranks each sorts 8 micro-batches' worth of samples.
        ranks = [list(GroupedSampler(modality, micro, seed=seed, world_size=8, rank=r)) for r in range(8)]
        per_rank = [sum(tokens[i] for i in stream) for stream in ranks]
        real = sum(per_rank)
        padded = sum(n / (1 - padding_fraction(tokens, stream, micro)) for n, stream in zip(per_rank, ranks))
        rows.append(
            (
                micro,
                padding_fraction(tokens, random, micro),
                padding_fraction(tokens, grouped, micro),
                1 - real / padded,
                padding_fraction(tokens, bucketed, micro),
                padding_fraction(tokens, grouped, micro, packed=True),
                max(sum(tokens[i] for i in grouped[s : s + micro]) for s in range(0, len(grouped) - micro + 1, micro)),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--length-bucket", type=int, default=50)
    args = parser.parse_args()
    b = args.length_bucket
    print(
        "| micro-batch | random | grouped, 1 process | grouped, 8 processes "
        f"| grouped, length_bucket {b} | packed | longest packed row |"
    )
    print("|---|---|---|---|---|---|---|")
    for micro, rnd, grp, grp8, bkt, pck, longest in report(args.samples, args.micro_batch, args.max_length, b):
        print(f"| {micro} | {rnd:.1%} | {grp:.1%} | {grp8:.1%} | {bkt:.1%} | {pck:.1%} | {longest} |")


if __name__ == "__main__":
    main()
