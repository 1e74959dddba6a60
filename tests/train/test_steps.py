"""What one optimizer step does and logs: the rate it used, and no update when nothing carries loss."""

import json

import pytest
import torch
from safetensors.torch import load_file

from qllava.errors import QllavaError
from qllava.train.loop import train
from tests.conftest import make_recipe, run_metrics


def test_the_logged_lr_is_the_rate_the_step_used(tiny_base, tiny_data, tmp_path):
    """A 2-step cosine schedule without warmup runs step 1 at the peak and step 2 at half of it."""
    recipe = make_recipe(
        tiny_base,
        tiny_data,
        tmp_path / "run",
        optim={"schedule": "cosine", "lr": 1e-3, "projector_lr": 2e-4},
        train={"max_steps": 2},
    )
    train(recipe, progress=False)
    assert run_metrics(tmp_path / "run", "lr") == pytest.approx([1e-3, 5e-4])
    assert run_metrics(tmp_path / "run", "projector_lr") == pytest.approx([2e-4, 1e-4])


def test_a_step_without_trained_tokens_does_not_update(tiny_base, tmp_path, capsys):
    """Every reply cut by data.max_length: no step moves the weights (Adam's momentum would, on a zero
    gradient) or the schedule; the steps are counted, the user is warned once, the eval loss is null, and a
    run in which no step trained ends with an error instead of an untrained final/."""
    question = " ".join(["What color is the shape?"] * 12)
    records = [
        {"id": f"t{i}", "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "red"}]}
        for i in range(8)
    ]
    (tmp_path / "images").mkdir()
    (tmp_path / "train.json").write_text(json.dumps(records))
    recipe = make_recipe(
        tiny_base,
        tmp_path,
        tmp_path / "run",
        data={"max_length": 40, "eval": str(tmp_path / "train.json")},
        optim={"schedule": "cosine", "weight_decay": 0.1},
        train={"max_steps": 3, "save_every": 2, "eval_every": 3},
    )
    with pytest.raises(QllavaError, match="none of the 3 steps had a token that carries loss.*data.max_length=40"):
        train(recipe, progress=False)

    run = tmp_path / "run"
    assert run_metrics(run, "empty_steps") == [1, 1, 1]
    assert run_metrics(run, "loss") == [None, None, None]
    assert run_metrics(run, "lr") == pytest.approx([1e-3] * 3)  # the schedule did not move
    assert run_metrics(run, "tokens_per_s") == [0, 0, 0]  # no token went through the model
    assert run_metrics(run, "eval_loss") == [None]  # not 0.0, which would read as a perfect score
    assert capsys.readouterr().out.count("no trained token") == 1
    assert not (run / "final").exists()
    adapter = load_file(run / "checkpoint-2" / "adapter_model.safetensors")
    lora_b = [t for k, t in adapter.items() if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(t) == 0 for t in lora_b)  # still peft's initial zeros
    base = load_file(tiny_base / "model.safetensors")
    projector = {k.split("multi_modal_projector.")[1]: t for k, t in adapter.items() if "multi_modal_projector" in k}
    assert projector and all(torch.equal(t, base[f"multi_modal_projector.{k}"]) for k, t in projector.items())
