"""recipes/demo.yaml runs a few steps through the real path and reproduces its recorded losses."""

import json

import pytest

from qllava.recipe import load_recipe
from qllava.train.loop import train

pytestmark = pytest.mark.recipe

# Recorded with: qllava train recipes/demo.yaml train.max_steps=6 train.log_every=1 data.eval=
# (demo cache v4, torch 2.13.0 CPU; step 5 is a text-only batch). The tolerance allows for other
# CPUs' float rounding in the pretraining that builds the demo base; a broken loss, mask or template
# moves these far more.
RECORDED = [0.50708, 0.52371, 0.46887, 0.47883, 3.00143, 0.47212]


def test_demo_recipe_reproduces_recorded_losses(tmp_path):
    recipe = load_recipe("demo", ["train.max_steps=6", "train.log_every=1", "data.eval=", f"output.dir={tmp_path}"])
    final = train(recipe, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(RECORDED, rel=0.02)
    assert (final / "adapter_model.safetensors").is_file() and (final / "recipe.yaml").is_file()


# Recorded with: qllava train recipes/demo-pretrain-projector.yaml train.max_steps=4 train.log_every=1
# (demo cache v4, torch 2.13.0 CPU): stage 1 of `qllava demo --two-stage` on the composed demo model.
RECORDED_STAGE1 = [4.73689, 4.84469, 4.29641, 3.86515]


def test_demo_stage1_recipe_reproduces_recorded_losses(tmp_path):
    recipe = load_recipe(
        "demo-pretrain-projector", ["train.max_steps=4", "train.log_every=1", f"output.dir={tmp_path}"]
    )
    final = train(recipe, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(RECORDED_STAGE1, rel=0.02)
    assert (final / "projector.safetensors").is_file() and not (final / "adapter_model.safetensors").exists()
