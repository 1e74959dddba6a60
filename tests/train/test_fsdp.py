"""FSDP + QLoRA on two gloo processes (CPU): the 4-bit base is sharded, the run trains what one
process does with the whole batch, and it saves and resumes like a DDP run.

The runs go through the user's commands: `qllava train --num-processes 2 --accelerate-config
recipes/accelerate/fsdp-qlora.yaml`, and `accelerate launch --config_file ... -m qllava train` for the
resume. The data holds text-only samples, so a rank's batch can skip the vision tower and projector
while the other's runs them; the 5-sample eval set gives the ranks 2 and 1 batches.
"""

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import bitsandbytes as bnb
import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import FullyShardedDataParallelPlugin

from qllava.errors import QllavaError
from qllava.generate import load_for_inference
from qllava.model.load import load_base, parameter_groups
from qllava.train.checkpoint import resumable_state
from qllava.train.fsdp import DEEPSPEED_UNSUPPORTED, check
from qllava.train.launch import launch_command
from qllava.train.loop import make_accelerator, train
from qllava.train.optim import resolve_optimizer
from tests.conftest import adapter_tensors, make_recipe, max_abs_diff, run_launcher, run_metrics
from tests.test_cli import qllava_here

ACCELERATE_CONFIGS = sorted((Path(__file__).parents[2] / "recipes" / "accelerate").glob("*.yaml"))
FSDP_CONFIG = Path(__file__).parents[2] / "recipes" / "accelerate" / "fsdp-qlora.yaml"
MICRO = 2  # per process; the 1-process reference takes 2 * MICRO
STEPS = 6


def _recipe(base, data, out, micro, **train):
    return make_recipe(
        base,
        data,
        out,
        data={"eval": str(data / "eval.json")},
        train={"max_steps": STEPS, "micro_batch_size": micro, "grad_accum": 1, "eval_every": 3, **train},
    )


@pytest.fixture(scope="module")
def runs(tiny_base, mixed_data, tmp_path_factory):
    """A 1-process run at 2 x MICRO, and the FSDP run at MICRO on 2 processes (checkpoint at step 3)."""
    root = tmp_path_factory.mktemp("fsdp")
    records = json.loads((mixed_data / "train.json").read_text())
    (mixed_data / "eval.json").write_text(json.dumps(records[:5]))  # one text-only sample among them
    one = root / "one"
    train(_recipe(tiny_base, mixed_data, one, 2 * MICRO), progress=False)
    recipe = root / "two.yaml"
    two = root / "two"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_base, mixed_data, two, MICRO, save_every=3).to_dict()))
    launched = run_launcher(
        [sys.executable, "-m", "qllava", "train", str(recipe), "--num-processes", "2"]
        + ["--accelerate-config", str(FSDP_CONFIG)]
    )
    return SimpleNamespace(base=tiny_base, one=one, two=two, recipe=recipe, root=root, stdout=launched.stdout)


def test_fsdp_shards_the_base_and_trains_what_one_process_does(runs):
    # The startup line of rank 0: the frozen 4-bit layers, embeddings and lm_head are split in two
    # (a little over half with FSDP's padding), where DDP would hold them all.
    sharding = re.search(r"FSDP FULL_SHARD over 2 processes: .* holds ([\d,]+) of ([\d,]+) sharded", runs.stdout)
    assert sharding, runs.stdout
    held, total = (int(g.replace(",", "")) for g in sharding.groups())
    assert total > 100_000 and held / total < 0.55

    # Measured (fp32 on CPU, sums in another order): losses, grad norms and eval losses equal to
    # 3.5e-7 relative, adapter weights to 5.2e-6 absolute, the figures of the DDP test; the bounds are
    # those of tests/train/test_distributed.py, where one process at half the batch fails them.
    assert run_metrics(runs.two, "loss") == pytest.approx(run_metrics(runs.one, "loss"), rel=1e-5)
    assert run_metrics(runs.two, "grad_norm") == pytest.approx(run_metrics(runs.one, "grad_norm"), rel=1e-4)
    assert len(run_metrics(runs.two, "eval_loss")) == 2  # steps 3 and 6 (the last step's not repeated at the end)
    assert run_metrics(runs.two, "eval_loss") == pytest.approx(run_metrics(runs.one, "eval_loss"), rel=1e-5)
    one, two = adapter_tensors(runs.one), adapter_tensors(runs.two)
    assert any("multi_modal_projector" in k for k in one) and any("lora_A" in k for k in one)
    assert one.keys() == two.keys()  # the keys peft writes without FSDP: merge, chat and resume read them
    assert max_abs_diff(one, two) < 5e-5
    # The bound tells runs apart: the step-3 weights, which the decaying lr moved 8e-4 more by step 6.
    assert max_abs_diff(one, adapter_tensors(runs.two, "checkpoint-3")) > 10 * 5e-5
    config = json.loads((runs.two / "final" / "adapter_config.json").read_text())
    assert config == json.loads((runs.one / "final" / "adapter_config.json").read_text())


def test_the_fsdp_adapter_loads_for_inference_and_merges(runs, tmp_path):
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    logits = []
    for run in (runs.one, runs.two):
        model, _ = load_for_inference(runs.base, run / "final", device=torch.device("cpu"))
        with torch.no_grad():
            logits.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits)
    assert (logits[0] - logits[1]).abs().max() < 1e-3
    merged = qllava_here(
        "merge", runs.two / "final", "--out", tmp_path / "merged", "--dtype", "fp32", "--verify-samples", "2"
    )
    assert merged.exit_code == 0, merged.stderr
    assert (tmp_path / "merged" / "config.json").is_file()


def test_fsdp_resume_continues_the_run_exactly(runs):
    resumed = runs.root / "resumed"
    overrides = [f"output.dir={resumed}", f"train.resume={runs.two / 'checkpoint-3'}"]
    run_launcher(launch_command(str(runs.recipe), overrides, 2, FSDP_CONFIG))  # accelerate launch --config_file ...
    state = json.loads((runs.two / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["fsdp"] and state["world_size"] == 2
    # Measured: equal to the last bit (same sharding, same order of sums).
    assert run_metrics(resumed, "loss") == pytest.approx(run_metrics(runs.two, "loss")[3:], rel=1e-6)
    assert run_metrics(resumed, "eval_loss") == pytest.approx(run_metrics(runs.two, "eval_loss")[1:], rel=1e-6)
    assert max_abs_diff(adapter_tensors(runs.two), adapter_tensors(resumed)) < 1e-6
    assert (
        max_abs_diff(adapter_tensors(runs.two, "checkpoint-3"), adapter_tensors(runs.two)) > 1e-4
    )  # it moved after step 3


def test_a_checkpoint_resumes_only_the_way_it_was_written(tmp_path):
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 3, "world_size": 2, "fsdp": True}))
    with pytest.raises(QllavaError, match="written under FSDP and this run is not"):
        resumable_state(tmp_path, world_size=2, fsdp=False)


def test_fsdp_storage_holds_the_same_4bit_weights(tiny_base):
    # FSDP needs the packed 4-bit bytes stored as the compute dtype (fp32 on CPU); the values and the
    # parameter count of the start-up table are those of uint8 storage.
    models = {fsdp: load_base(tiny_base, bits=4, device=torch.device("cpu"), fsdp=fsdp) for fsdp in (False, True)}
    storage = {
        fsdp: {p.dtype for p in m.parameters() if isinstance(p, bnb.nn.Params4bit)} for fsdp, m in models.items()
    }
    assert storage == {False: {torch.uint8}, True: {torch.float32}}
    assert parameter_groups(models[True]) == parameter_groups(models[False])
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        out = [models[f](input_ids=ids).logits for f in (False, True)]
    assert torch.equal(out[0], out[1])


def test_settings_that_break_fsdp_qlora_are_refused(tiny_base, tmp_path):
    plugin = FullyShardedDataParallelPlugin(fsdp_version=1, use_orig_params=True, activation_checkpointing=True)
    recipe = make_recipe(
        tiny_base, tmp_path, tmp_path / "run", model={"bits": 8}, lora={"enabled": False}, optim={"name": "adamw_8bit"}
    )
    with pytest.raises(QllavaError) as info:
        check(plugin, recipe)
    wanted = ("fsdp_use_orig_params", "fsdp_activation_checkpointing", "bits=8", "lora.enabled=false", "adamw_8bit")
    assert all(key in str(info.value) for key in wanted)
    check(FullyShardedDataParallelPlugin(fsdp_version=1), make_recipe(tiny_base, tmp_path, tmp_path / "run"))
    assert resolve_optimizer("auto", torch.device("cuda"), fsdp=True) == "adamw"
    assert resolve_optimizer("auto", torch.device("cuda")) == "paged_adamw_8bit"
    with pytest.raises(QllavaError, match="optim.name=paged_adamw_8bit does not work under FSDP"):
        resolve_optimizer("paged_adamw_8bit", torch.device("cuda"), fsdp=True)


def test_deepspeed_is_refused_with_a_clear_message(tiny_base, mixed_data, tmp_path, monkeypatch):
    config = tmp_path / "ds.yaml"
    config.write_text(yaml.safe_dump({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 2}}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(tiny_base, mixed_data, tmp_path / "run").to_dict()))
    result = qllava_here("train", recipe, "--num-processes", "2", "--accelerate-config", config)
    assert result.exit_code == 1 and DEEPSPEED_UNSUPPORTED in result.stderr
    # `accelerate launch --config_file ds.yaml -m qllava train ...` (with deepspeed installed) sets this.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(QllavaError, match="DeepSpeed is not supported"):
        make_accelerator(make_recipe(tiny_base, mixed_data, tmp_path / "run"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_are_valid(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith(f"# accelerate launch --config_file recipes/accelerate/{path.name} -m qllava train ")
    assert f"qllava train RECIPE.yaml --num-processes N --accelerate-config recipes/accelerate/{path.name}" in lines[1]
    config = load_config_from_file(str(path))  # accelerate's own loader: unknown top-level keys are errors
    # accelerate maps each fsdp_config key to a launcher option and silently drops unknown ones.
    options = {action.dest for action in launch_command_parser()._actions}
    unknown = [k for k in config.fsdp_config if (k if k.startswith("fsdp_") else f"fsdp_{k}") not in options]
    assert not unknown
    assert config.distributed_type.value in ("MULTI_GPU", "FSDP")


def test_the_accelerate_configs_are_ddp_and_fsdp():
    assert [p.name for p in ACCELERATE_CONFIGS] == ["ddp.yaml", "fsdp-qlora.yaml"]
    fsdp_config = load_config_from_file(str(FSDP_CONFIG)).fsdp_config
    assert fsdp_config["fsdp_version"] == 1 and fsdp_config["fsdp_use_orig_params"] is False
