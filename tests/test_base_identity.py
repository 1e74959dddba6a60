"""An adapter or a trained projector meets only the base it was trained on; merge finds a moved base and data.

Every checkpoint records its base (qllava_base.json); chat, answer, merge and model.projector_from compare it
with the base they are given, through the real loading paths (4-bit bitsandbytes, peft) on the tiny models.
"""

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import yaml

from qllava.errors import QllavaError
from qllava.export import REPORT_FILE, merge_checkpoint
from qllava.generate import MERGED_RECIPE, load_for_inference
from qllava.model.fingerprint import BASE_RECORD, identify, read_record
from qllava.model.load import load_for_training
from qllava.model.projector import PROJECTOR_FILE
from qllava.model.tiny import build_tiny_llava
from qllava.train.checkpoint import TrainState, save_checkpoint
from qllava.train.loop import train
from tests.conftest import CORPUS, make_recipe
from tests.test_cli import qllava_here

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def export(trained_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "merged"
    merge_checkpoint(trained_adapter[1], out, dtype="fp32", verify=False)
    return out


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """The tiny base's exact architecture and shapes, other weights: an adapter of one loads on the other."""
    return build_tiny_llava(tmp_path_factory.mktemp("other") / "model", CORPUS, seed=1)


def chat(model, adapter, *extra):
    return qllava_here(
        "chat", model, "--adapter", adapter, "--prompt", "What color is the shape?", "--max-new-tokens", "4", *extra
    )


def test_checkpoints_record_their_base(trained_adapter):
    base, adapter, _ = trained_adapter
    assert read_record(adapter) == identify(base)
    assert read_record(adapter).path == str(base.resolve())


def test_an_adapter_on_a_merged_export_is_refused_by_name(trained_adapter, export, tmp_path):
    adapter = trained_adapter[1]
    result = chat(export, adapter)
    assert result.exit_code == 1, result.output
    assert "is a merged export: it already has an adapter merged in" in result.stderr
    assert "Traceback" not in result.stderr
    forced = chat(export, adapter, "--force")
    assert forced.exit_code == 0, forced.output
    assert "qllava: warning:" in forced.stderr and "--force: loading it anyway" in forced.stderr
    old = shutil.copytree(adapter, tmp_path / "old")  # a checkpoint written before the record: still refused
    (old / BASE_RECORD).unlink()
    assert "already has an adapter merged in" in chat(export, old).stderr


def test_an_adapter_from_a_base_of_the_same_shapes_is_refused(trained_adapter, other_base, tmp_path):
    base, adapter, data = trained_adapter
    result = chat(other_base, adapter)
    assert result.exit_code == 1, result.output
    assert f"was trained on {base.resolve()} (llava" in result.stderr
    assert "same architecture and shapes but other weights" in result.stderr and "--force" in result.stderr
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 0, "image": "0.png", "text": "What color is the shape?"}) + "\n")
    args = ["answer", other_base, questions, "--adapter", adapter, "--image-folder", data / "images"]
    refused = qllava_here(*args, "--out", tmp_path / "a.jsonl", "--max-new-tokens", "2")
    assert refused.exit_code == 1 and "other weights" in refused.stderr
    assert not (tmp_path / "a.jsonl").exists()
    forced = qllava_here(*args, "--out", tmp_path / "a.jsonl", "--max-new-tokens", "2", "--force")
    assert forced.exit_code == 0 and "--force: loading it anyway" in forced.stderr
    assert chat(base, adapter).exit_code == 0  # its own base


def test_a_stage1_projector_meets_only_its_base(tiny_base, tiny_data, other_base, tmp_path):
    recipe = make_recipe(tiny_base, tiny_data, tmp_path / "run", lora={"enabled": False}, data={"template": "plain"})
    model, processor = load_for_training(recipe, CPU)
    checkpoint = tmp_path / "final"
    save_checkpoint(checkpoint, model=model, processor=processor, recipe=recipe, state=TrainState())
    assert (checkpoint / PROJECTOR_FILE).is_file() and read_record(checkpoint) == identify(tiny_base)

    with pytest.raises(QllavaError, match="same architecture and shapes but other weights"):
        load_for_inference(other_base, checkpoint, device=CPU)
    for source in (checkpoint, checkpoint / PROJECTOR_FILE):
        stage2 = make_recipe(other_base, tiny_data, tmp_path / "s2", model={"projector_from": str(source)})
        with pytest.raises(QllavaError, match="other weights.*copy its projector.safetensors out of the checkpoint"):
            load_for_training(stage2, CPU)
    # On its own base it loads; a copy of the file alone (no record beside it) is the user's explicit choice.
    for base, source in ((tiny_base, checkpoint), (other_base, shutil.copy(checkpoint / PROJECTOR_FILE, tmp_path))):
        load_for_training(make_recipe(base, tiny_data, tmp_path / "s2", model={"projector_from": str(source)}), CPU)


def test_a_checkpoint_written_before_the_record_loads_with_a_warning(trained_adapter, tmp_path):
    base, adapter, _ = trained_adapter
    old = shutil.copytree(adapter, tmp_path / "old")
    (old / BASE_RECORD).unlink(missing_ok=True)  # as checkpoints written before the record are
    result = chat(base, old)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "does not record its base" in line]
    assert len(warnings) == 1 and warnings[0].startswith("qllava: warning:")


def edited_checkpoint(adapter: Path, where: Path, **sections) -> Path:
    """A copy of `adapter` whose recipe has `sections` (e.g. model={"base": ...}) changed: a base or data moved."""
    checkpoint = shutil.copytree(adapter, where)
    recipe = yaml.safe_load((checkpoint / "recipe.yaml").read_text())
    for section, values in sections.items():
        recipe[section].update(values)
    (checkpoint / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return checkpoint


def test_merge_with_a_moved_base(trained_adapter, other_base, export, tmp_path):
    base, adapter, data = trained_adapter
    checkpoint = edited_checkpoint(adapter, tmp_path / "ckpt", model={"base": str(tmp_path / "gone-base")})
    result = qllava_here("merge", checkpoint, "--out", tmp_path / "m0")
    assert result.exit_code == 1 and "is not there any more; pass where it is now with --base DIR" in result.stderr

    moved = shutil.copytree(base, tmp_path / "moved-base")
    result = qllava_here("merge", checkpoint, "--out", tmp_path / "m1", "--base", moved, "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m1" / REPORT_FILE).read_text())
    assert report["passed"] and report["base"] == str(moved)
    assert report["prompt_source"] == str(data / "train.json")
    assert yaml.safe_load((tmp_path / "m1" / MERGED_RECIPE).read_text())["model"]["base"] == str(moved)

    for wrong, message in ((other_base, "other weights"), (export, "already has an adapter merged in")):
        result = qllava_here("merge", checkpoint, "--out", tmp_path / "m2", "--base", wrong, "--no-verify")
        assert result.exit_code == 1 and message in result.stderr and "--force" in result.stderr
        assert not (tmp_path / "m2").exists()
    result = qllava_here("merge", checkpoint, "--out", tmp_path / "m3", "--base", other_base, "--no-verify", "--force")
    assert result.exit_code == 0 and "--force: loading it anyway" in result.stderr


def test_merge_says_loudly_when_it_verified_on_synthetic_prompts(trained_adapter, tmp_path):
    checkpoint = edited_checkpoint(trained_adapter[1], tmp_path / "ckpt", data={"train": str(tmp_path / "gone.json")})
    result = qllava_here("merge", checkpoint, "--out", tmp_path / "m", "--dtype", "fp32", "--verify-samples", "3")
    assert result.exit_code == 0, result.output
    assert "qllava: warning: none of the recipe's samples could be read" in result.stderr
    assert str(tmp_path / "gone.json") in result.stderr and "3 seeded synthetic prompts" in result.stderr
    report = json.loads((tmp_path / "m" / REPORT_FILE).read_text())
    assert report["prompt_source"] == "synthetic" and report["warnings"]


def test_saved_recipes_hold_absolute_paths_and_merge_verifies_on_the_data_from_anywhere(
    tiny_base, tiny_data, tmp_path, monkeypatch
):
    monkeypatch.chdir(tiny_data)
    relative_base = Path(os.path.relpath(tiny_base))
    recipe = make_recipe(relative_base, Path("."), Path("run"), train={"max_steps": 1, "grad_accum": 1})
    assert recipe.data.train == "train.json" and not recipe.model.base.startswith("/")
    final = train(recipe, progress=False).resolve()
    for saved in (tiny_data / "run" / "recipe.yaml", final / "recipe.yaml"):
        raw = yaml.safe_load(saved.read_text())
        assert raw["model"]["base"] == str(tiny_base)
        assert raw["data"]["train"] == str(tiny_data / "train.json")
        assert raw["data"]["image_folder"] == str(tiny_data / "images")
        # `qllava train RUN/recipe.yaml train.resume=auto` from another directory continues this run.
        assert raw["output"]["dir"] == str(tiny_data / "run")
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    report = merge_checkpoint(final, elsewhere / "merged", dtype="fp32")
    assert report.prompt_source == str(tiny_data / "train.json") and not report.warnings and report.passed


def test_a_run_directory_is_named_as_such(trained_adapter, tmp_path):
    base, adapter, _ = trained_adapter
    run = adapter.parent
    for result in (qllava_here("merge", run, "--out", tmp_path / "m"), chat(base, run)):
        assert result.exit_code == 1
        assert f"`{run}` is a run directory, not a checkpoint: pass its final checkpoint, {run / 'final'}" in (
            result.stderr
        )


def test_checkpoint_and_export_files_follow_the_umask(tiny_base, tiny_data, tmp_path):
    """safetensors writes through a 0600 temporary file; every file should get the mode the umask gives."""
    previous = os.umask(0o027)
    try:
        for lora in (True, False):
            recipe = make_recipe(tiny_base, tiny_data, tmp_path / "run", lora={"enabled": lora})
            model, processor = load_for_training(recipe, CPU)
            checkpoint = tmp_path / f"lora-{lora}"
            save_checkpoint(checkpoint, model=model, processor=processor, recipe=recipe, state=TrainState())
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in checkpoint.iterdir() if p.is_file()}
            assert set(modes.values()) == {0o640}, modes
        merge_checkpoint(tmp_path / "lora-True", tmp_path / "merged", dtype="fp32", verify=False)
        exported = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "merged").iterdir()}
        assert set(exported.values()) == {0o640}, exported
    finally:
        os.umask(previous)


def test_a_run_resumes_only_on_the_base_it_was_trained_on(tiny_base, tiny_data, other_base, tmp_path):
    train(make_recipe(tiny_base, tiny_data, tmp_path / "run", train={"max_steps": 2, "save_every": 1}), progress=False)
    checkpoint = tmp_path / "run" / "checkpoint-1"
    moved = make_recipe(other_base, tiny_data, tmp_path / "run2", train={"max_steps": 2, "resume": str(checkpoint)})
    with pytest.raises(QllavaError, match="fine-tune..; resume with the model.base it was trained on"):
        train(moved, progress=False)
