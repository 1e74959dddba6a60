"""kill -9 at any moment, repeated, then train.resume=auto: the same adapter as an uninterrupted run."""

import json
import random
import signal
import subprocess
import sys
import time

from qllava.recipe import dump_recipe
from qllava.train.loop import train
from tests.conftest import adapter_tensors, make_recipe, max_abs_diff

STEPS = {"max_steps": 6, "save_every": 1, "keep_last": 2, "log_every": 1}


def _lines(run):
    metrics = run / "metrics.jsonl"
    return metrics.read_text().count("\n") if metrics.exists() else 0


def test_repeated_kill_9_then_resume_ends_like_the_uninterrupted_run(tiny_base, tiny_data, tmp_path):
    straight = tmp_path / "straight"
    train(make_recipe(tiny_base, tiny_data, straight, lora={"dropout": 0.1}, train=STEPS), progress=False)

    run = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    dump_recipe(make_recipe(tiny_base, tiny_data, run, lora={"dropout": 0.1}, train=STEPS | {"resume": "auto"}), recipe)
    command = [sys.executable, "-m", "qllava", "train", str(recipe)]
    chance = random.Random(0)
    kills = 0
    for _ in range(4):
        seen = _lines(run)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Wait until the run trains (a new metrics line), then kill it a random moment later: within a step,
        # while it writes a checkpoint, or between the two.
        while process.poll() is None and _lines(run) == seen:
            time.sleep(0.05)
        time.sleep(chance.uniform(0.0, 1.5))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
        if (run / "final").is_dir():
            break
    assert kills >= 2
    if not (run / "final").is_dir():
        assert subprocess.run(command, capture_output=True).returncode == 0

    assert max_abs_diff(adapter_tensors(straight), adapter_tensors(run)) < 1e-5
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # no line repeated by a resumed run, none lost
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]  # no half-written checkpoint left behind
