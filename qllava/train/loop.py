"""The training recipe, top to bottom: setup -> train -> save.

One process per device under accelerate (`qllava train` or `accelerate launch -m qllava train`),
with DDP or, from an FSDP accelerate config, FSDP (`qllava.train.fsdp`); DeepSpeed is refused.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState
from accelerate.utils import GradientAccumulationPlugin, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig

from qllava.data.dataset import collate
from qllava.data.packing import collate_packed
from qllava.data.sampler import GroupedSampler
from qllava.data.templates import template_named_by
from qllava.data.validate import datasets_from_recipe
from qllava.errors import QllavaError
from qllava.model.fingerprint import check_trained_on
from qllava.model.load import check_base, describe, load_for_training, load_processor, resolve_attention, set_train_mode
from qllava.model.precision import default_device, gpu_layout, precision_for
from qllava.recipe import Recipe, dump_recipe, with_absolute_paths
from qllava.train import fsdp
from qllava.train.checkpoint import (
    TrainState,
    find_resume,
    gather_rng_states,
    load_training_state,
    load_weights,
    resumable_state,
    rotate,
    save_checkpoint,
)
from qllava.train.loss import forward_loss_sum, trained_tokens
from qllava.train.optim import build_optimizer, build_scheduler, resolve_optimizer


def _loader(dataset, sampler, recipe: Recipe, pad_token_id: int, device: torch.device) -> DataLoader:
    """Batches of `recipe.train.micro_batch_size` in the sampler's order (train and eval alike)."""
    # A private generator keeps worker seeding from consuming the global RNG, so resume is exact.
    return DataLoader(
        dataset,
        batch_size=recipe.train.micro_batch_size,
        sampler=sampler,
        collate_fn=partial(collate_packed if recipe.data.packing else collate, pad_token_id=pad_token_id),
        num_workers=recipe.data.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        generator=torch.Generator().manual_seed(recipe.train.seed),
    )


@dataclass
class _Interval:
    """Sums over the optimizer steps since the last metrics line."""

    loss: float = 0.0
    grad_norm: float = 0.0
    steps: int = 0
    empty_steps: int = 0
    """Steps without a trained token in the whole global batch: skipped, no update."""
    overflow_steps: int = 0
    """fp16 only: steps whose loss-scaled gradients overflowed; the scaler skipped the update."""
    tokens: int = 0
    truncated: int = 0
    start: float = field(default_factory=time.perf_counter)

    def record(self, step: int, lrs: tuple[float | None, float | None], epoch: int) -> dict:
        with_loss = self.steps - self.empty_steps
        updated = with_loss - self.overflow_steps
        record = {
            "step": step,
            "loss": self.loss / with_loss if with_loss else None,
            "grad_norm": self.grad_norm / updated if updated else None,
            "lr": lrs[0],
            "projector_lr": lrs[1],
            "tokens_per_s": self.tokens / (time.perf_counter() - self.start),
            "truncated": self.truncated,
            "empty_steps": self.empty_steps,
            "epoch": epoch,
        }
        if self.overflow_steps:
            record["overflow_steps"] = self.overflow_steps
        return record

    def sums(self) -> dict:
        """The window so far, as a checkpoint keeps it: the sums and the seconds it has run."""
        sums = {name: value for name, value in asdict(self).items() if name != "start"}
        return sums | {"seconds": time.perf_counter() - self.start}

    @classmethod
    def resumed(cls, sums: dict) -> _Interval:
        """The window a checkpoint kept (`sums`), continued; empty for checkpoints written before they kept it."""
        sums = dict(sums)
        seconds = sums.pop("seconds", 0.0)
        return cls(**sums, start=time.perf_counter() - seconds)


def _step_of(line: str) -> float:
    """Step of a metrics.jsonl line; a line cut short by a killed run counts as after any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def _group_lrs(optimizer) -> tuple[float | None, float | None]:
    """Current lr of the `lora` and of the `projector` parameter groups (None when there is none)."""
    return tuple(
        next((g["lr"] for g in optimizer.param_groups if g["name"].startswith(kind)), None)
        for kind in ("lora", "projector")
    )


def _forward_loss(model, batch: dict, device: torch.device, dtype: torch.dtype, chunk_size: int = 0) -> torch.Tensor:
    """Summed loss of a micro-batch; chunk_size > 0 never builds the full logits (`forward_loss_sum`).

    A packed batch (`collate_packed`) runs with its position_ids and attention_mask=None, which is what
    makes transformers mask attention between the packed samples.
    """
    from qllava.model.families import forward_image_inputs  # here: the rest of this module is being reworked

    packed = batch.get("position_ids") is not None
    return forward_loss_sum(
        model,
        batch["labels"].to(device),
        chunk_size,
        input_ids=batch["input_ids"].to(device),
        attention_mask=None if packed else batch["attention_mask"].to(device),
        position_ids=batch["position_ids"].to(device) if packed else None,
        **forward_image_inputs(batch, device, dtype),  # pixel_values and the family's extra image inputs
        use_cache=False,
    )


@torch.no_grad()
def evaluate(
    model,
    loader: DataLoader,
    accelerator: Accelerator,
    dtype: torch.dtype,
    *,
    batches: int = 0,
    filler=None,
    chunk_size: int = 0,
    progress: bool = False,
) -> float | None:
    """Token-weighted mean loss over the whole loader (None when no eval token carries loss).

    Under FSDP every forward gathers parameters together with the other ranks, so a rank with fewer
    batches runs `filler` (its loss discarded) until it has run `batches` forwards like the others.
    """
    model.eval()
    total = torch.zeros((), device=accelerator.device)
    tokens = torch.zeros((), device=accelerator.device)
    done = 0
    for batch in tqdm(loader, desc="eval", unit="batch", leave=False, disable=not progress):
        with accelerator.autocast():  # the unwrapped model has no autocast of its own (fp32 projector, bf16 base)
            total += _forward_loss(model, batch, accelerator.device, dtype, chunk_size)
        tokens += trained_tokens(batch["labels"]).to(accelerator.device)
        done += 1
    for _ in range(batches - done):
        with accelerator.autocast():
            _forward_loss(model, filler, accelerator.device, dtype, chunk_size)
    set_train_mode(model)
    total, tokens = accelerator.reduce(total, "sum"), accelerator.reduce(tokens, "sum")
    return (total / tokens).item() if tokens.item() else None  # None: every eval reply cut by data.max_length


class TrainingStopped(KeyboardInterrupt):
    """The user's Ctrl-C stopped the run after it wrote a checkpoint: an interrupt, not an error
    (the CLI prints the message, which says how to continue, and exits 130 like any interrupt)."""


class _StopRequest:
    """First Ctrl-C asks the loop to checkpoint and stop at the next step boundary; a second one aborts."""

    def __init__(self, announce: bool = True) -> None:
        self.requested = False
        self.requested_at = 0.0
        self.announce = announce  # every process gets the terminal's Ctrl-C; one says so

    def __enter__(self):
        self._pid = os.getpid()
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        # Dataloader workers are forked with this handler and get the terminal's Ctrl-C too: they go on
        # serving batches, and the training process alone stops (and says so once).
        if os.getpid() != self._pid:
            return
        # Launchers forward the terminal's Ctrl-C, so one press can arrive twice within a moment.
        if self.requested and time.monotonic() - self.requested_at > 1.0:
            raise KeyboardInterrupt
        if self.requested:
            return
        self.requested, self.requested_at = True, time.monotonic()
        if self.announce:
            print(
                "\nqllava: stopping after this step and writing a checkpoint (Ctrl-C again to abort)", file=sys.stderr
            )

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


def make_accelerator(recipe: Recipe, out: Path, trackers: str | None = None) -> Accelerator:
    fsdp.refuse_deepspeed()
    device = default_device()
    mixed_precision = precision_for(device, recipe.train.mixed_precision).mixed_precision
    if mixed_precision == "fp16" and device.type != "cuda":
        # accelerate accepts it and then runs neither fp16 autocast nor loss scaling: it would train in fp32.
        raise QllavaError(
            "train.mixed_precision=fp16 needs a CUDA GPU (on a CPU accelerate runs no fp16 autocast or loss "
            "scaling); use train.mixed_precision=bf16 or no"
        )
    if AcceleratorState._shared_state.get("_mixed_precision", mixed_precision) != mixed_precision:
        # accelerate keeps the first run's precision process-wide and refuses another one, so a notebook
        # (or a test) that trains twice in one process could not change it. The process group stays.
        AcceleratorState._reset_state()
    accelerator = Accelerator(
        # Without a GPU, processes started by a launcher (`qllava train --num-processes N`) join a
        # gloo process group on the CPU; accelerate otherwise treats each as a lone process.
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        log_with=trackers,
        project_dir=str(out),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        # The loop scales losses for accumulation itself; an accelerate config's own accumulation
        # setting would divide them a second time.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1),
    )
    fsdp.enable_on_cpu(accelerator)
    return accelerator


def train(recipe: Recipe, *, progress: bool = True) -> Path:
    """Run a recipe; return the `final/` adapter directory."""
    from qllava.demo import resolve_demo_paths

    recipe = with_absolute_paths(resolve_demo_paths(recipe))  # the saved recipes work from any directory
    out = Path(recipe.output.dir)
    trackers = "tensorboard" if importlib.util.find_spec("tensorboard") else None
    accelerator = make_accelerator(recipe, out, trackers)
    device, main = accelerator.device, accelerator.is_main_process
    say = accelerator.print
    set_seed(recipe.train.seed)

    # --- setup: model, data, optimizer ---
    sharded = fsdp.enabled(accelerator)
    if sharded:
        fsdp.check(accelerator.state.fsdp_plugin, recipe)
    # What output.dir holds and whether its checkpoint fits this launch need no model: checked before
    # the minutes a large base takes to load.
    order = {
        "micro_batch": recipe.train.micro_batch_size,
        "length_bucket": recipe.data.length_bucket or recipe.train.grad_accum,
    }
    state = TrainState(world_size=accelerator.num_processes, fsdp=sharded, **order)
    resume_from = find_resume(recipe.train.resume, out)
    if resume_from is not None:
        state = resumable_state(resume_from, world_size=accelerator.num_processes, fsdp=sharded, **order)
    optimizer_name = resolve_optimizer(recipe.optim.name, device, sharded)
    if sharded and recipe.optim.name == "auto" and gpu_layout(device):
        optimizer_name += " (auto under FSDP: 8-bit optimizer states do not shard)"
    # Data first: a problem in it is reported before the weights take minutes to load.
    processor = load_processor(check_base(recipe.model.base))
    if resume_from is not None:
        check_trained_on(
            resume_from,
            recipe.model.base,
            remedy="resume with the model.base it was trained on, or start a new output.dir",
        )
    train_set, eval_set = datasets_from_recipe(
        recipe, processor, AutoConfig.from_pretrained(recipe.model.base), warn=say
    )
    model, _ = load_for_training(recipe, device, fsdp=sharded)
    dtype = precision_for(device, recipe.train.mixed_precision).dtype
    say(
        f"qllava: {recipe.model.base} on {device}, LLM in {recipe.model.bits}-bit, "
        f"attention {resolve_attention(recipe.model.attention, device)}, "
        f"optimizer {optimizer_name}, "
        f"{str(dtype).replace('torch.', '')} base, mixed precision {accelerator.mixed_precision}\n{describe(model)}"
    )
    micro, accum = recipe.train.micro_batch_size, recipe.train.grad_accum
    sampler = GroupedSampler(
        train_set.modality_lengths(),
        micro,
        seed=recipe.train.seed,
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
        group_by_modality_length=recipe.data.group_by_modality_length,
        length_bucket=recipe.data.length_bucket or accum,
    )
    pad_id = processor.tokenizer.pad_token_id
    loader = _loader(train_set, sampler, recipe, pad_id, device)
    steps_per_epoch = len(sampler) // (micro * accum)
    if steps_per_epoch == 0:
        raise QllavaError(
            f"{len(train_set)} training samples are fewer than one optimizer step needs "
            f"({micro} x {accum} x {accelerator.num_processes} processes); lower "
            "train.micro_batch_size or train.grad_accum"
        )
    total_steps = recipe.train.max_steps or math.ceil(recipe.train.epochs * steps_per_epoch)
    processes = f"{accelerator.num_processes} process{'es' if accelerator.num_processes > 1 else ''}"
    say(
        f"qllava: {len(train_set)} samples, global batch {micro * accum * accelerator.num_processes} "
        f"({micro} x {accum} accumulation x {processes}), {steps_per_epoch} steps per epoch, "
        f"training {total_steps} steps"
    )
    built_for = template_named_by(getattr(processor, "chat_template", None))
    if built_for and built_for != recipe.data.template and recipe.data.template != "plain":
        say(
            f"qllava: warning: the base's chat template is qllava's `{built_for}`, but data.template is "
            f"`{recipe.data.template}`; set data.template={built_for} unless you mean to change it"
        )
    if resume_from is not None:
        load_weights(resume_from, model)
    replicated = []
    if sharded:
        # FSDP replaces the trainable parameters by flat ones: the optimizer is built on those.
        model, replicated, sharding = fsdp.prepare(accelerator, model)
        say(f"qllava: {sharding}")
        optimizer = build_optimizer(model, recipe, device, fsdp=True)
        scheduler = build_scheduler(optimizer, recipe, total_steps)
        optimizer = accelerator.prepare(optimizer)
    else:
        optimizer = build_optimizer(model, recipe, device)
        scheduler = build_scheduler(optimizer, recipe, total_steps)
        model, optimizer = accelerator.prepare(model, optimizer)
    if resume_from is not None:
        load_training_state(
            resume_from,
            optimizer=optimizer,
            scheduler=scheduler,
            rank=accelerator.process_index,
            load_optimizer=partial(fsdp.load_optimizer_state, model, optimizer.optimizer) if sharded else None,
            scaler=accelerator.scaler,
        )
        say(f"qllava: resumed from {resume_from} at step {state.step}")
    eval_loader = None
    if eval_set is not None:
        shard = list(range(accelerator.process_index, len(eval_set), accelerator.num_processes))
        eval_loader = _loader(eval_set, shard, recipe, pad_id, device)
        # Under FSDP all ranks run as many eval forwards as the one with the most samples.
        eval_batches = math.ceil(math.ceil(len(eval_set) / accelerator.num_processes) / micro) if sharded else 0
        eval_filler = (collate_packed if recipe.data.packing else collate)([eval_set[0]], pad_token_id=pad_id)
    metrics = out / "metrics.jsonl"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        dump_recipe(recipe, out / "recipe.yaml")
        if metrics.exists():
            # Lines logged after the checkpoint (by a run that went on and died) would repeat.
            kept = [ln for ln in metrics.read_text().split("\n") if _step_of(ln) <= state.step]
            metrics.write_text("".join(f"{ln}\n" for ln in kept))
        if trackers:
            accelerator.init_trackers("qllava")

    def save(path: Path, with_optimizer: bool = True) -> None:
        # Collectives first, on every rank: RNG states, and under FSDP the sharded weights and optimizer.
        rng_states = gather_rng_states(accelerator) if with_optimizer else None
        state.log_window = interval.sums()
        weights = fsdp.gather_trainable(model) if sharded else None
        optimizer_state = fsdp.optimizer_state(model, optimizer.optimizer) if sharded and with_optimizer else None
        accelerator.wait_for_everyone()
        if main:
            save_checkpoint(
                path,
                model=accelerator.unwrap_model(model),
                processor=processor,
                recipe=recipe,
                state=state,
                optimizer=optimizer if with_optimizer else None,
                scheduler=scheduler,
                rng_states=rng_states,
                weights=weights,
                optimizer_state=optimizer_state,
                scaler=accelerator.scaler if with_optimizer else None,
            )
        accelerator.wait_for_everyone()  # no rank exits (and takes the others down) mid-write

    def log(record: dict) -> None:
        if main:
            with open(metrics, "a") as f:
                f.write(json.dumps(record) + "\n")
            if trackers:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def log_eval() -> None:
        # DDP: the unwrapped model, since DDP's forward would expect every rank to run the same batches.
        # FSDP: the wrapped one (the unwrapped one holds only shards), with every rank running as many.
        shown = main and progress
        if sharded:
            loss = evaluate(
                model, eval_loader, accelerator, dtype, batches=eval_batches, filler=eval_filler, progress=shown
            )
        else:
            loss = evaluate(
                accelerator.unwrap_model(model), eval_loader, accelerator, dtype, chunk_size=chunk_size, progress=shown
            )
        if loss is None:
            say(
                "\nqllava: warning: no eval sample kept a trained token within "
                f"data.max_length={recipe.data.max_length}: eval_loss is null"
            )
        else:
            postfix["eval_loss"] = f"{loss:.4f}"
            bar.set_postfix(postfix)
            if main:
                tqdm.write(f"qllava: step {state.step}: eval_loss {loss:.4f}")
        log({"step": state.step, "eval_loss": loss})

    def eval_due() -> bool:
        return eval_loader is not None and bool(recipe.train.eval_every) and state.step % recipe.train.eval_every == 0

    def windows():
        """Accumulation windows of micro-batches; a window never spans two epochs."""
        while True:
            sampler.set_epoch(state.epoch, skip=state.consumed)
            batches = iter(loader)
            for _ in range(len(sampler) // micro // accum):
                yield [next(batches) for _ in range(accum)]
            state.epoch, state.consumed = state.epoch + 1, 0

    # FSDP shards lm_head, whose weight the chunked loss reads outside the forward.
    chunk_size = 0 if sharded else recipe.train.loss_chunk_size

    # --- train ---
    set_train_mode(model)
    bar = tqdm(total=total_steps, initial=state.step, disable=not (main and progress), desc="train", unit="step")
    postfix: dict[str, str] = {}
    interval = _Interval.resumed(state.log_window)
    stream = windows()
    first_step, empty_total = state.step, 0
    with _StopRequest(announce=main) as stop:
        while state.step < total_steps:
            window = next(stream)
            local_tokens = sum(trained_tokens(b["labels"]) for b in window).to(device)
            global_tokens = accelerator.reduce(local_tokens.clone(), "sum")
            step_loss = torch.zeros((), device=device)
            grad_norm = torch.zeros((), device=device)
            lrs = _group_lrs(optimizer)  # the rates this step uses: the scheduler moves them after it
            empty = global_tokens.item() == 0  # the same on every rank, so all skip together
            if empty:
                # Nothing to learn from (every reply cut by data.max_length): a zero-gradient step would
                # still move the weights through Adam's momentum and advance the schedule.
                interval.empty_steps += 1
                empty_total += 1
                if empty_total == 1:
                    say(
                        f"\nqllava: warning: step {state.step + 1} has no trained token in its batch (replies cut "
                        f"by data.max_length={recipe.data.max_length}?); such steps are skipped without an "
                        "update and counted as empty_steps in metrics.jsonl (the schedule waits for them)"
                    )
            else:
                # DDP averages gradients over ranks, so each rank scales by world_size / global tokens.
                scale = accelerator.num_processes / global_tokens
                for i, batch in enumerate(window):
                    sync = contextlib.nullcontext() if i == accum - 1 else accelerator.no_sync(model)
                    with sync:
                        micro_loss = _forward_loss(model, batch, device, dtype, chunk_size)
                        accelerator.backward(micro_loss * scale)
                    step_loss += micro_loss.detach()
                fsdp.average_replicated_grads(replicated, accelerator.num_processes)  # FSDP: the projector
                # The norm before clipping (the same on every rank: gradients are already reduced).
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), recipe.optim.max_grad_norm or math.inf)
                optimizer.step()
                if accelerator.optimizer_step_was_skipped:
                    # fp16: the loss scaler found inf/nan gradients (on every rank alike, after the
                    # all-reduce), skipped the update and lowered the scale; the schedule waits too.
                    interval.overflow_steps += 1
                    grad_norm = torch.zeros((), device=device)
                else:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.consumed += micro * accum

            # One all-reduce and one host sync per step for everything logged, and the Ctrl-C flag:
            # every rank must take the same branch below, whichever of them saw the Ctrl-C.
            local = [
                step_loss,
                0 if empty else sum(b["attention_mask"].sum() for b in window),  # tokens that ran
                sum(b["truncated"] for b in window),
                int(stop.requested),
                grad_norm / accelerator.num_processes,
            ]
            summed = accelerator.reduce(
                torch.stack([torch.as_tensor(x, dtype=torch.float64, device=device) for x in local]), "sum"
            ).tolist()
            interval.loss += summed[0] / max(global_tokens.item(), 1)
            interval.steps += 1
            interval.tokens += int(summed[1])
            interval.truncated += int(summed[2])
            stopping = summed[3] > 0
            interval.grad_norm += summed[4]
            if state.step % recipe.train.log_every == 0 or state.step == total_steps:
                record = interval.record(state.step, lrs, state.epoch)
                log(record)
                lr = record["lr"] if record["lr"] is not None else record["projector_lr"]  # stage 1: no LoRA
                loss = "-" if record["loss"] is None else f"{record['loss']:.4f}"
                postfix.update(loss=loss, lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                # Samples cut by data.max_length in this line's steps: shown while they happen.
                postfix.pop("trunc", None)
                if record["truncated"]:
                    postfix["trunc"] = str(record["truncated"])
                bar.set_postfix(postfix)
                interval = _Interval()
            bar.update(1)
            if eval_due():
                log_eval()
            if stopping or (
                recipe.train.save_every and state.step % recipe.train.save_every == 0 and state.step < total_steps
            ):
                save(out / f"checkpoint-{state.step}")
                if main:
                    rotate(out, recipe.train.keep_last)
            if stopping:
                bar.close()
                raise TrainingStopped(
                    f"interrupted at step {state.step}: wrote {out / f'checkpoint-{state.step}'}; "
                    "continue with train.resume=auto"
                )
    bar.close()
    if empty_total and empty_total == state.step - first_step:  # 0 == 0: resumed at the last step
        raise QllavaError(
            f"none of the {empty_total} steps had a token that carries loss: every reply was cut by "
            f"data.max_length={recipe.data.max_length}; raise it (`qllava data check` shows the sample lengths). "
            "Nothing was written to final/"
        )

    # --- save ---
    if eval_loader is not None and not eval_due():  # the last step's evaluation, unless it just ran
        log_eval()
    save(out / "final", with_optimizer=False)
    accelerator.end_training()
    say(f"qllava: done; {'adapter and projector' if recipe.lora.enabled else 'projector'} in {out / 'final'}")
    return out / "final"
