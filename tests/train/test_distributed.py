"""Two gloo processes (DDP on CPU) train exactly what one process does with the whole batch.

The 2-process runs go through `qllava train --num-processes 2`, i.e. `accelerate launch`, as a
user's would; the data holds text-only samples, so some steps leave the projector unused on
every rank (the DDP reduction trap in NOTES).
"""

import json
import sys

import pytest
import torch
import yaml
from transformers import AutoConfig

from qllava.data.sampler import GroupedSampler
from qllava.data.validate import dataset_from_recipe
from qllava.model.load import load_processor
from qllava.train.loop import train
from tests.conftest import adapter_tensors, make_recipe, max_abs_diff, run_launcher, run_metrics
from tests.test_cli import qllava_here

MICRO = 2  # per process; the 1-process reference takes 2 * MICRO
STEPS = 6


def _recipe(base, data, out, micro, **train):
    return make_recipe(
        base,
        data,
        out,
        train={"max_steps": STEPS, "micro_batch_size": micro, "grad_accum": 1, "keep_last": 5, **train},
    )


def _launch(recipe, tmp_path, *overrides):
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    return run_launcher([sys.executable, "-m", "qllava", "train", str(path), "--num-processes", "2", *overrides])


def test_two_processes_match_one_process_with_the_whole_batch(tiny_base, mixed_data, tmp_path):
    # Some of the steps trained are text-only on every rank (modality grouping keeps batches pure).
    one = tmp_path / "one"
    reference = _recipe(tiny_base, mixed_data, one, 2 * MICRO)
    dataset = dataset_from_recipe(
        reference, reference.data.train, load_processor(tiny_base), AutoConfig.from_pretrained(tiny_base)
    )
    lengths = dataset.modality_lengths()
    order = list(GroupedSampler(lengths, 2 * MICRO, seed=reference.train.seed))[: STEPS * 2 * MICRO]
    assert any(all(lengths[j] < 0 for j in order[i : i + 2 * MICRO]) for i in range(0, len(order), 2 * MICRO))

    train(reference, progress=False)
    two = tmp_path / "two"
    launched = _launch(_recipe(tiny_base, mixed_data, two, MICRO, save_every=3), tmp_path)
    assert "x 2 processes" in launched.stdout

    # Tolerances: fp32 sums taken in another order (two partial batches + all-reduce, other padding)
    # move the 7th digit (measured: losses and grad norms equal to 3e-7 relative, weights to 5e-6
    # absolute; one process at half the batch ends 6.5e-3 away). Adam
    # steps each weight by about lr = 1e-3 whatever its gradient's size, so rounding in near-zero
    # gradients shows up in the weights at a small fraction of lr; the bound is a twentieth of it.
    assert run_metrics(two, "loss") == pytest.approx(run_metrics(one, "loss"), rel=1e-5)
    assert run_metrics(two, "grad_norm") == pytest.approx(run_metrics(one, "grad_norm"), rel=1e-4)
    one_final, two_final = adapter_tensors(one), adapter_tensors(two)
    assert any("multi_modal_projector" in k for k in one_final)
    assert max_abs_diff(one_final, two_final) < 5e-5
    # The bound can fail: one process at the per-process micro-batch (half the data per step) ends
    # far outside it.
    half = tmp_path / "half"
    train(_recipe(tiny_base, mixed_data, half, MICRO), progress=False)
    assert max_abs_diff(one_final, adapter_tensors(half)) > 20 * 5e-5

    # Only rank 0 wrote: one metrics line per step, a checkpoint with one RNG state per process.
    assert len(run_metrics(two, "step")) == STEPS
    assert len(torch.load(two / "checkpoint-3" / "rng.pt", weights_only=False)) == 2
    assert json.loads((two / "checkpoint-3" / "trainer_state.json").read_text())["world_size"] == 2

    # Resume under DDP continues the uninterrupted 2-process run exactly.
    resumed = tmp_path / "resumed"
    recipe = _recipe(tiny_base, mixed_data, resumed, MICRO, resume=str(two / "checkpoint-3"))
    _launch(recipe, tmp_path)
    assert run_metrics(resumed, "loss") == pytest.approx(run_metrics(two, "loss")[3:], rel=1e-6)
    assert max_abs_diff(two_final, adapter_tensors(resumed)) < 1e-6
    assert max_abs_diff(adapter_tensors(two, "checkpoint-3"), two_final) > 1e-4  # it moved after the checkpoint

    # A checkpoint of 2 processes is refused by 1 with a clear message.
    code = qllava_here(
        "train", tmp_path / "recipe-0.yaml", f"train.resume={two / 'checkpoint-3'}", f"output.dir={tmp_path / 'x'}"
    )
    assert code.exit_code == 1 and "resume it with the same number" in code.stderr


def test_more_processes_than_the_machine_has_is_refused(tiny_base, mixed_data, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_base, mixed_data, tmp_path / "run", MICRO).to_dict()))
    result = qllava_here("train", recipe, "--num-processes", "4096")
    assert result.exit_code == 1
    assert "--num-processes 4096 is more than this machine allows" in result.stderr
    assert not (tmp_path / "run").exists()
