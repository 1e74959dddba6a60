"""The baseline of tools/bench.py: TRL's SFTTrainer on the same model, data and settings as qllava.

The path TRL documents for fine-tuning a vision-language model with QLoRA: the model loaded with a
4-bit `BitsAndBytesConfig`, a peft `LoraConfig` handed to `SFTTrainer`, gradient checkpointing on
(SFTConfig's default), the processor as `processing_class`, and a dataset of `messages` + `images`
that TRL's vision collator tokenizes on the fly. TRL's defaults are kept where the bench does not
need them equal: its optimizer (transformers' AdamW), bf16 mixed precision (also on the CPU), loss on
every token of the sequence.

Made equal to qllava so that the two rows compare the tools and not the settings:
- the same saved model, loaded by qllava's own `load_base` (NF4 with double quantization, the
  vision tower, projector and lm_head left unquantized: TRL's examples quantize the vision tower
  too, which would make it a different model; the same attention kernel), in bf16;
- LoRA on the same modules with the same rank, alpha and dropout; the projector trained fully
  (`modules_to_save`, named by the model's family), as qllava trains it; LLaVA-NeXT's `image_newline`,
  a bare parameter that `modules_to_save` cannot hold, stays frozen here (qllava trains it too);
- the same samples in file order (a sequential sampler: the synthetic file is in random order, as
  TRL's default random sampler would give them), the same micro-batch, sequence limit
  (truncation keeps the start, as qllava's Encoder does) and the same chat template (qllava's
  vicuna_v1, so both tokenize the same text); grad_accum 1, constant learning rate 2e-4;
- the same clock: from the start of an optimizer step (after the batch is fetched and collated) to
  its end (forward, backward, clipping, optimizer step, zero_grad), with a CUDA synchronize on both
  sides; the same warmup steps are left out; peak memory is read the same way.

Left as TRL does them, because they are what its users get (each makes the baseline do more work
or hold more memory than qllava; the table's ratios include them):
- labels on every non-padding token, the image tokens included (no `{% generation %}` markers in
  the template for assistant_only_loss), so lm_head and the loss run on almost every position, and
  the `loss` column is not comparable with qllava's (answers only);
- `model.enable_input_require_grads()` with gradient checkpointing, which hooks the vision tower's
  patch embedding too: its forward is recorded and backpropagated (qllava removes those hooks);
- its per-step metrics (entropy and token accuracy over the logits, `.item()` syncs) inside the step;
- trainable weights cast to bf16, torch AdamW (fp32 states) instead of paged 8-bit AdamW;
- random order, no length grouping (the qllava row closest in batching is `--compare`'s
  "padded, chunked loss, file order").

trl is not a qllava dependency: `pip install 'qllava[bench]'` (or carry a trl wheel to the GPU machine).
"""

from __future__ import annotations

import contextlib
import gc
import time
from pathlib import Path

import torch

from qllava.data.templates import chat_template
from qllava.model.families import family_of_model
from qllava.model.load import load_base, load_processor, lora_targets
from tools.peak_memory import PeakMemory

TEMPLATE = "vicuna_v1"  # qllava's default data.template


def available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def version() -> str:
    import trl

    return trl.__version__


def messages_dataset(records: list[dict], image_folder: Path):
    """qllava's LLaVA records as TRL's conversational vision dataset (`messages`, `images`)."""
    from datasets import Dataset
    from PIL import Image

    rows = []
    for record in records:
        messages = []
        for turn in record["conversations"]:
            role = "user" if turn["from"] == "human" else "assistant"
            # TRL puts the image part at the start of the first user turn, where LLaVA moves `<image>`.
            messages.append({"role": role, "content": turn["value"].replace("<image>\n", "").replace("<image>", "")})
        image = record.get("image")
        images = [Image.open(image_folder / image).convert("RGB")] if image else []
        rows.append({"messages": messages, "images": images})
    return Dataset.from_list(rows)


def baseline_processor(base: Path):
    """qllava's processor for `base` with qllava's template as its chat template, which TRL renders."""
    processor = load_processor(base)
    processor.chat_template = chat_template(TEMPLATE)
    return processor


def run(base: Path, records: list[dict], image_folder: Path, out: Path, args, peak_rate: float, measured_row) -> dict:
    """Train the baseline for args.warmup + args.steps steps; one row of the bench table (bench.measured_row)."""
    from accelerate.state import AcceleratorState
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    # bf16 also on the CPU: SFTTrainer casts the trainable weights of a 4-bit model to bf16, so
    # an fp32 model fails there ("expected m1 and m2 to have the same dtype") without bf16 autocast.
    device = torch.device("cuda" if cuda else "cpu")
    model = load_base(base, bits=4, device=device, attention=getattr(args, "attention", "auto"), dtype=torch.bfloat16)
    processor = baseline_processor(base)
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.05,
        target_modules=lora_targets(model, "all-linear"),
        modules_to_save=[family_of_model(model).projector_name],
        bias="none",
        task_type="CAUSAL_LM",
    )
    config = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps + 1,  # + the memory step, as in bench.run_variant
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_length=args.seq_len,
        gradient_checkpointing=True,
        bf16=True,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        seed=0,
        use_cpu=not cuda,
    )
    clock = _StepClock(args.warmup, args.warmup + args.steps, cuda)

    class Trainer(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset or self.train_dataset)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            clock.batch(inputs, loss)
            return loss

    trainer = Trainer(
        model=model,
        args=config,
        train_dataset=messages_dataset(records, image_folder),
        processing_class=processor,
        peft_config=lora,
        callbacks=[_callback(TrainerCallback, clock)],
    )
    try:
        trainer.train()
    finally:
        # Trainer leaves accelerate's process-wide state set to bf16 mixed precision; a qllava run
        # later in the process (with its own setting) would be refused. transformers resets it the
        # same way before it builds its own.
        AcceleratorState._reset_state(reset_partial_state=True)
    model = trainer.model
    name = f"baseline: TRL {version()} SFTTrainer"
    timed = clock.batches[args.warmup : args.warmup + args.steps]
    row = measured_row(name, model, args.micro_batch, timed, clock.times, clock.losses, clock.memory, peak_rate)
    del trainer, model
    gc.collect()  # 4-bit weights reference their own layers (a cycle)
    if cuda:
        torch.cuda.empty_cache()
    return row


class _StepClock:
    """Step times, batches and losses of the timed steps; the memory peak reset when they start and
    the step after them (the memory step) run inside PeakMemory.step()."""

    def __init__(self, warmup: int, memory_step: int, cuda: bool):
        self.warmup, self.memory_step, self.cuda = warmup, memory_step, cuda
        self.memory = PeakMemory(torch.device("cuda" if cuda else "cpu"))
        self.batches: list[dict] = []
        self.times: list[float] = []
        self.losses: list[float] = []
        self._pending_loss = None
        self._start = 0.0
        self._profiling = contextlib.ExitStack()

    def begin(self, step: int) -> None:
        if step == self.warmup:
            self.memory.reset()
        if step == self.memory_step:
            self._profiling.enter_context(self.memory.step())
        if self.cuda:
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def batch(self, inputs: dict, loss: torch.Tensor) -> None:
        # Kept on the device until the step ends: reading them now would add a sync to the timed step.
        pixels = inputs.get("pixel_values")
        if pixels is not None and pixels.dim() == 5:  # AnyRes: (images, tiles, 3, H, W); every tile runs
            pixels = pixels.flatten(0, 1)
        images = pixels[:, :1, :1, :1] if pixels is not None else None  # step_flops needs only the count
        self.batches.append({"attention_mask": inputs["attention_mask"], "pixel_values": images})
        self._pending_loss = loss.detach()

    def end(self, step: int) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._start
        if step > self.memory_step:  # global_step has already counted this step
            self._profiling.close()
        elif step > self.warmup:
            self.times.append(elapsed)
            self.losses.append(float(self._pending_loss))
        self.batches[-1] = {k: v.cpu() if v is not None else None for k, v in self.batches[-1].items()}


def _callback(base, clock: _StepClock):
    class Clock(base):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.begin(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            clock.end(state.global_step)

    return Clock()
