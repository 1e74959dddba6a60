"""The training recipe, top to bottom: setup -> train -> save.

One process per device under accelerate (`qllava train` or `accelerate launch -m qllava train`),
with DDP or, from an FSDP accelerate config, FSDP (`qllava.train.fsdp`); DeepSpeed is refused.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NoReturn

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
from qllava.model.families import config_of_model, forward_image_inputs
from qllava.model.fingerprint import check_trained_on
from qllava.model.load import check_base, describe, load_processor, resolve_attention, set_train_mode
from qllava.model.precision import default_device, precision_for
from qllava.recipe import Recipe, with_absolute_paths
from qllava.train import fsdp
from qllava.train.bad_samples import BadSamples, DrawnSamples, collate_drawn
from qllava.train.checkpoint import (
    TrainState,
    gather_rng_states,
    load_weights,
    prepare_run_dir,
    record_samples,
    resume_point,
    rotate,
    save_checkpoint,
)
from qllava.train.interrupt import StopAtCheckpoint, StopRequest, TrainingStopped
from qllava.train.loss import forward_loss_sum, trained_tokens
from qllava.train.metrics import MetricsLog, MetricsWindow, StepSums
from qllava.train.out_of_memory import out_of_memory_message
from qllava.train.parallel import DataParallel, parallelism_for


def _loader(dataset, sampler, recipe: Recipe, pad_token_id: int, device: torch.device, drawn=False) -> DataLoader:
    """Batches of `recipe.train.micro_batch_size` in the sampler's order (train and eval alike).

    `drawn`: for training, unreadable images reach the loop as records (`qllava.train.bad_samples`).
    """
    collate_fn = partial(collate_packed if recipe.data.packing else collate, pad_token_id=pad_token_id)
    if drawn:
        dataset = DrawnSamples(dataset)
        collate_fn = partial(collate_drawn, collate=collate_fn.func, pad_token_id=pad_token_id)
    # A private generator keeps worker seeding from consuming the global RNG, so resume is exact.
    return DataLoader(
        dataset,
        batch_size=recipe.train.micro_batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=recipe.data.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        generator=torch.Generator().manual_seed(recipe.train.seed),
    )


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
    packed = batch.get("position_ids") is not None
    return forward_loss_sum(
        model,
        batch["labels"].to(device),
        chunk_size,
        input_ids=batch["input_ids"].to(device),
        attention_mask=None if packed else batch["attention_mask"].to(device),
        position_ids=batch["position_ids"].to(device) if packed else None,
        # pixel_values and the family's extra image inputs
        **forward_image_inputs(batch, device, dtype, config_of_model(model)),
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


def _windows(sampler: GroupedSampler, loader: DataLoader, state: TrainState, accum: int) -> Iterator[list[dict]]:
    """Accumulation windows of micro-batches from the position `state` records; a window never spans two epochs."""
    while True:
        sampler.set_epoch(state.epoch, skip=state.consumed)
        batches = iter(loader)
        for _ in range(len(sampler) // loader.batch_size // accum):
            yield [next(batches) for _ in range(accum)]
        state.epoch, state.consumed = state.epoch + 1, 0


@dataclass
class _StepOutcome:
    sums: StepSums
    """Summed over the processes."""
    trained_tokens: int
    """Tokens that carry loss in the whole global batch."""
    lrs: tuple[float | None, float | None]
    """The rates the step used (the scheduler moves them after it)."""
    empty: bool = False
    overflow: bool = False
    nonfinite: bool = False
    skipped: int = 0
    """Samples left out of the step: their image could not be read (over the processes)."""
    stop: str = ""
    """Why the run must stop after this step (logged first): train.max_nonfinite_steps in a row."""


@dataclass
class _Run:
    """What setup built; every optimizer step, evaluation and checkpoint works on it."""

    recipe: Recipe
    accelerator: Accelerator
    parallel: DataParallel
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    processor: object
    state: TrainState
    dtype: torch.dtype
    eval_loader: DataLoader | None
    bad_samples: BadSamples
    empty_steps: int = 0
    """Steps of this launch without a trained token (each skipped)."""
    nonfinite_steps: int = 0
    """Steps of this launch whose loss or gradient norm was NaN or inf (each skipped)."""
    nonfinite_in_a_row: int = 0

    def step(self, window: list[dict], stop_requested: bool) -> _StepOutcome:
        """One optimizer step over an accumulation window, on every process.

        Raises StopAtCheckpoint, on every process alike, before a step the run cannot take: a sample that
        could not be read (data.on_bad_sample) and, in one process, running out of GPU memory. After
        train.max_nonfinite_steps non-finite steps in a row the outcome says to stop (`stop`).
        """
        accelerator, device, model = self.accelerator, self.accelerator.device, self.model
        outcome = _StepOutcome(StepSums(stop_requested=float(stop_requested)), 0, _group_lrs(self.optimizer))
        local = torch.stack(
            [sum(trained_tokens(b["labels"]) for b in window), torch.tensor(sum(len(b["unreadable"]) for b in window))]
        )
        global_tokens, unreadable = accelerator.reduce(local.to(device), "sum")
        outcome.skipped = unreadable.item()
        self.bad_samples.review(window, outcome.skipped, self.state)  # before the step: it may stop the run
        outcome.trained_tokens = global_tokens.item()
        if outcome.trained_tokens == 0:  # the same on every process, so all skip together
            # Nothing to learn from (every reply cut by data.max_length): a zero-gradient step would
            # still move the weights through Adam's momentum and advance the schedule.
            outcome.empty = True
            self.empty_steps += 1
            if self.empty_steps == 1:
                accelerator.print(
                    f"\nqllava: warning: step {self.state.step + 1} has no trained token in its batch (replies cut "
                    f"by data.max_length={self.recipe.data.max_length}?); such steps are skipped without an "
                    "update and counted as empty_steps in metrics.jsonl (the schedule waits for them)"
                )
        else:
            step_loss = self._backward(window, global_tokens)
            self.parallel.after_backward()
            # The norm before clipping (the same on every process: gradients are already reduced).
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), self.recipe.optim.max_grad_norm or math.inf)
            if self._nonfinite(step_loss, grad_norm):
                outcome.nonfinite = True  # no update: the weights stay those of the last finite step
                grad_norm = torch.zeros((), device=device)
                if accelerator.scaler is not None:
                    # fp16: clipping unscaled the gradients; without a step, the scaler must close the
                    # step itself (or the next unscale fails), lowering its scale as for an overflow.
                    accelerator.scaler.update()
            else:
                self.nonfinite_in_a_row = 0
                self.optimizer.step()
                if accelerator.optimizer_step_was_skipped:
                    # fp16: the loss scaler found inf/nan gradients (on every process alike, after the
                    # all-reduce), skipped the update and lowered the scale; the schedule waits too.
                    outcome.overflow = True
                    grad_norm = torch.zeros((), device=device)
                else:
                    self.scheduler.step()
                    self.state.updated_at = self.state.step + 1
            self.optimizer.zero_grad(set_to_none=True)
            outcome.sums.loss = step_loss
            outcome.sums.tokens = sum(b["attention_mask"].sum() for b in window)
            outcome.sums.grad_norm = grad_norm / accelerator.num_processes
        outcome.sums.truncated = sum(b["truncated"] for b in window)
        outcome.sums = outcome.sums.over_processes(accelerator)
        self.state.step += 1
        self.state.consumed += self.recipe.train.micro_batch_size * len(window)
        if self.nonfinite_in_a_row >= self.recipe.train.max_nonfinite_steps:
            outcome.stop = self._nonfinite_message()
        return outcome

    def _backward(self, window: list[dict], global_tokens: torch.Tensor) -> torch.Tensor:
        """Forward and backward over the window's micro-batches; their summed loss (this process's)."""
        accelerator, device, model = self.accelerator, self.accelerator.device, self.model
        # DDP averages gradients over processes, so each scales by world_size / global tokens.
        scale = accelerator.num_processes / global_tokens
        step_loss = torch.zeros((), device=device)
        failed = None
        try:
            for i, batch in enumerate(window):
                sync = contextlib.nullcontext() if i == len(window) - 1 else accelerator.no_sync(model)
                with sync:
                    micro_loss = _forward_loss(model, batch, device, self.dtype, self.parallel.loss_chunk_size)
                    accelerator.backward(micro_loss * scale)
                step_loss += micro_loss.detach()
        except torch.cuda.OutOfMemoryError:
            failed = batch
        if failed is None:
            return step_loss
        # Out of the except block, so that its traceback no longer holds the step's activations.
        micro_loss = step_loss = None
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        message = out_of_memory_message(self.recipe, self.state.step + 1, failed, self.accelerator)
        if accelerator.num_processes > 1:  # the other processes wait in a collective: no checkpoint now
            raise QllavaError(message)
        raise StopAtCheckpoint(message)

    def _nonfinite(self, step_loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether the step's loss or gradient norm is NaN/inf on any process (all get the same answer)."""
        finite = torch.isfinite(step_loss)
        if self.accelerator.scaler is None:  # fp16: inf gradients are the loss scaler's to handle
            finite &= torch.isfinite(grad_norm)
        nonfinite = self.accelerator.reduce((~finite).to(torch.int64), "sum").item() > 0
        if nonfinite:
            self.nonfinite_in_a_row += 1
            self.nonfinite_steps += 1
            if self.nonfinite_steps == 1:
                self.accelerator.print(
                    f"\nqllava: warning: step {self.state.step + 1}: the loss or gradient norm is not finite "
                    "(NaN or inf); the step is skipped without an update and counted as nonfinite_steps in "
                    f"metrics.jsonl; {self.recipe.train.max_nonfinite_steps} in a row stop the run"
                )
        return nonfinite

    def _nonfinite_message(self) -> str:
        first, last_update = self.state.step - self.nonfinite_in_a_row + 1, self.state.updated_at
        optim = self.recipe.optim
        return (
            f"steps {first}-{self.state.step}: the loss or gradient norm was NaN or inf "
            f"{self.nonfinite_in_a_row} times in a row (train.max_nonfinite_steps); none of them updated the "
            f"weights, so the checkpoint holds those of step {last_update}, the last step that did. Try a lower "
            f"optim.lr (now {optim.lr:g}) or optim.max_grad_norm (now {optim.max_grad_norm:g}); if that step's "
            "update was already harmful, resume from an earlier checkpoint instead"
        )

    def eval_due(self) -> bool:
        every = self.recipe.train.eval_every
        return self.eval_loader is not None and bool(every) and self.state.step % every == 0

    def evaluate(self, progress: bool) -> float | None:
        model, plan = self.parallel.eval_plan(self.model, self.eval_loader)
        return evaluate(model, self.eval_loader, self.accelerator, self.dtype, progress=progress, **plan)

    def stop_with_checkpoint(self, reason: StopAtCheckpoint, log_window: dict) -> NoReturn:
        """Write a checkpoint of the last completed step, then end the run with `reason` and how to continue."""
        checkpoint = self.checkpoint(log_window)
        command = f"qllava train {Path(self.recipe.output.dir) / 'recipe.yaml'} train.resume=auto"
        raise QllavaError(f"{reason}\nWrote {checkpoint}; continue with: {command}") from reason

    def checkpoint(self, log_window: dict) -> Path:
        """Write checkpoint-STEP of the last completed step and drop the ones beyond train.keep_last."""
        path = Path(self.recipe.output.dir) / f"checkpoint-{self.state.step}"
        if path.is_dir():  # this step's checkpoint was written already (a stop right after a periodic save)
            return path
        self.save(path, log_window)
        if self.accelerator.is_main_process:
            rotate(path.parent, self.recipe.train.keep_last)
        return path

    def save(self, path: Path, log_window: dict, with_optimizer: bool = True) -> None:
        """Write checkpoint `path` (every process calls it); `log_window`: the metrics line in progress."""
        accelerator = self.accelerator
        # Collectives first, on every process: RNG states, and under FSDP the sharded weights and optimizer.
        rng_states = gather_rng_states(accelerator) if with_optimizer else None
        self.state.log_window = log_window
        weights, optimizer_state = self.parallel.gather_for_save(self.model, self.optimizer, with_optimizer)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_checkpoint(
                path,
                model=accelerator.unwrap_model(self.model),
                processor=self.processor,
                recipe=self.recipe,
                state=self.state,
                optimizer=self.optimizer if with_optimizer else None,
                scheduler=self.scheduler,
                rng_states=rng_states,
                weights=weights,
                optimizer_state=optimizer_state,
                scaler=accelerator.scaler if with_optimizer else None,
            )
        accelerator.wait_for_everyone()  # no process exits (and takes the others down) mid-write


class _Progress:
    """What the run shows and keeps: the progress bar and the metrics lines."""

    def __init__(self, log: MetricsLog, recipe: Recipe, state: TrainState, total_steps: int, shown: bool) -> None:
        self.log, self.recipe, self.total_steps = log, recipe, total_steps
        self.bar = tqdm(total=total_steps, initial=state.step, disable=not shown, desc="train", unit="step")
        self.postfix: dict[str, str] = {}
        self.window = MetricsWindow.resumed(state.log_window)

    def step_done(self, state: TrainState, outcome: _StepOutcome) -> None:
        self.window.add(
            outcome.sums,
            outcome.trained_tokens,
            empty=outcome.empty,
            overflow=outcome.overflow,
            nonfinite=outcome.nonfinite,
            skipped=outcome.skipped,
        )
        if state.step % self.recipe.train.log_every == 0 or state.step == self.total_steps:
            record = self.window.record(state.step, outcome.lrs, state.epoch)
            self.log.write(record)
            lr = record["lr"] if record["lr"] is not None else record["projector_lr"]  # stage 1: no LoRA
            loss = "-" if record["loss"] is None else f"{record['loss']:.4f}"
            self.postfix.update(loss=loss, lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            # Samples cut by data.max_length in this line's steps: shown while they happen.
            self.postfix.pop("trunc", None)
            if record["truncated"]:
                self.postfix["trunc"] = str(record["truncated"])
            self.bar.set_postfix(self.postfix)
            self.window = MetricsWindow()
        self.bar.update(1)

    def eval_done(self, step: int, loss: float | None, accelerator: Accelerator) -> None:
        if loss is None:
            accelerator.print(
                "\nqllava: warning: no eval sample kept a trained token within "
                f"data.max_length={self.recipe.data.max_length}: eval_loss is null"
            )
        else:
            self.postfix["eval_loss"] = f"{loss:.4f}"
            self.bar.set_postfix(self.postfix)
            if accelerator.is_main_process:
                tqdm.write(f"qllava: step {step}: eval_loss {loss:.4f}")
        self.log.write({"step": step, "eval_loss": loss})


def _train_batches(train_set, recipe: Recipe, accelerator: Accelerator, pad_id: int):
    """(sampler, loader, optimizer steps per epoch) of this process's training micro-batches."""
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
    steps_per_epoch = len(sampler) // (micro * accum)
    if steps_per_epoch == 0:
        raise QllavaError(
            f"{len(train_set)} training samples are fewer than one optimizer step needs "
            f"({micro} x {accum} x {accelerator.num_processes} processes); lower "
            "train.micro_batch_size or train.grad_accum"
        )
    return sampler, _loader(train_set, sampler, recipe, pad_id, accelerator.device, drawn=True), steps_per_epoch


def _eval_loader(eval_set, recipe: Recipe, accelerator: Accelerator, pad_id: int) -> DataLoader:
    """This process's share of the eval samples (every num_processes-th one)."""
    shard = list(range(accelerator.process_index, len(eval_set), accelerator.num_processes))
    return _loader(eval_set, shard, recipe, pad_id, accelerator.device)


def _warn_other_template(processor, recipe: Recipe, say) -> None:
    built_for = template_named_by(getattr(processor, "chat_template", None))
    if built_for and built_for != recipe.data.template and recipe.data.template != "plain":
        say(
            f"qllava: warning: the base's chat template is qllava's `{built_for}`, but data.template is "
            f"`{recipe.data.template}`; set data.template={built_for} unless you mean to change it"
        )


def train(recipe: Recipe, *, progress: bool = True) -> Path:
    """Run a recipe; return the `final/` adapter directory."""
    from qllava.demo import resolve_demo_paths

    recipe = with_absolute_paths(resolve_demo_paths(recipe))  # the saved recipes work from any directory
    out, micro, accum = Path(recipe.output.dir), recipe.train.micro_batch_size, recipe.train.grad_accum
    trackers = "tensorboard" if importlib.util.find_spec("tensorboard") else None
    accelerator = make_accelerator(recipe, out, trackers)
    device, main, say = accelerator.device, accelerator.is_main_process, accelerator.print
    set_seed(recipe.train.seed)

    # --- setup: the run directory, the data, then the model: problems surface before minutes of loading ---
    parallel = parallelism_for(accelerator, recipe)
    resume_from, state = resume_point(recipe, world_size=accelerator.num_processes, fsdp=parallel.sharded)
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
    record_samples(state, train_set.samples, resume_from)
    pad_id = processor.tokenizer.pad_token_id
    sampler, loader, steps_per_epoch = _train_batches(train_set, recipe, accelerator, pad_id)
    model, _ = parallel.load_model()
    dtype = precision_for(device, recipe.train.mixed_precision).dtype
    say(
        f"qllava: {recipe.model.base} on {device}, LLM in {recipe.model.bits}-bit, "
        f"attention {resolve_attention(recipe.model.attention, device)}, optimizer {parallel.optimizer_name()}, "
        f"{str(dtype).replace('torch.', '')} base, mixed precision {accelerator.mixed_precision}\n{describe(model)}"
    )
    total_steps = recipe.train.max_steps or math.ceil(recipe.train.epochs * steps_per_epoch)
    processes = f"{accelerator.num_processes} process{'es' if accelerator.num_processes > 1 else ''}"
    say(
        f"qllava: {len(train_set)} samples, global batch {micro * accum * accelerator.num_processes} "
        f"({micro} x {accum} accumulation x {processes}), {steps_per_epoch} steps per epoch, "
        f"training {total_steps} steps"
    )
    _warn_other_template(processor, recipe, say)
    if resume_from is not None:
        load_weights(resume_from, model)
    model, optimizer, scheduler = parallel.prepare(model, total_steps)
    if resume_from is not None:
        parallel.restore(resume_from, model, optimizer, scheduler)
        say(f"qllava: resumed from {resume_from} at step {state.step}")
    eval_loader = None if eval_set is None else _eval_loader(eval_set, recipe, accelerator, pad_id)
    metrics = prepare_run_dir(out, recipe, state.step) if main else out / "metrics.jsonl"
    if main and trackers:
        accelerator.init_trackers("qllava")
    bad_samples = BadSamples(recipe, out, accelerator)
    run = _Run(
        recipe, accelerator, parallel, model, optimizer, scheduler, processor, state, dtype, eval_loader, bad_samples
    )
    shown = _Progress(MetricsLog(metrics, accelerator, trackers), recipe, state, total_steps, main and progress)

    # --- train ---
    set_train_mode(model)
    windows, first_step = _windows(sampler, loader, state, accum), state.step
    # The bar closes however the loop ends, so that a message after it starts on its own line.
    with StopRequest(announce=main) as stop, shown.bar:
        while state.step < total_steps:
            try:
                outcome = run.step(next(windows), stop.requested)
            except StopAtCheckpoint as reason:
                run.stop_with_checkpoint(reason, shown.window.sums())
            shown.step_done(state, outcome)
            if outcome.stop:
                run.stop_with_checkpoint(StopAtCheckpoint(outcome.stop), shown.window.sums())
            if run.eval_due():
                shown.eval_done(state.step, run.evaluate(main and progress), accelerator)
            stopping = outcome.sums.stop_requested > 0  # on every process, whichever saw the Ctrl-C
            save_every = recipe.train.save_every
            if stopping or (save_every and state.step % save_every == 0 and state.step < total_steps):
                checkpoint = run.checkpoint(shown.window.sums())
            if stopping:
                raise TrainingStopped(
                    f"interrupted at step {state.step}: wrote {checkpoint}; continue with train.resume=auto"
                )
    if run.empty_steps and run.empty_steps == state.step - first_step:  # 0 == 0: resumed at the last step
        raise QllavaError(
            f"none of the {run.empty_steps} steps had a token that carries loss: every reply was cut by "
            f"data.max_length={recipe.data.max_length}; raise it (`qllava data check` shows the sample lengths). "
            "Nothing was written to final/"
        )

    # --- finish ---
    if eval_loader is not None and not run.eval_due():  # the last step's evaluation, unless it just ran
        shown.eval_done(state.step, run.evaluate(main and progress), accelerator)
    run.save(out / "final", shown.window.sums(), with_optimizer=False)
    accelerator.end_training()
    say(f"qllava: done; {'adapter and projector' if recipe.lora.enabled else 'projector'} in {out / 'final'}")
    return out / "final"
