"""Faults during training: an image unreadable when its batch comes, NaN steps, running out of GPU memory."""

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from qllava.cli import app
from qllava.errors import QllavaError
from qllava.recipe import dump_recipe
from qllava.train import loop
from qllava.train.loop import train
from qllava.train.out_of_memory import smaller_micro_batch
from tests.conftest import adapter_tensors, make_recipe, max_abs_diff, run_metrics

SIX_STEPS = {"max_steps": 6, "save_every": 2, "keep_last": 5}


def corrupt(data_dir, name="5.png"):
    """The file stays (the start-up check only asks that it exists) but cannot be decoded any more."""
    (data_dir / "images" / name).write_bytes(b"\x89PNG\r\n\x1a\n truncated")


def test_a_bad_image_under_stop_checkpoints_and_resumes_to_the_same_adapter(tiny_base, tiny_data, tmp_path):
    steps = {"max_steps": 6, "save_every": 0}  # the only checkpoint is the one the stop writes
    good = tmp_path / "good"
    train(make_recipe(tiny_base, tiny_data, good, train=steps), progress=False)
    image = tiny_data / "images" / "8.png"  # drawn at step 3 (seed 0), after two steps that update the weights
    original = image.read_bytes()
    corrupt(tiny_data, "8.png")
    run = tmp_path / "run"
    with pytest.raises(QllavaError) as stopped:
        train(make_recipe(tiny_base, tiny_data, run, train=steps), progress=False)
    message = str(stopped.value)
    assert message.startswith(f"step 3: sample 's8': cannot read image {image}")
    assert f"Wrote {run / 'checkpoint-2'}" in message
    assert f"qllava train {run / 'recipe.yaml'} train.resume=auto" in message
    assert not (run / "final").exists()
    image.write_bytes(original)  # repaired
    train(make_recipe(tiny_base, tiny_data, run, train=steps | {"resume": "auto"}), progress=False)
    assert max_abs_diff(adapter_tensors(good), adapter_tensors(run)) < 1e-5
    assert run_metrics(run, "step") == [1, 2, 3, 4, 5, 6]


def test_skipped_bad_samples_are_listed_and_resume_is_exact(tiny_base, tiny_data, tmp_path):
    corrupt(tiny_data)
    skip = {"on_bad_sample": "skip", "max_bad_fraction": 0.5, "num_workers": 1}
    straight = tmp_path / "straight"
    train(make_recipe(tiny_base, tiny_data, straight, train=SIX_STEPS, data=skip), progress=False)
    listed = [json.loads(line) for line in (straight / "bad_samples.jsonl").read_text().splitlines()]
    assert [(r["id"], r["file"]) for r in listed] == [("s5", str(tiny_data / "images" / "5.png"))] * 2  # 2 epochs
    assert sum(run_metrics(straight, "skipped")) == 2
    resumed = tmp_path / "resumed"
    resume = SIX_STEPS | {"resume": str(straight / "checkpoint-2")}
    train(make_recipe(tiny_base, tiny_data, resumed, train=resume, data=skip), progress=False)
    assert max_abs_diff(adapter_tensors(straight), adapter_tensors(resumed)) < 1e-5
    later = [r for r in listed if r["step"] > 2]
    assert [json.loads(line) for line in (resumed / "bad_samples.jsonl").read_text().splitlines()] == later


def test_an_image_missing_at_start_up_is_skipped_under_skip(tiny_base, tiny_data, tmp_path, capsys):
    """A run stopped by a deleted image resumes with data.on_bad_sample=skip: the sample stays in the order."""
    (tiny_data / "images" / "5.png").unlink()
    run = tmp_path / "run"
    with pytest.raises(QllavaError, match="image `5.png` not found"):  # the default, stop: an error at start-up
        train(make_recipe(tiny_base, tiny_data, run, train=SIX_STEPS), progress=False)
    skip = {"on_bad_sample": "skip", "max_bad_fraction": 0.5}
    train(make_recipe(tiny_base, tiny_data, run, train=SIX_STEPS, data=skip), progress=False)
    assert "1 sample(s) of" in capsys.readouterr().out
    listed = [json.loads(line)["id"] for line in (run / "bad_samples.jsonl").read_text().splitlines()]
    assert listed == ["s5", "s5"] and sum(run_metrics(run, "skipped")) == 2


def test_a_bad_fraction_above_one_is_refused(tiny_base, tiny_data, tmp_path):
    with pytest.raises(QllavaError, match=r"data.max_bad_fraction` is a fraction between 0 and 1, got 2"):
        make_recipe(tiny_base, tiny_data, tmp_path, data={"max_bad_fraction": 2})


def test_too_many_skipped_samples_stop_the_run(tiny_base, tiny_data, tmp_path):
    for name in ("0.png", "1.png", "2.png"):
        corrupt(tiny_data, name)
    skip = {"on_bad_sample": "skip", "max_bad_fraction": 0.1}
    with pytest.raises(QllavaError, match=r"could not be read, more than data.max_bad_fraction=0.1"):
        train(make_recipe(tiny_base, tiny_data, tmp_path / "run", train=SIX_STEPS, data=skip), progress=False)


def poison(monkeypatch, steps, error=None, micro_batches_per_step=2):
    """The loss of every micro-batch of `steps` (1-based) becomes NaN, or raises `error`."""
    forward = loop._forward_loss
    calls = iter(range(10**6))

    def poisoned(*args, **kwargs):
        step = next(calls) // micro_batches_per_step + 1
        loss = forward(*args, **kwargs)
        if step in steps and error is not None:
            raise error
        return loss * float("nan") if step in steps else loss

    monkeypatch.setattr(loop, "_forward_loss", poisoned)


def test_a_nan_step_is_skipped_and_counted(tiny_base, tiny_data, tmp_path, monkeypatch):
    poison(monkeypatch, {3})
    run = tmp_path / "run"
    train(make_recipe(tiny_base, tiny_data, run, train=SIX_STEPS), progress=False)
    assert run_metrics(run, "nonfinite_steps") == [0, 0, 1, 0, 0, 0]
    losses = run_metrics(run, "loss")
    assert losses[2] is None and all(isinstance(x, float) for i, x in enumerate(losses) if i != 2)
    assert all(torch.isfinite(t).all() for t in adapter_tensors(run).values())
    # No update at step 3: the schedule waited, so step 4 used the lr step 3 would have used.
    lrs = run_metrics(run, "lr")
    assert lrs[3] == lrs[2]


def test_nan_steps_in_a_row_stop_with_the_last_finite_weights(tiny_base, tiny_data, tmp_path, monkeypatch):
    poison(monkeypatch, {3, 4, 5})
    run = tmp_path / "run"
    with pytest.raises(
        QllavaError, match=r"steps 3-5: the loss or gradient norm was NaN or inf 3 times in a row"
    ) as stopped:
        train(make_recipe(tiny_base, tiny_data, run, train=SIX_STEPS), progress=False)
    assert run_metrics(run, "nonfinite_steps") == [0, 0, 1, 1, 1]  # the last one logged before the stop
    assert "the checkpoint holds those of step 2, the last step that did" in str(stopped.value)
    last_finite = adapter_tensors(run, "checkpoint-2")
    assert max_abs_diff(adapter_tensors(run, "checkpoint-5"), last_finite) == 0
    assert max_abs_diff(adapter_tensors(run, "checkpoint-4"), last_finite) == 0
    assert not (run / "final").exists()


def test_out_of_memory_is_one_message_and_resumes_with_a_smaller_micro_batch(
    tiny_base, tiny_data, tmp_path, monkeypatch
):
    straight = tmp_path / "straight"
    train(make_recipe(tiny_base, tiny_data, straight, train=SIX_STEPS), progress=False)
    run = tmp_path / "run"
    recipe = make_recipe(tiny_base, tiny_data, run, train=SIX_STEPS)
    path = tmp_path / "recipe.yaml"
    dump_recipe(recipe, path)
    poison(monkeypatch, {4}, error=torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output and result.output.count("qllava: error:") == 1
    assert "step 4 ran out of GPU memory in a micro-batch of 2 sample(s) x" in result.output
    settings = "train.micro_batch_size=1 train.grad_accum=4"
    command = f"qllava train {run / 'recipe.yaml'} train.resume=auto {settings}"
    assert command in result.output.replace("\n", " ")
    assert f"Wrote {run / 'checkpoint-3'}" in result.output
    monkeypatch.undo()
    resumed = CliRunner().invoke(app, command.split()[1:])
    assert resumed.exit_code == 0, resumed.output
    assert run_metrics(run, "step") == [1, 2, 3, 4, 5, 6]
    # The same samples in every optimizer step, in micro-batches of 1: the uninterrupted run's adapter.
    assert max_abs_diff(adapter_tensors(straight), adapter_tensors(run)) < 1e-5


def test_a_resume_with_another_lr_continues_the_schedule_at_it(tiny_base, tiny_data, tmp_path):
    """The saved scheduler and optimizer carry the old base rates; the recipe's new ones must win."""
    run = tmp_path / "run"
    train(make_recipe(tiny_base, tiny_data, run, train=SIX_STEPS), progress=False)
    lowered = tmp_path / "lowered"
    resume = SIX_STEPS | {"resume": str(run / "checkpoint-4")}
    optim = {"lr": 1e-4, "projector_lr": 1e-4}
    train(make_recipe(tiny_base, tiny_data, lowered, train=resume, optim=optim), progress=False)
    assert run_metrics(lowered, "lr") == pytest.approx([x / 10 for x in run_metrics(run, "lr")[4:]], rel=1e-6)


FILL_THE_DISK_AFTER_THE_FIRST_CHECKPOINT = """
import resource, signal, sys
from qllava.train import loop
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing
rotate = loop.rotate
def rotate_then_limit(*args, **kwargs):
    rotate(*args, **kwargs)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY))
loop.rotate = rotate_then_limit
from qllava.cli import app
sys.argv = ["qllava", "train", sys.argv[1]]
app()
"""


def test_a_failed_checkpoint_write_keeps_the_previous_one_usable(tiny_base, tiny_data, tmp_path):
    """Real failing writes: after checkpoint-1, no file over 50 KB can be written (the adapter is larger)."""
    steps = {"max_steps": 4, "save_every": 1, "keep_last": 1}
    straight = tmp_path / "straight"
    train(make_recipe(tiny_base, tiny_data, straight, train=steps), progress=False)
    run = tmp_path / "run"
    path = tmp_path / "recipe.yaml"
    dump_recipe(make_recipe(tiny_base, tiny_data, run, train=steps), path)
    result = subprocess.run(
        [sys.executable, "-c", FILL_THE_DISK_AFTER_THE_FIRST_CHECKPOINT, str(path)], capture_output=True, text=True
    )
    assert result.returncode == 1, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("qllava: error:")]
    assert len(error) == 1 and "Traceback" not in result.stderr
    assert f"could not write {run / 'checkpoint-2'} (" in error[0]
    assert f"{run / 'checkpoint-1'} is complete and resumes" in error[0] and "MB are free there" in error[0]
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["checkpoint-1"]  # no half-written directory
    train(make_recipe(tiny_base, tiny_data, run, train=steps | {"resume": "auto"}), progress=False)
    assert max_abs_diff(adapter_tensors(straight), adapter_tensors(run)) < 1e-5


@pytest.mark.parametrize(
    ("micro", "planned", "expected"),
    [(8, None, 4), (8, 3, 2), (8, 16, 4), (6, None, 3), (2, None, 1), (1, None, 0), (8, 0, 0)],
)
def test_the_smaller_micro_batch_divides_the_one_that_failed(micro, planned, expected):
    assert smaller_micro_batch(micro, planned) == expected
