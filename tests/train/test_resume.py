"""Resume continues the uninterrupted run exactly; checkpoints are atomic; Ctrl-C writes one."""

import json
import os
import shutil
import signal
import threading

import pytest
import torch
from safetensors.torch import load_file

from qllava.errors import QllavaError
from qllava.model.load import load_for_training
from qllava.train import checkpoint as ckpt
from qllava.train.loop import TrainingStopped, train
from tests.conftest import make_recipe


def resumable(data_dir, resume=""):
    """Dropout on (RNG matters), a metrics line and an evaluation every 2 steps, checkpoint at step 3 of 6:
    mid-way through a metrics line."""
    return {
        "lora": {"dropout": 0.1},
        "data": {"eval": str(data_dir / "train.json")},
        "train": {"max_steps": 6, "save_every": 3, "keep_last": 5, "log_every": 2, "eval_every": 2, "resume": resume},
    }


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run, key="loss"):
    return [line[key] for line in records(run) if key in line]


def test_resume_reproduces_the_uninterrupted_run(tiny_base, tiny_data, tmp_path):
    straight = tmp_path / "straight"
    train(make_recipe(tiny_base, tiny_data, straight, **resumable(tiny_data)), progress=False)
    half = straight / "checkpoint-3"
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "optimizer.pt",
        "scheduler.pt",
        "rng.pt",
        "trainer_state.json",
        "recipe.yaml",
        "tokenizer.json",
    } <= {p.name for p in half.iterdir()}
    resumed = tmp_path / "resumed"
    train(make_recipe(tiny_base, tiny_data, resumed, **resumable(tiny_data, resume=str(half))), progress=False)

    # Lines at steps 2, 4, 6, evaluations at the same steps (the last step's once); the resumed run writes those
    # after step 3, and its step-4 line averages steps 3 and 4 as the uninterrupted one does: the checkpoint
    # kept step 3's share of it.
    assert [line["step"] for line in records(straight)] == [2, 2, 4, 4, 6, 6]
    untimed = [{k: v for k, v in line.items() if k != "tokens_per_s"} for line in records(resumed)]
    expected = [{k: v for k, v in line.items() if k != "tokens_per_s"} for line in records(straight)[2:]]
    assert len(untimed) == len(expected) == 4
    for got, want in zip(untimed, expected):
        assert got == pytest.approx(want, abs=1e-5)
    a = load_file(straight / "final" / "adapter_model.safetensors")
    b = load_file(resumed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("multi_modal_projector" in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
    # The adapter did move away from its start, so equality above is not trivially true.
    start = load_file(half / "adapter_model.safetensors")
    assert any((a[k] - start[k]).abs().max() > 1e-4 for k in a)


def test_a_crash_mid_write_leaves_no_checkpoint(tiny_base, tiny_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    recipe = make_recipe(tiny_base, tiny_data, run, train={"max_steps": 2, "save_every": 1})
    train(recipe, progress=False)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-1"]
    model, processor = load_for_training(recipe, torch.device("cpu"))

    def explode(*args, **kwargs):
        raise OSError("disk full")

    # The adapter and processor are written, then the disk fills up.
    monkeypatch.setattr(ckpt, "dump_recipe", explode)
    with pytest.raises(QllavaError, match=r"could not write .*checkpoint-9 \(disk full\).*checkpoint-1 is complete"):
        ckpt.save_checkpoint(
            run / "checkpoint-9", model=model, processor=processor, recipe=recipe, state=ckpt.TrainState()
        )
    assert not (run / "checkpoint-9").exists()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-1"]


def test_ctrl_c_writes_a_checkpoint_and_auto_resume_finishes(tiny_base, tiny_data, tmp_path):
    run = tmp_path / "run"
    recipe = make_recipe(tiny_base, tiny_data, run, train={"max_steps": 100000, "log_every": 1})
    timer = threading.Timer(6.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(TrainingStopped, match="interrupted at step") as info:
            train(recipe, progress=False)
    finally:
        timer.cancel()
    saved = ckpt.list_checkpoints(run)
    assert len(saved) == 1 and saved[0].name in str(info.value)
    step = json.loads((saved[0] / "trainer_state.json").read_text())["step"]
    assert step == len(losses(run))
    with pytest.raises(QllavaError, match="already holds a run"):
        train(make_recipe(tiny_base, tiny_data, run), progress=False)
    finish = make_recipe(tiny_base, tiny_data, run, train={"max_steps": step + 2, "log_every": 1, "resume": "auto"})
    train(finish, progress=False)
    assert len(losses(run)) == step + 2 and (run / "final" / "adapter_model.safetensors").is_file()


def test_auto_resume_drops_metrics_lines_after_the_checkpoint(tiny_base, tiny_data, tmp_path):
    """A run killed after its checkpoint logged lines that the resumed run logs again."""
    run = tmp_path / "run"
    train(make_recipe(tiny_base, tiny_data, run, train={"max_steps": 3, "save_every": 2}), progress=False)
    shutil.rmtree(run / "final")  # killed before its end: the checkpoint at step 2 and lines up to step 3
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.0')  # a line cut short by the kill
    train(make_recipe(tiny_base, tiny_data, run, train={"max_steps": 3, "resume": "auto"}), progress=False)
    assert [line["step"] for line in records(run)] == [1, 2, 3]


def test_resume_with_another_data_order_is_refused(tiny_base, tiny_data, tmp_path):
    """grad_accum sets data.length_bucket by default; the checkpoint's consumed count only means
    something in the order it was drawn in."""
    run = tmp_path / "run"
    train(make_recipe(tiny_base, tiny_data, run, train={"max_steps": 2, "save_every": 1}), progress=False)
    state = json.loads((run / "checkpoint-1" / "trainer_state.json").read_text())
    assert (state["micro_batch"], state["length_bucket"]) == (2, 2)
    resume = {"max_steps": 3, "save_every": 1, "grad_accum": 1, "resume": str(run / "checkpoint-1")}
    resumed = tmp_path / "resumed"  # run/ is finished: a resume from its checkpoint goes into a new directory
    with pytest.raises(QllavaError, match=r"train.micro_batch_size=2 data.length_bucket=2"):
        train(make_recipe(tiny_base, tiny_data, resumed, train=resume), progress=False)
    train(make_recipe(tiny_base, tiny_data, resumed, train=resume, data={"length_bucket": 2}), progress=False)
    assert (resumed / "checkpoint-2").is_dir()
