"""Samples whose image cannot be read when their batch comes, though it passed the start-up check.

The loader hands such a sample to the loop as a record instead of raising in a worker, so that every
process decides together (`data.on_bad_sample`): `stop` ends the run with a checkpoint of the last
completed step; `skip` leaves the sample out of its step and lists it in `bad_samples.jsonl`. The
same samples are skipped whenever the run is resumed, so the losses and adapter do not depend on it.
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import Dataset

from qllava.data.dataset import IGNORE_INDEX, UnreadableImage
from qllava.recipe import Recipe
from qllava.train.checkpoint import TrainState
from qllava.train.interrupt import StopAtCheckpoint

BAD_SAMPLES_FILE = "bad_samples.jsonl"


class DrawnSamples(Dataset):
    """The training set as the loader draws it: an unreadable image becomes a record, not an error."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            return self.dataset[index]
        except UnreadableImage as exc:
            return {"unreadable": {"id": exc.sample_id, "file": exc.path, "error": exc.cause, "kind": exc.kind}}


def collate_drawn(items: list[dict], collate, pad_token_id: int) -> dict:
    """`collate` over the readable samples; the unreadable ones are listed in the batch's `unreadable`."""
    readable = [item for item in items if "unreadable" not in item]
    # A micro-batch that lost every sample still runs, as one padding token without loss: under DDP
    # every process must run as many backward passes as the others.
    placeholder = {"input_ids": [pad_token_id], "labels": [IGNORE_INDEX], "pixel_values": None, "truncated": False}
    batch = collate(readable or [placeholder], pad_token_id=pad_token_id)
    batch["unreadable"] = [item["unreadable"] for item in items if "unreadable" in item]
    return batch


class BadSamples:
    """data.on_bad_sample applied to each accumulation window, alike on every process."""

    def __init__(self, recipe: Recipe, run_dir: Path, accelerator: Accelerator) -> None:
        self.recipe, self.accelerator = recipe, accelerator
        self.log = run_dir / BAD_SAMPLES_FILE

    def review(self, window: list[dict], count: int, state: TrainState) -> None:
        """`count`: the window's unreadable samples over every process. Raise StopAtCheckpoint, or record them."""
        if not count:
            return
        # Every process's records (a collective; all take this branch, since `count` is global).
        found = gather_object([record for batch in window for record in batch["unreadable"]])
        step = state.step + 1
        first = found[0]
        named = f"sample {first['id']!r}: cannot read {first['kind']} {first['file']} ({first['error']})"
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        if self.recipe.data.on_bad_sample == "stop":
            raise StopAtCheckpoint(
                f"step {step}: {named}{more}. Repair or replace the file and resume (removing the sample from "
                "data.train would change the epoch's order), or resume with data.on_bad_sample=skip to train on "
                "without it"
            )
        drawn = (
            step * self.recipe.train.micro_batch_size * self.recipe.train.grad_accum * self.accelerator.num_processes
        )
        skipped = state.skipped_samples + count
        if skipped > 1 and skipped > self.recipe.data.max_bad_fraction * drawn:
            raise StopAtCheckpoint(
                f"step {step}: {skipped} of the {drawn} samples drawn so far could not be read, more than "
                f"data.max_bad_fraction={self.recipe.data.max_bad_fraction} ({named}{more}; the others are in "
                f"{self.log}). Check that the image folder is reachable, then resume"
            )
        state.skipped_samples = skipped
        if self.accelerator.is_main_process:
            with open(self.log, "a") as f:
                # The log keeps its fields (step, id, file, error); `kind` only words the message.
                f.writelines(
                    json.dumps({"step": step} | {k: v for k, v in record.items() if k != "kind"}) + "\n"
                    for record in found
                )
        if skipped == count:  # the first ones of the run
            self.accelerator.print(
                f"\nqllava: warning: step {step}: {named}{more}; skipped (data.on_bad_sample=skip), "
                f"listed in {self.log}"
            )
