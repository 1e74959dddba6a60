"""What output.dir holds decides whether a run starts, resumes or is refused, before any model loads."""

import json

import pytest

from qllava.errors import QllavaError
from qllava.train import checkpoint as ckpt
from qllava.train.loop import train
from tests.conftest import make_recipe


def _snapshot(run):
    """Every file of a run directory with its bytes: what a refused run must leave alone."""
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_finished_run_is_never_trained_over(tiny_base, tiny_data, tmp_path):
    """The demo recipe's save_every 0 leaves final/ and no checkpoint: resume=auto used to retrain from step 0
    over it, replacing final/ and metrics.jsonl."""
    run = tmp_path / "run"
    train(make_recipe(tiny_base, tiny_data, run, train={"max_steps": 2}), progress=False)
    before = _snapshot(run)
    for resume in ("auto", ""):
        with pytest.raises(QllavaError, match=r"holds a finished run \(final/ at step 2\); choose another output.dir"):
            train(make_recipe(tiny_base, tiny_data, run, train={"max_steps": 2, "resume": resume}), progress=False)
    assert _snapshot(run) == before


def test_auto_resume_of_a_finished_run_with_checkpoints_names_them(tiny_base, tiny_data, tmp_path):
    run = tmp_path / "run"
    train(make_recipe(tiny_base, tiny_data, run, train={"max_steps": 3, "save_every": 2}), progress=False)
    with pytest.raises(QllavaError, match=r"final/ at step 3.*set train.resume to it and a new output.dir") as info:
        ckpt.find_resume("auto", run)
    assert str(run / "checkpoint-2") in str(info.value)


def test_auto_resume_refuses_a_run_that_wrote_no_checkpoint(tiny_base, tiny_data, tmp_path):
    """A run killed before its first checkpoint leaves metrics.jsonl and nothing to resume from."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    for resume in ("auto", ""):  # without auto too: "continue it with train.resume=auto" would lead nowhere
        with pytest.raises(QllavaError, match="holds a run that wrote no checkpoint.*choose another output.dir"):
            ckpt.find_resume(resume, run)
    assert ckpt.find_resume("auto", tmp_path / "new") is None  # a new directory starts
    (tmp_path / "empty").mkdir()
    assert ckpt.find_resume("auto", tmp_path / "empty") is None


def test_problems_that_need_no_model_are_found_before_it_loads(tiny_base, tiny_data, tmp_path):
    """model.base points nowhere: each of these must be reported instead of the base's loading error."""
    run = tmp_path / "run"
    train(make_recipe(tiny_base, tiny_data, run, train={"max_steps": 2, "save_every": 1}), progress=False)
    nowhere = tmp_path / "no-base"
    with pytest.raises(QllavaError, match="finished run"):
        train(make_recipe(nowhere, tiny_data, run, train={"resume": "auto"}), progress=False)
    with pytest.raises(QllavaError, match="already holds a run|finished run"):
        train(make_recipe(nowhere, tiny_data, run), progress=False)

    checkpoint = run / "checkpoint-1"
    resume = {"resume": str(checkpoint)}
    with pytest.raises(QllavaError, match=r"train.micro_batch_size=2 data.length_bucket=2"):
        train(make_recipe(nowhere, tiny_data, tmp_path / "a", train={**resume, "micro_batch_size": 1}), progress=False)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    (checkpoint / "trainer_state.json").write_text(json.dumps(state | {"world_size": 2}))
    with pytest.raises(QllavaError, match=r"written by a run of 2 process\(es\).*this run has 1"):
        train(make_recipe(nowhere, tiny_data, tmp_path / "b", train=resume), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_resume_from_a_path_never_trains_over_a_finished_or_another_run(tiny_base, tiny_data, tmp_path):
    run = tmp_path / "run"
    train(make_recipe(tiny_base, tiny_data, run, train={"max_steps": 3, "save_every": 2}), progress=False)
    checkpoint = str(run / "checkpoint-2")
    with pytest.raises(QllavaError, match=r"finished run \(final/ at step 3\).*choose a new output.dir"):
        ckpt.find_resume(checkpoint, run)
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    with pytest.raises(QllavaError, match="holds another run than the one train.resume"):
        ckpt.find_resume(checkpoint, other)
    assert ckpt.find_resume(checkpoint, tmp_path / "new") == run / "checkpoint-2"  # a new directory
    (run / "final").rename(tmp_path / "final")  # the run was killed before it finished: its own directory
    assert ckpt.find_resume(checkpoint, run) == run / "checkpoint-2"


def test_resume_over_other_samples_is_refused(tiny_base, tiny_data, tmp_path):
    """The epoch's order is a permutation of the training set: a checkpoint's position means nothing in another."""
    run = tmp_path / "run"
    train(make_recipe(tiny_base, tiny_data, run, train={"max_steps": 4, "save_every": 2}), progress=False)
    samples = json.loads((tiny_data / "train.json").read_text())
    (tiny_data / "train.json").write_text(json.dumps(samples[:-1]))
    resumed = make_recipe(tiny_base, tiny_data, tmp_path / "resumed", train={"resume": str(run / "checkpoint-2")})
    with pytest.raises(QllavaError, match="written by a run over 12 training samples and data.train now has 11"):
        train(resumed, progress=False)
    (tiny_data / "train.json").write_text(json.dumps(samples[::-1]))  # the same samples in another order
    with pytest.raises(QllavaError, match="12 training samples and data.train now holds others"):
        train(resumed, progress=False)
