"""How the processes share the training: every difference between DDP (or one process) and FSDP.

The loop asks the object `parallelism_for` returns and never which kind it is: how the model
loads, how it and the optimizer are wrapped, what runs after the backward passes, what a checkpoint
gathers and restores, how evaluation runs, and whether the loss may read lm_head outside the forward.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator

from qllava.model.load import load_for_training
from qllava.model.precision import gpu_layout
from qllava.recipe import Recipe
from qllava.train import fsdp
from qllava.train.checkpoint import load_training_state
from qllava.train.optim import build_optimizer, build_scheduler, resolve_optimizer


class DataParallel:
    """One process, or DDP: each process holds the whole model and DDP averages the gradients."""

    sharded = False
    """Recorded in checkpoints: an FSDP optimizer state resumes only under FSDP, and the reverse."""

    def __init__(self, accelerator: Accelerator, recipe: Recipe) -> None:
        self.accelerator, self.recipe = accelerator, recipe
        self.loss_chunk_size = recipe.train.loss_chunk_size
        """`train.loss_chunk_size`, or 0 where lm_head's weight cannot be read outside the forward."""

    def optimizer_name(self) -> str:
        return resolve_optimizer(self.recipe.optim.name, self.accelerator.device, self.sharded)

    def load_model(self):
        """(model, processor) as `load_for_training` builds them for this kind of run."""
        return load_for_training(self.recipe, self.accelerator.device, fsdp=self.sharded)

    def prepare(self, model: torch.nn.Module, total_steps: int):
        """(wrapped model, optimizer, scheduler), ready for the loop."""
        optimizer = build_optimizer(model, self.recipe, self.accelerator.device)
        scheduler = build_scheduler(optimizer, self.recipe, total_steps)
        model, optimizer = self.accelerator.prepare(model, optimizer)
        return model, optimizer, scheduler

    def restore(self, path: Path, model, optimizer, scheduler) -> None:
        """Optimizer, scheduler, loss scaler and this process's RNG state from checkpoint `path`."""
        load_training_state(
            path,
            optimizer=optimizer,
            scheduler=scheduler,
            rank=self.accelerator.process_index,
            load_optimizer=self._optimizer_loader(model, optimizer),
            scaler=self.accelerator.scaler,
        )

    def _optimizer_loader(self, model, optimizer):
        return None  # the optimizer's own load_state_dict

    def after_backward(self) -> None:
        """Once per optimizer step, after the last micro-batch's backward (DDP reduced during it)."""

    def gather_for_save(self, model, optimizer, with_optimizer: bool) -> tuple[dict | None, dict | None]:
        """(trainable weights, optimizer state) for a checkpoint, where the model does not hold them whole.

        A collective under FSDP: every process calls it. None: the unwrapped model and optimizer hold them.
        """
        return None, None

    def eval_plan(self, model, loader) -> tuple[torch.nn.Module, dict]:
        """The model evaluation runs and the keyword arguments of `evaluate` for this kind of run."""
        # The unwrapped model: DDP's forward would expect every process to run the same batches.
        return self.accelerator.unwrap_model(model), {"chunk_size": self.loss_chunk_size}


class FullySharded(DataParallel):
    """FSDP (version 1) over the LLM's decoder layers and LoRA matrices; see `qllava.train.fsdp`."""

    sharded = True

    def __init__(self, accelerator: Accelerator, recipe: Recipe) -> None:
        fsdp.check(accelerator.state.fsdp_plugin, recipe)
        super().__init__(accelerator, recipe)
        self.loss_chunk_size = 0  # FSDP shards lm_head, whose weight the chunked loss reads outside the forward
        self._replicated: list[torch.nn.Parameter] = []

    def optimizer_name(self) -> str:
        name = super().optimizer_name()
        if self.recipe.optim.name == "auto" and gpu_layout(self.accelerator.device):
            name += " (auto under FSDP: 8-bit optimizer states do not shard)"
        return name

    def prepare(self, model: torch.nn.Module, total_steps: int):
        # FSDP replaces the trainable parameters by flat ones: the optimizer is built on those.
        model, self._replicated, sharding = fsdp.prepare(self.accelerator, model)
        self.accelerator.print(f"qllava: {sharding}")
        optimizer = build_optimizer(model, self.recipe, self.accelerator.device, fsdp=True)
        scheduler = build_scheduler(optimizer, self.recipe, total_steps)
        return model, self.accelerator.prepare(optimizer), scheduler

    def _optimizer_loader(self, model, optimizer):
        return partial(fsdp.load_optimizer_state, model, optimizer.optimizer)  # shards the full state

    def after_backward(self) -> None:
        # The vision tower and projector are replicated outside FSDP: their gradients are averaged here.
        fsdp.average_replicated_grads(self._replicated, self.accelerator.num_processes)

    def gather_for_save(self, model, optimizer, with_optimizer: bool) -> tuple[dict | None, dict | None]:
        weights = fsdp.gather_trainable(model)
        return weights, fsdp.optimizer_state(model, optimizer.optimizer) if with_optimizer else None

    def eval_plan(self, model, loader) -> tuple[torch.nn.Module, dict]:
        # The wrapped model (the unwrapped one holds only shards). Every forward gathers parameters with
        # the other processes, so all run as many eval forwards as the one with the most samples.
        per_process = math.ceil(len(loader.dataset) / self.accelerator.num_processes)
        filler = loader.collate_fn([loader.dataset[0]])
        return model, {"batches": math.ceil(per_process / loader.batch_size), "filler": filler}


def parallelism_for(accelerator: Accelerator, recipe: Recipe) -> DataParallel:
    """FSDP from an FSDP accelerate config (its settings checked against the recipe), DDP otherwise."""
    return (FullySharded if fsdp.enabled(accelerator) else DataParallel)(accelerator, recipe)
