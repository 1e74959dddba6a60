"""Self-describing checkpoints, written atomically, and the exact resume from them.

A checkpoint directory holds the PEFT adapter (projector included) or, for a stage-1 run without
LoRA, `projector.safetensors`; the processor, the resolved recipe, the identity of the base it was
trained on (`qllava_base.json`, see qllava.model.fingerprint), and `trainer_state.json` +
`optimizer.pt` + `scheduler.pt` + `rng.pt` (one RNG state per process) to resume exactly.
It is written under a temporary name and renamed when complete, so a crash mid-write never
leaves a directory that looks like a checkpoint. An FSDP run writes the same adapter files; its
`optimizer.pt` is FSDP's full optimizer state (keyed by parameter name), so it resumes under FSDP only.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file

from qllava.data.images import processor_to_save
from qllava.errors import QllavaError
from qllava.model.extras import load_extras, save_extras, split_extras
from qllava.model.families import family_of_model
from qllava.model.fingerprint import record_base
from qllava.model.projector import PROJECTOR_FILE, load_projector, save_projector
from qllava.recipe import Recipe, dump_recipe
from qllava.train.fsdp import strip_wrapper_names

ADAPTER_FILE = "adapter_model.safetensors"
BAD_SAMPLES_FILE = "bad_samples.jsonl"
STATE_FILE = "trainer_state.json"
SCALER_FILE = "scaler.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    consumed: int = 0
    """Samples of this epoch already consumed by this rank (the sampler skips them on resume)."""
    world_size: int = 1
    """Processes that trained; `consumed` and the RNG states are per process."""
    fsdp: bool = False
    """Trained under FSDP: optimizer.pt holds FSDP's full optimizer state dict."""
    micro_batch: int = 0
    """The sampler's micro-batch size (0: not recorded, checkpoints before it was)."""
    length_bucket: int = 1
    """The sampler's length bucket (1 in checkpoints written before it existed). With
    world_size and micro_batch it fixes the epoch's order, which `consumed` counts into."""
    samples: int = 0
    """Training samples the epoch's order was drawn from (0: not recorded)."""
    samples_digest: str = ""
    """A hash of their ids and images, in order: the same count of other samples is another order too."""
    updated_at: int = 0
    """The last step whose optimizer step updated the weights."""
    skipped_samples: int = 0
    """Samples left out so far because their image could not be read (data.on_bad_sample=skip)."""
    log_window: dict = field(default_factory=dict)
    """The sums of the metrics line in progress (steps since the last logged line), so that the
    resumed run's next line averages the same steps as the uninterrupted run's."""


def _rng_state() -> dict:
    """This process's RNG states as tensors, numbers and tuples: what `torch.load(weights_only=True)` reads."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(accelerator) -> list[dict]:
    """Every process's RNG state, in rank order (a collective: all ranks call it)."""
    from accelerate.utils import gather_object

    return gather_object([_rng_state()]) if accelerator.num_processes > 1 else [_rng_state()]


def save_checkpoint(
    path: Path,
    *,
    model,
    processor,
    recipe: Recipe,
    state: TrainState,
    optimizer=None,
    scheduler=None,
    rng_states: list[dict] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict | None = None,
    scaler=None,
) -> Path:
    """Write a complete checkpoint at `path` (replacing an older one of the same name).

    Under FSDP, `weights` (the gathered trainable parameters, named as in the unwrapped model) and
    `optimizer_state` replace what the sharded model and optimizer hold.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        _write_checkpoint(
            tmp, model, processor, recipe, state, optimizer, scheduler, rng_states, weights, optimizer_state, scaler
        )
    # A full disk, a quota, a vanished network mount: torch.save reports a failed write as a RuntimeError,
    # safetensors as its own error. Nothing half-written stays, and the older checkpoints are untouched.
    except (OSError, RuntimeError, SafetensorError) as exc:
        if isinstance(exc, RuntimeError) and "inline_container" not in str(exc):  # torch's writer; others are bugs
            raise
        written = _size(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(path.parent)
        needed = max([written] + [_size(p) for p in previous[-1:]])
        free = shutil.disk_usage(path.parent).free
        then = (
            f"; {previous[-1]} is complete and resumes (train.resume=auto). Free some space (or set "
            "train.keep_last lower), then resume"
            if previous
            else "; no earlier checkpoint was written (train.save_every), so free some space and train again"
        )
        raise QllavaError(
            f"could not write {path} ({_first_line(exc)}). A checkpoint needs about {needed / 1e6:.0f} MB and "
            f"{free / 1e6:.0f} MB are free there{then}"
        ) from exc
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) if directory.is_dir() else 0


def _write_checkpoint(
    tmp, model, processor, recipe, state, optimizer, scheduler, rng_states, weights, optimizer_state, scaler
) -> None:
    if isinstance(model, PeftModel):
        model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
        if weights is not None:  # FSDP: peft's keys keep the names of the nested FSDP units
            strip_wrapper_names(tmp / ADAPTER_FILE)
        save_extras(model, tmp / ADAPTER_FILE, weights)  # bare trained parameters peft leaves out
    else:  # stage 1: only the projector trained
        save_projector(model, tmp)
    tiles = family_of_model(model).tiles
    processor_to_save(processor, recipe.data.image_aspect, tiles=tiles).save_pretrained(tmp)
    dump_recipe(recipe, tmp / "recipe.yaml")
    record_base(recipe.model.base, tmp)
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    if optimizer is not None:
        torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_states or [_rng_state()], tmp / "rng.pt")
        if scaler is not None:  # fp16: the loss scale and its growth counter (plain numbers)
            (tmp / SCALER_FILE).write_text(json.dumps(scaler.state_dict()))
    give_weights_the_umask_mode(tmp)


def give_weights_the_umask_mode(directory: Path) -> None:
    """safetensors (0.8) writes each file through a temporary file, created readable by its owner only
    (0600), and renames it: weights would then be private while their siblings follow the umask."""
    umask = os.umask(0)
    os.umask(umask)
    for file in directory.glob("*.safetensors"):
        file.chmod(0o666 & ~umask)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete `checkpoint-STEP` directories of a run, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def run_dir_hint(path: Path) -> str | None:
    """When `path` is a run directory rather than a checkpoint: a message naming the checkpoints to pass."""
    if not _holds_run(path):
        return None
    checkpoints = list_checkpoints(path)
    if (path / "final").is_dir():
        latest = f" (or the latest checkpoint, {checkpoints[-1]})" if checkpoints else ""
        return f"`{path}` is a run directory, not a checkpoint: pass its final checkpoint, {path / 'final'}{latest}"
    if checkpoints:
        return f"`{path}` is a run directory, not a checkpoint: pass its latest checkpoint, {checkpoints[-1]}"
    return f"`{path}` is a run directory that holds no checkpoint yet (no final/ or checkpoint-STEP/)"


def rotate(run_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old)


def _holds_run(run_dir: Path) -> bool:
    return (run_dir / "metrics.jsonl").is_file() or (run_dir / "final").is_dir() or bool(list_checkpoints(run_dir))


def _finished_run(run_dir: Path) -> str:
    final = run_dir / "final"
    step = json.loads((final / STATE_FILE).read_text())["step"] if (final / STATE_FILE).is_file() else "?"
    return (
        f"output.dir `{run_dir}` holds a finished run (final/ at step {step}); choose another output.dir or delete it"
    )


def _run_without_checkpoint(run_dir: Path) -> str:
    return (
        f"output.dir `{run_dir}` holds a run that wrote no checkpoint (metrics.jsonl, no checkpoint-STEP/), so "
        "there is nothing to resume from; choose another output.dir or delete it (train.save_every sets how often "
        "checkpoints are written)"
    )


def find_resume(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint a run resumes from (None: it starts at step 0), refusing to train over a run.

    - "" (none): `run_dir` must not hold a run (metrics.jsonl, a checkpoint or final/).
    - `auto`: the latest checkpoint; a new or empty `run_dir` starts. A finished run (final/) is never
      trained over, even when it kept checkpoints (raising train.max_steps would recompute from one of them
      and replace final/ and metrics); neither is a run that wrote metrics but no checkpoint.
    - PATH: that checkpoint, into a new or empty `run_dir` or into the run it belongs to (its metrics lines
      after the checkpoint are dropped); never over a finished run or into another run's directory.
    """
    if resume == "auto":
        found = list_checkpoints(run_dir)
        if (run_dir / "final").is_dir():
            keep = f"; to train on from {found[-1]}, set train.resume to it and a new output.dir" if found else ""
            raise QllavaError(_finished_run(run_dir) + keep)
        if not found and _holds_run(run_dir):
            raise QllavaError(_run_without_checkpoint(run_dir))
        return found[-1] if found else None
    if not resume:
        if not _holds_run(run_dir):
            return None
        if (run_dir / "final").is_dir():
            raise QllavaError(_finished_run(run_dir))
        if not list_checkpoints(run_dir):
            raise QllavaError(_run_without_checkpoint(run_dir))
        raise QllavaError(
            f"output.dir `{run_dir}` already holds a run; continue it with train.resume=auto or choose another "
            "output.dir"
        )
    path = Path(resume)
    if (run_dir / "final").is_dir():
        raise QllavaError(_finished_run(run_dir) + f"; to train on from {path}, choose a new output.dir")
    if _holds_run(run_dir) and path.resolve().parent != run_dir.resolve():
        raise QllavaError(
            f"output.dir `{run_dir}` holds another run than the one train.resume `{resume}` belongs to; resuming "
            "into it would mix the two runs' checkpoints and metrics. Choose a new output.dir"
        )
    weights = PROJECTOR_FILE if (path / PROJECTOR_FILE).is_file() else ADAPTER_FILE
    missing = [f for f in (weights, STATE_FILE, "optimizer.pt") if not (path / f).is_file()]
    if missing:
        raise QllavaError(f"train.resume `{resume}` is not a complete checkpoint (missing {', '.join(missing)})")
    return path


def _images_key(sample) -> str:
    # Every image of a sample; one image or none reads as before samples could hold several ("None": none), so
    # that checkpoints written then still resume. A clip (never beside images) is marked as one, so that a video
    # and an image of the same path differ.
    return "\t".join(sample.images + [f"video:{name}" for name in sample.videos]) or "None"


def record_samples(state: TrainState, samples: list, checkpoint: Path | None) -> None:
    """Record the training samples in `state`, refusing others than those its checkpoint was drawn over.

    The epoch's order is a permutation of them: the same count of other samples, or the same samples in
    another order, would make the checkpoint's data position repeat some samples and skip others.
    """
    digest = hashlib.sha256("\n".join(f"{s.id}\t{_images_key(s)}" for s in samples).encode()).hexdigest()
    if (state.samples, state.samples_digest) not in ((0, ""), (len(samples), digest)):
        now = f"now has {len(samples)}" if state.samples != len(samples) else "now holds others (or another order)"
        raise QllavaError(
            f"checkpoint {checkpoint} was written by a run over {state.samples} training samples and data.train "
            f"{now}; the epoch's order is drawn over them, so resuming would repeat some samples and skip others. "
            "Resume with the data it was written with, or start a new output.dir"
        )
    state.samples, state.samples_digest = len(samples), digest


def resume_point(recipe: Recipe, *, world_size: int, fsdp: bool) -> tuple[Path | None, TrainState]:
    """(checkpoint to resume from or None, the state the run starts in), read before any model loads:
    what output.dir holds and whether its checkpoint fits this launch need no model."""
    launch = {
        "world_size": world_size,
        "fsdp": fsdp,
        "micro_batch": recipe.train.micro_batch_size,
        "length_bucket": recipe.data.length_bucket or recipe.train.grad_accum,  # as the sampler takes it
    }
    path = find_resume(recipe.train.resume, Path(recipe.output.dir))
    return path, TrainState(**launch) if path is None else resumable_state(path, **launch)


def _step_of(line: str) -> float:
    """Step of a metrics.jsonl line; a line cut short by a killed run counts as after any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def prepare_run_dir(run_dir: Path, recipe: Recipe, step: int) -> Path:
    """Create `run_dir` with its resolved recipe, without half-written checkpoints; return its metrics file
    (main process only).

    The logs are cut after `step`: lines logged after the checkpoint a run resumes from (by a run that
    went on and died) would repeat.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    for half_written in run_dir.glob(".*.tmp"):  # a checkpoint (or log) whose writer was killed
        shutil.rmtree(half_written, ignore_errors=True) if half_written.is_dir() else half_written.unlink()
    dump_recipe(recipe, run_dir / "recipe.yaml")
    for log in (run_dir / "metrics.jsonl", run_dir / BAD_SAMPLES_FILE):
        if log.exists():
            kept = [line for line in log.read_text().split("\n") if _step_of(line) <= step]
            # Replaced whole, so that a kill mid-rewrite leaves the old file rather than a cut one.
            log.with_name(f".{log.name}.tmp").write_text("".join(f"{line}\n" for line in kept))
            os.replace(log.with_name(f".{log.name}.tmp"), log)
    return run_dir / "metrics.jsonl"


def resumable_state(
    path: Path,
    *,
    world_size: int = 1,
    fsdp: bool = False,
    micro_batch: int = 0,
    length_bucket: int = 1,
) -> TrainState:
    """The trainer state of checkpoint `path`, if this run can continue it exactly (read before any model loads)."""
    state = TrainState(**json.loads((path / STATE_FILE).read_text()))
    if state.world_size != world_size:
        raise QllavaError(
            f"checkpoint {path} was written by a run of {state.world_size} process(es); resume it with the same "
            f"number (this run has {world_size}), since the data position and RNG states are per process"
        )
    recorded = (state.micro_batch or micro_batch, state.length_bucket)
    # A micro-batch divided by k with length_bucket (and grad_accum) times k draws the same buckets,
    # so each step trains the same samples in smaller pieces (`qllava.train.out_of_memory`).
    smaller = (
        micro_batch > 0 and recorded[0] % micro_batch == 0 and recorded[0] * recorded[1] == micro_batch * length_bucket
    )
    if recorded != (micro_batch, length_bucket) and not smaller:
        raise QllavaError(
            f"checkpoint {path} was written by a run that drew micro-batches of {recorded[0]} with "
            f"data.length_bucket {recorded[1]}, and this run uses {micro_batch} and {length_bucket}; the "
            "epoch's sample order depends on both, so resuming would repeat some samples and skip others. "
            f"Resume with train.micro_batch_size={recorded[0]} data.length_bucket={recorded[1]}"
        )
    if state.fsdp != fsdp:
        how = "written under FSDP and this run is not" if state.fsdp else "written without FSDP and this run uses it"
        raise QllavaError(
            f"checkpoint {path} was {how}; its optimizer state only resumes the way it was written: "
            "launch with the same accelerate config"
        )
    # From here on the run draws with this launch's settings (the same order, possibly in smaller pieces).
    state.micro_batch, state.length_bucket = micro_batch, length_bucket
    return state


def load_weights(path: Path, model) -> None:
    """Restore adapter + projector weights into the model before it is wrapped.

    Loading before `accelerator.prepare` works alike for DDP (which broadcasts rank 0's weights)
    and FSDP (which shards what the model holds).
    """
    if not isinstance(model, PeftModel):
        if not (path / PROJECTOR_FILE).is_file():
            raise QllavaError(f"checkpoint {path} holds a LoRA adapter, but this recipe trains no LoRA (lora.enabled)")
        load_projector(model, path)
    else:
        _load_adapter(path, model)


def load_training_state(path: Path, *, optimizer, scheduler, rank: int = 0, load_optimizer=None, scaler=None) -> None:
    """Restore optimizer, scheduler, fp16 loss scaler and this rank's RNG state (after `load_weights` and prepare).

    `load_optimizer(state)` replaces `optimizer.load_state_dict` (FSDP shards a full state).
    """
    wanted = [group["initial_lr"] for group in optimizer.param_groups]  # the recipe's rates
    (load_optimizer or optimizer.load_state_dict)(load_plain(path / "optimizer.pt"))
    scheduler.load_state_dict(load_plain(path / "scheduler.pt"))
    _keep_the_recipes_rates(optimizer, scheduler, wanted)
    if scaler is not None and (path / SCALER_FILE).is_file():
        scaler.load_state_dict(json.loads((path / SCALER_FILE).read_text()))
    rng = load_plain(path / "rng.pt", allow=_NUMPY_ARRAY)
    _set_rng_state(rng[rank] if isinstance(rng, list) else rng)  # a dict: written before per-process states


def _keep_the_recipes_rates(optimizer, scheduler, wanted: list[float]) -> None:
    """The saved scheduler and optimizer groups carry the checkpoint's base rates; a resume with another
    optim.lr / projector_lr would silently keep the old ones. Continue the schedule at the recipe's."""
    if list(scheduler.base_lrs) == wanted:
        return
    scheduler.base_lrs = list(wanted)
    for group, lr, factor in zip(optimizer.param_groups, wanted, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = lr, lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


# What unpickles a numpy array and nothing else: rng.pt of checkpoints written before the RNG states
# were kept as tensors holds numpy's generator state as an array (named numpy.core under numpy 1).
_reconstruct = np._core.multiarray._reconstruct
_NUMPY_ARRAY = [
    _reconstruct,
    (_reconstruct, "numpy.core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]


def load_plain(path: Path, allow: list | None = None):
    """A torch file of tensors, numbers, strings and containers, on the CPU; anything else is refused.

    Unpickling an arbitrary object can run any code, so a checkpoint from someone else could take over
    the machine on resume: `weights_only=True` reads only plain data (and the classes in `allow`).
    """
    try:
        with torch.serialization.safe_globals(allow or []):
            # CPU first: tensors saved by rank 0 would otherwise all land on its GPU in every process.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names what it refused: "Unsupported global: GLOBAL x.y" or "unsupported GLOBAL x.y whose ...".
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        raise QllavaError(
            f"{path} holds Python objects besides tensors and numbers{f' ({found[1]})' if found else ''}; "
            "loading them could run code, so qllava refuses. A checkpoint qllava wrote never does: was this "
            "file replaced or written by another program? Resume from a checkpoint you trust"
        ) from exc


def _load_adapter(path: Path, model) -> None:
    if not (path / ADAPTER_FILE).is_file():
        raise QllavaError(f"checkpoint {path} holds no LoRA adapter (a stage-1 run?), but this recipe trains LoRA")
    try:
        tensors = load_file(path / ADAPTER_FILE)
        extras = split_extras(model, tensors)
        result = set_peft_model_state_dict(model, tensors)
    except RuntimeError as exc:  # shape mismatch: another LoRA rank or base
        raise QllavaError(
            f"checkpoint {path} does not fit this model ({str(exc).splitlines()[-1].strip()}); "
            "was it trained with another model.base or LoRA setting?"
        ) from None
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise QllavaError(
            f"checkpoint {path} does not fit this model (unexpected weights such as {unexpected[0]}); "
            "was it trained from another model.base or LoRA setting?"
        )
    load_extras(model, extras, path)
