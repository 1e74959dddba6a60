"""Ctrl-C in a terminal, as `qllava train` gets it: the whole process group, dataloader workers included."""

import os
import signal
import subprocess
import sys
import time

import yaml

from tests.conftest import make_recipe, write_color_data


def test_ctrl_c_with_dataloader_workers_stops_once_and_is_no_error(tiny_base, tmp_path):
    data = write_color_data(tmp_path, 48)  # 12 steps per epoch: the workers are alive when the signal comes
    run = tmp_path / "run"
    recipe = make_recipe(tiny_base, data, run, data={"num_workers": 2}, train={"max_steps": 100000})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    # A session of its own, like a terminal's foreground job, so the signal reaches its process group only.
    process = subprocess.Popen(
        [sys.executable, "-m", "qllava", "train", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run / "metrics.jsonl").is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    (checkpoint,) = run.glob("checkpoint-*")
    step = checkpoint.name.split("-")[1]
    assert err.count("stopping after this step") == 1, err
    assert f"qllava: interrupted at step {step}: wrote {checkpoint}; continue with train.resume=auto" in err, err
    assert "error" not in err and "Traceback" not in err, err
    assert process.returncode == 130
    # transformers' deprecation warning, raised from inside peft, is not the user's business.
    assert "is_gradient_checkpointing" not in err + out
