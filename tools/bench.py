"""Benchmark qllava's training step: tokens/s, samples/s, padding, peak memory and MFU per variant.

    PYTHONPATH=. python tools/bench.py [--tiny | --layers L] [--arch llava|llava_next] [--steps N] [--micro-batch B]
        [--seq-len S] [--lora-r R]
        [--out DIR] [--packing] [--loss-chunk-size C] [--length-bucket K] [--compare] [--no-baseline]
        [--attention auto|sdpa|flash_attention_2|eager] [--full-length]

What it builds (in a temporary directory, nothing downloaded):
- a LLaVA with random weights saved as an HF directory with its processor, then loaded through qllava's
  real path (`build_recipe` with model.base pointing at it, then `load_for_training`). `--tiny`: the
  shapes of qllava/model/tiny.py (CPU, the tested path). Default: LLaVA-1.5-7B's shape (CLIP-L/336
  vision, Llama-2-7B text, vocab 32064, mlp2x_gelu), generated in bf16 on the GPU and saved (about
  14 GB of disk); it needs a CUDA GPU and has not been run yet. `--arch llava_next`: a LLaVA-NeXT
  instead (tiny: `build_tiny_llava_next`; 7B: LLaVA-v1.6-Mistral-7B's shape from the settings qllava
  ships for `qllava plan`), every image of the size that gets the most image tokens (and tiles) its
  AnyRes grid admits, the image `qllava plan` assumes (672x672: 2928 tokens, 5 tiles at 7B).
- a LLaVA JSON with PNG images whose token lengths follow tools/padding_report.py's synthetic
  LLaVA-1.5-mix distribution (image samples: every image token + long-tailed text; 12% text-only),
  in random order, cut to --seq-len by qllava's Encoder. Every variant runs the same samples: the
  warmup micro-batches in file order, then the timed ones as each tool would batch them, then one
  memory step (below) on the data's last micro-batch. qllava: in its sampler's order with
  data.length_bucket = --length-bucket; by default --steps, so all timed samples are sorted by
  modality and length together, as an optimizer step of grad_accum --steps is (the shipped 7B
  recipe: micro-batch 8 x grad_accum 16); one micro-batch may mix the two modalities. The
  baseline: in file order, as TRL's default random sampler would.

`--full-length`: every sample is an image sample cut to exactly --seq-len tokens, the shape `qllava
plan` assumes, and each row also gets the plan's prediction for the same model, recipe, micro-batch
and length (`plan_peak_mib`, `plan_reserved_mib`: qllava.plan.estimate, bf16 layout on CUDA, fp32 on
the CPU) beside the measured peak. tools/gpu_acceptance.py runs it for micro-batch 1, 2 and 4.

How it times: the real step, driven directly rather than through `qllava.train.loop.train` (whose
tokens/s includes data loading and the per-step logging sync): the micro-batches are collated first
by qllava's `collate` / `collate_packed`, then each step is `_forward_loss` under the accelerator's
autocast, `accelerator.backward`, gradient clipping, `optimizer.step()` and `zero_grad`, with
`torch.cuda.synchronize()` before reading the clock. Two warmup steps (--warmup) are not timed. grad_accum is 1.

What it reports (tokens are real tokens: the attention_mask sum, padding excluded):
- padding: padded / all tokens of the timed micro-batches as run (0 when packed);
- peak memory, as tools/peak_memory.py's PeakMemory reads it: CUDA: max allocated / reserved over
  the timed steps and the memory step, plus bitsandbytes' paged optimizer states (outside torch's
  allocator); CPU: the peak of live tensor bytes (weights and optimizer states included) in one
  extra, untimed, profiled step after them (the memory step), on the same micro-batch (the data's
  last) for every row, with the other micro-batches already dropped;
- MFU: model FLOPs per second / the matmul rate measured in the same run (bf16 4096^3 on GPU, fp32
  512^3 on CPU, best of 5). Model FLOPs per step:
    4 x (LLM linear + lm_head parameters) per real token (forward 2P, backward to the inputs 2P; the
      frozen weights get no weight gradient; the 4-bit parameters counted unpacked),
    6 x (LoRA + trained projector parameters) per token (they also get weight gradients),
    causal attention 6 x layers x hidden x len^2 per sample (QK^T and AV: 4 x hidden x len^2 / 2 per
      layer forward, x3 for forward + backward),
    2 x vision tower parameters x vision positions per image (forward only; it is frozen).
  Gradient checkpointing's recomputation is not counted (it is hardware FLOPs, not model FLOPs).

The baseline (tools/trl_baseline.py): TRL's SFTTrainer on the same model, samples, micro-batch,
sequence limit, LoRA and chat template, timed and measured the same way, in the same process after
qllava's rows. It runs when trl imports (`pip install 'qllava[bench]'`; skip with --no-baseline), and
the table then ends with each qllava row's tokens/s and peak memory as multiples of the baseline's.
On the CPU the baseline runs in bf16 autocast (TRL's default) and qllava in fp32 (qllava's CPU
default): there the comparison checks that both paths run, not which is faster.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qllava.data.dataset import collate  # noqa: E402
from qllava.data.packing import collate_packed  # noqa: E402
from qllava.data.sampler import GroupedSampler  # noqa: E402
from qllava.data.validate import dataset_from_recipe  # noqa: E402
from qllava.model.load import load_for_training, parameter_groups, set_train_mode  # noqa: E402
from qllava.model.precision import precision_for  # noqa: E402
from qllava.recipe import build_recipe  # noqa: E402
from qllava.train.loop import _forward_loss, make_accelerator  # noqa: E402
from qllava.train.loss import trained_tokens  # noqa: E402
from qllava.train.optim import build_optimizer  # noqa: E402
from tools import trl_baseline  # noqa: E402
from tools.padding_report import IMAGE_TOKENS, synthetic_lengths  # noqa: E402
from tools.peak_memory import PeakMemory  # noqa: E402

WARMUP = 2
COLUMNS = [
    "variant",
    "packing",
    "loss_chunk_size",
    "steps",
    "micro_batch",
    "tokens_per_s",
    "samples_per_s",
    "padding",
    "peak_mem_mib",
    "peak_reserved_mib",
    "mfu",
    "step_s",
    "loss",
]
NO_TRL = "baseline not run: trl is not installed (pip install 'qllava[bench]')"
WORDS = ["What", "color", "is", "the", "shape", "red", "blue", "green", "Describe", "image", "a", "circle"]


ARCHS = ("llava", "llava_next")
"""--arch: LLaVA-1.5 (one 336 px tile per image), LLaVA-NeXT (AnyRes: 1 + up to 4 tiles per image)."""
NEXT_7B = "llava-v1.6-mistral-7b-hf"
"""The LLaVA-NeXT 7B shape: the settings qllava ships for `qllava plan` (qllava/bases)."""


def _next_7b(tokenizer, layers: int):
    """LLaVA-v1.6-Mistral-7B's config (CLIP-L/336, Mistral-7B, AnyRes over 336 px tiles, vocab 32064) with the
    bench tokenizer's token ids, and its LlavaNextProcessor."""
    from transformers import AutoConfig, LlavaNextProcessor
    from transformers.models.llava_next import LlavaNextImageProcessorPil

    from qllava.bases import BASES_DIR

    folder = BASES_DIR / NEXT_7B
    config = AutoConfig.from_pretrained(folder)
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    text = config.text_config
    text.bos_token_id, text.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    text.pad_token_id = config.pad_token_id = tokenizer.pad_token_id
    if layers:
        text.num_hidden_layers = layers
        config.vision_config.num_hidden_layers = layers + 1  # the features come from layer -2
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    settings.pop("image_processor_type")
    processor_settings = json.loads((folder / "processor_config.json").read_text())
    processor_settings.pop("processor_class")
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(**settings), tokenizer=tokenizer, **processor_settings
    )
    return config, processor


def build_base(out: Path, tiny: bool, layers: int = 0, arch: str = "llava") -> Path:
    """Save a random LLaVA (tiny, or 7B-shaped in bf16) with its processor; `arch` llava: LLaVA-1.5-7B's shape,
    llava_next: LLaVA-v1.6-Mistral-7B's.

    `layers` > 0 keeps only that many decoder and vision layers of the 7B shape (every width, the
    vocabulary, the 336 px tiles and their tokens stay): the 7B path then fits a CPU, to check
    it end to end before a GPU is at hand; its speed says nothing about a GPU.
    """
    if arch not in ARCHS:
        raise SystemExit(f"bench: --arch must be one of {', '.join(ARCHS)}, not {arch!r}")
    if tiny:
        from qllava.model.tiny import build_tiny_llava, build_tiny_llava_next

        build = build_tiny_llava_next if arch == "llava_next" else build_tiny_llava
        return build(out, [" ".join(WORDS)], seed=0)
    from qllava.model.families import family_of
    from qllava.model.tiny import LLAVA_1_5_7B, build_tokenizer, llava_config, llava_processor

    cuda = torch.cuda.is_available()
    if not cuda and not layers:
        raise SystemExit(
            "bench: the 7B shape needs a CUDA GPU; use --tiny, or --layers 1 to check its path, on the CPU"
        )
    tokenizer = build_tokenizer([" ".join(WORDS)])
    tokenizer.model_max_length = 4096
    if arch == "llava_next":
        config, processor = _next_7b(tokenizer, layers)
    else:
        shape = {part: dict(dims) for part, dims in LLAVA_1_5_7B.items()}
        if layers:
            shape["text"]["num_hidden_layers"] = layers
            shape["vision"]["num_hidden_layers"] = layers + 1  # the features come from layer -2
        config = llava_config(tokenizer, **shape)
        processor = llava_processor(tokenizer, 336, 14)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda" if cuda else "cpu"):
            model = family_of(config).model_class()(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    del model
    if cuda:
        torch.cuda.empty_cache()
    return out


def write_data(
    root: Path,
    n: int,
    image_size: int | tuple[int, int],
    seed: int = 0,
    full_length: int = 0,
    image_tokens: int = IMAGE_TOKENS,
) -> Path:
    """n LLaVA records with padding_report's lengths (text counted in words ~ tokens of the tiny BPE).

    `image_size`: the images' side, or (height, width). `full_length` > 0: every record has an image and an
    answer of that many words (the caller's sequence limit), so that the Encoder cuts each sample to exactly
    the limit; its question leaves the answer at least an eighth of the limit after the `image_tokens` the
    image becomes (a LLaVA-NeXT image takes most of it).
    """
    from PIL import Image

    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    (root / "images").mkdir(parents=True, exist_ok=True)
    colors = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (200, 200, 30)]
    for i, rgb in enumerate(colors):
        Image.new("RGB", (width, height), rgb).save(root / "images" / f"{i}.png")
    tokens, modality = synthetic_lengths(n, seed)
    if full_length:
        tokens, modality = [IMAGE_TOKENS + 2 * full_length] * n, [1] * n
    rng = random.Random(seed)
    records = []
    for i, (t, m) in enumerate(zip(tokens, modality)):
        text = t if m < 0 else t - IMAGE_TOKENS
        words = [rng.choice(WORDS) for _ in range(max(text, 4))]
        cut = max(1, len(words) // 4)  # a short question, a long answer
        if full_length:
            cut = min(cut, max(1, full_length - image_tokens - full_length // 8))
        question, answer = " ".join(words[:cut]), " ".join(words[cut:])
        if m < 0:
            convs = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            records.append({"id": f"t{i}", "conversations": convs})
        else:
            convs = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
            records.append({"id": f"s{i}", "image": f"{i % len(colors)}.png", "conversations": convs})
    (root / "train.json").write_text(json.dumps(records))
    return root


def matmul_flops(device: torch.device) -> float:
    """Measured dense matmul rate (FLOP/s): bf16 4096^3 on CUDA, fp32 512^3 on CPU, best of 5."""
    cuda = device.type == "cuda"
    n, dtype = (4096, torch.bfloat16) if cuda else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        if cuda:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n**3 / best


def step_flops(batch: dict, params: dict, shape: dict) -> float:
    """Model FLOPs of one micro-batch's training step (see the module docstring)."""
    real = int(batch["attention_mask"].sum())
    flops = 4 * params["frozen_llm"] * real + 6 * params["trained"] * real
    if batch.get("position_ids") is not None:
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["position_ids"].shape[1]]
        lengths = [b - a for a, b in zip(starts, starts[1:])]
    else:
        lengths = batch["attention_mask"].sum(1).tolist()
    flops += sum(6 * shape["layers"] * shape["hidden"] * n * n for n in lengths)
    images = 0 if batch["pixel_values"] is None else batch["pixel_values"].shape[0]
    flops += 2 * params["vision"] * shape["vision_positions"] * images
    return float(flops)


def measured_row(
    name: str,
    model,
    micro: int,
    timed: list[dict],
    step_times: list[float],
    losses: list[float],
    memory: PeakMemory,
    peak_rate: float,
    packing: bool = False,
    chunk: int = 0,
) -> dict:
    """One table row from the timed micro-batches (as run) of a trained model; qllava's and the baseline's."""
    groups = parameter_groups(model)
    count = lambda *keys: sum(groups.get(k, {}).get("params", 0) for k in keys)  # noqa: E731
    params = {
        "frozen_llm": count("LLM linear layers", "lm_head"),
        "trained": sum(g["trainable"] for g in groups.values()),
        "vision": count("vision tower"),
    }
    vc, tc = model.config.vision_config, model.config.text_config
    shape = {
        "layers": tc.num_hidden_layers,
        "hidden": tc.hidden_size,
        "vision_positions": (vc.image_size // vc.patch_size) ** 2 + 1,
    }
    seconds = sum(step_times)
    real = sum(int(b["attention_mask"].sum()) for b in timed)
    slots = sum(b["attention_mask"].numel() for b in timed)
    flops = sum(step_flops(b, params, shape) for b in timed)
    peak, reserved = memory.read()
    return {
        "variant": name,
        "packing": packing,
        "loss_chunk_size": chunk,
        "steps": len(timed),
        "micro_batch": micro,
        "real_tokens": real,
        "tokens_per_s": real / seconds,
        "samples_per_s": micro * len(timed) / seconds,
        "padding": 1 - real / slots,
        "peak_mem_mib": peak,
        "peak_reserved_mib": reserved,
        "mfu": flops / seconds / peak_rate,
        "step_s": seconds / len(timed),
        "loss": sum(losses) / len(losses),
        "model_tflop_per_step": flops / len(timed) / 1e12,
    }


def micro_batch_order(modality_lengths: list[int], micro: int, warmup: int, bucket: int) -> list[list[int]]:
    """Sample indices per micro-batch: the warmup ones in file order, the timed ones in the order
    qllava's GroupedSampler gives them with length_bucket = `bucket` (0: file order as well), and the
    last micro-batch (the memory step, see tools/peak_memory.py) in file order."""
    n = len(modality_lengths)
    head = [list(range(s * micro, (s + 1) * micro)) for s in range(warmup)]
    timed = list(range(warmup * micro, n - micro))
    if bucket:
        sampler = GroupedSampler([modality_lengths[i] for i in timed], micro, seed=0, length_bucket=bucket)
        timed = [timed[i] for i in sampler]
    return head + [timed[s : s + micro] for s in range(0, len(timed) - micro + 1, micro)] + [list(range(n - micro, n))]


def _train_step(model, optimizer, accelerator, batch, device, dtype, chunk, max_grad_norm) -> torch.Tensor:
    """qllava's optimizer step on one micro-batch (grad_accum 1); returns the mean loss per trained token."""
    tokens = trained_tokens(batch["labels"]).to(device).clamp(min=1)
    # As in the training loop: autocast comes from accelerator.prepare's wrapper of the forward alone.
    loss = _forward_loss(model, batch, device, dtype, chunk) / tokens
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def run_variant(
    name: str,
    base: Path,
    data: Path,
    out: Path,
    args,
    packing: bool,
    chunk: int,
    bucket: int,
    peak_rate: float,
    micro: int | None = None,
):
    recipe = build_recipe(
        {
            "model": {"base": str(base), "attention": args.attention},
            "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.05},
            "data": {
                "train": str(data / "train.json"),
                "image_folder": str(data / "images"),
                "max_length": args.seq_len,
                "num_workers": 0,
                "packing": packing,
                "group_by_modality_length": False,
            },
            "optim": {"schedule": "constant", "warmup_ratio": 0.0},
            "train": {
                "max_steps": args.warmup + args.steps + 1,
                "micro_batch_size": micro or args.micro_batch,
                "grad_accum": 1,
                "loss_chunk_size": chunk,
                "log_every": 1,
                "save_every": 0,
                "seed": 0,
            },
            "output": {"dir": str(out / name)},
        },
        source="bench",
    )
    accelerator = make_accelerator(recipe, out / name)
    device = accelerator.device
    torch.manual_seed(0)
    model, processor = load_for_training(recipe, device)
    dtype = precision_for(device, recipe.train.mixed_precision).dtype
    dataset = dataset_from_recipe(recipe, recipe.data.train, processor, model.config)
    gather = partial(collate_packed if packing else collate, pad_token_id=processor.tokenizer.pad_token_id)
    micro = recipe.train.micro_batch_size
    order = micro_batch_order(dataset.modality_lengths(), micro, args.warmup, bucket)
    batches = [gather([dataset[i] for i in indices]) for indices in order]
    optimizer = build_optimizer(model, recipe, device)
    model, optimizer = accelerator.prepare(model, optimizer)
    set_train_mode(model)
    cuda = device.type == "cuda"
    memory = PeakMemory(device)
    step_times, losses = [], []
    for step, batch in enumerate(batches):
        if step == args.warmup:
            memory.reset()
        if step == len(batches) - 1:  # the memory step: profiled on the CPU, not timed
            with memory.step():
                _train_step(model, optimizer, accelerator, batch, device, dtype, chunk, recipe.optim.max_grad_norm)
            break
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = _train_step(model, optimizer, accelerator, batch, device, dtype, chunk, recipe.optim.max_grad_norm)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            step_times.append(elapsed)
            losses.append(loss.item())
        # Keep only what measured_row reads, so that the memory step sees no other batch's tensors.
        batches[step] = _summary(batch)
    row = measured_row(
        name, model, micro, batches[args.warmup : -1], step_times, losses, memory, peak_rate, packing, chunk
    )
    if args.full_length:
        row.update(plan_prediction(base, recipe, micro, args.seq_len, device))
    del model, optimizer, batches, batch
    gc.collect()  # 4-bit weights reference their own layers (a cycle): free them before the next row
    if cuda:
        torch.cuda.empty_cache()
    return row


def plan_prediction(base: Path, recipe, micro: int, seq_len: int, device: torch.device) -> dict:
    """`qllava plan`'s peak for this model and recipe (every sample `seq_len` tokens), in MiB."""
    from qllava.plan import estimate, read_shape

    e = estimate(read_shape(str(base)), recipe, micro, seq_len, device="cuda" if device.type == "cuda" else "cpu")
    return {"plan_peak_mib": e.peak / 2**20, "plan_reserved_mib": e.reserved / 2**20, "plan_worst": e.worst_moment}


def _summary(batch: dict) -> dict:
    """The parts of a collated micro-batch that measured_row / step_flops read (one pixel per image)."""
    pixels = batch["pixel_values"]
    return {
        "attention_mask": batch["attention_mask"],
        "position_ids": batch.get("position_ids"),
        "pixel_values": None if pixels is None else pixels[:, :1, :1, :1].clone(),
    }


def render(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# qllava bench: {meta['model']} on {meta['device']}",
        "",
        meta["baseline"],
        f"peak matmul rate: {meta['peak_tflops']:.3f} TFLOP/s ({meta['matmul']}); memory: {meta['memory']}",
        f"micro-batch {meta['micro_batch']}, max length {meta['seq_len']}, LoRA r {meta['lora_r']}, "
        f"{meta['steps']} timed steps after {meta['warmup']} warmup; qllava's timed micro-batches in its sampler's "
        f"order with length_bucket {meta['length_bucket']}, the baseline's in file order (random)",
        "",
        "| variant | tokens/s | samples/s | padding | peak MiB | reserved MiB | MFU | s/step | loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reserved = "-" if r["peak_reserved_mib"] is None else f"{r['peak_reserved_mib']:.0f}"
        peak = "-" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
        lines.append(
            f"| {r['variant']} | {r['tokens_per_s']:.0f} | {r['samples_per_s']:.2f} | {r['padding']:.1%} | "
            f"{peak} | {reserved} | {r['mfu']:.2%} | {r['step_s']:.3f} | {r['loss']:.3f} |"
        )
    planned = [r for r in rows if r.get("plan_peak_mib")]
    if planned:
        lines += ["", "| plan vs measured | micro-batch | predicted MiB | measured MiB | ratio |"]
        lines.append("|---|---|---|---|---|")
        for r in planned:
            ratio = f"{r['plan_peak_mib'] / r['peak_mem_mib']:.3f}" if r["peak_mem_mib"] else "-"
            measured = "-" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
            lines.append(f"| {r['variant']} | {r['micro_batch']} | {r['plan_peak_mib']:.0f} | {measured} | {ratio} |")
    if meta.get("vs_baseline"):
        lines += ["", "| vs the baseline | tokens/s | peak memory |", "|---|---|---|"]
        for name, ratio in meta["vs_baseline"].items():
            mem = "-" if ratio["peak_mem"] is None else f"{ratio['peak_mem']:.2f}x"
            lines.append(f"| {name} | {ratio['tokens_per_s']:.2f}x | {mem} |")
    return "\n".join(lines) + "\n"


def versus(rows: list[dict], baseline: dict) -> dict:
    """Each qllava row's tokens/s and peak memory as multiples of the baseline's (same run)."""
    return {
        r["variant"]: {
            "tokens_per_s": r["tokens_per_s"] / baseline["tokens_per_s"],
            "peak_mem": r["peak_mem_mib"] / baseline["peak_mem_mib"]
            if r["peak_mem_mib"] and baseline["peak_mem_mib"]
            else None,
        }
        for r in rows
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model (CPU); default: the 7B shape")
    parser.add_argument(
        "--arch",
        default="llava",
        choices=ARCHS,
        help="llava: LLaVA-1.5 (7B: LLaVA-1.5-7B's shape); llava_next: LLaVA-NeXT, every image the largest the "
        "AnyRes grid admits, as `qllava plan` assumes (7B: LLaVA-v1.6-Mistral-7B's shape)",
    )
    parser.add_argument(
        "--layers", type=int, default=0, help="7B shape with only this many layers (a CPU check of the 7B path)"
    )
    parser.add_argument("--steps", type=int, default=16, help="timed optimizer steps (after 2 warmup steps)")
    parser.add_argument("--micro-batch", type=int, default=None, help="default 4 (tiny, NeXT 7B) / 8 (7B)")
    parser.add_argument("--seq-len", type=int, default=None, help="data.max_length; default 512 (tiny) / 2048 (7B)")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="untimed steps first (default 2)")
    parser.add_argument("--lora-r", type=int, default=None, help="default 8 (tiny) / 128 (7B)")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--loss-chunk-size", type=int, default=1024)
    parser.add_argument("--compare", action="store_true", help="also run packed/padded and full/chunked loss")
    parser.add_argument("--no-baseline", action="store_true", help="skip TRL's SFTTrainer (run when trl imports)")
    parser.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "sdpa", "flash_attention_2", "eager"],
        help="model.attention for every row, the baseline's included (auto: flash-attention when installed)",
    )
    parser.add_argument(
        "--full-length",
        action="store_true",
        help="every sample an image sample of exactly --seq-len tokens; rows add qllava plan's predicted peak",
    )
    parser.add_argument(
        "--micro-batches",
        default="",
        help="with --full-length: comma-separated micro-batches, one qllava row each, in one process (no baseline)",
    )
    parser.add_argument(
        "--length-bucket",
        type=int,
        default=None,
        help="qllava's data.length_bucket for the timed micro-batches; default --steps (they are then one "
        "optimizer step of grad_accum --steps, as recipes/llava-1.5-7b-qlora.yaml's 16); 0: file order",
    )
    args = parser.parse_args(argv)
    args.micro_batch = args.micro_batch or (4 if args.tiny or args.arch == "llava_next" else 8)
    args.lora_r = args.lora_r or (8 if args.tiny else 128)
    # The tiny model has 512 positions; a NeXT 7B image can take 2928 tokens (its recipes' limit is 4096).
    args.seq_len = args.seq_len or (512 if args.tiny else 4096 if args.arch == "llava_next" else 2048)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bucket = args.steps if args.length_bucket is None else args.length_bucket
    variants = [("qllava", args.packing, args.loss_chunk_size, bucket, args.micro_batch)]
    if args.micro_batches:
        if not args.full_length:
            parser.error("--micro-batches compares memory with the plan: it needs --full-length")
        args.no_baseline = True
        micros = [int(b) for b in args.micro_batches.split(",")]
        variants = [(f"qllava, micro-batch {b}", args.packing, args.loss_chunk_size, bucket, b) for b in micros]
    if args.compare:
        chunk = args.loss_chunk_size or 1024
        variants = [
            ("padded, chunked loss", False, chunk, bucket, args.micro_batch),
            ("padded, chunked loss, file order", False, chunk, 0, args.micro_batch),
            ("packed, chunked loss", True, chunk, bucket, args.micro_batch),
            ("padded, full logits", False, 0, bucket, args.micro_batch),
            ("packed, full logits", True, 0, bucket, args.micro_batch),
        ]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak_rate = matmul_flops(device)
    with tempfile.TemporaryDirectory(prefix="qllava-bench-") as tmp:
        tmp = Path(tmp)
        base = build_base(tmp / "model", args.tiny, args.layers, args.arch)
        from qllava.plan import read_shape

        shape = read_shape(str(base))
        # AnyRes: every image the one the plan assumes, the most image tokens (and tiles) the grid admits.
        image_size = shape.worst_image or shape.image_size
        full = args.seq_len if args.full_length else 0
        # Each micro-batch its own samples: warmup + timed + the memory step, as many as the steps take.
        data = {
            m: write_data(
                tmp / f"data-{m}",
                m * (args.warmup + args.steps + 1),
                image_size,
                full_length=full,
                image_tokens=shape.image_tokens,
            )
            for m in sorted({v[-1] for v in variants})
        }
        rows = [
            run_variant(name, base, data[m], tmp / "runs", args, p, c, b, peak_rate, m) for name, p, c, b, m in variants
        ]
        baseline = None
        if args.no_baseline:
            baseline_note = "baseline not run (--no-baseline)"
        elif not trl_baseline.available():
            baseline_note = NO_TRL
        else:
            records = json.loads((data[args.micro_batch] / "train.json").read_text())
            baseline = trl_baseline.run(
                base, records, data[args.micro_batch] / "images", tmp / "runs" / "trl", args, peak_rate, measured_row
            )
            baseline_note = f"{baseline['variant']}, same model, samples and settings (tools/trl_baseline.py)"
    name = {"llava": "LLaVA-1.5-7B", "llava_next": "LLaVA-v1.6-Mistral-7B"}[args.arch]
    meta = {
        "model": f"tiny (qllava.model.tiny, {args.arch})"
        if args.tiny
        else f"{name} shape{f' cut to {args.layers} layer(s)' if args.layers else ''}, random weights",
        "arch": args.arch,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "peak_tflops": peak_rate / 1e12,
        "matmul": "bf16 4096^3" if device.type == "cuda" else f"fp32 512^3, {torch.get_num_threads()} threads",
        "memory": PeakMemory(device).method,
        "micro_batch": args.micro_batches or args.micro_batch,
        "seq_len": args.seq_len,
        "lora_r": args.lora_r,
        "steps": args.steps,
        "warmup": args.warmup,
        "length_bucket": bucket,
        "attention": args.attention,
        "full_length": args.full_length,
        "baseline": baseline_note,
        "columns": COLUMNS,
        "vs_baseline": versus(rows, baseline) if baseline else None,
    }
    result = {"meta": meta, "rows": rows + ([baseline] if baseline else [])}
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    table = render(result["rows"], meta)
    (out / "bench.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
