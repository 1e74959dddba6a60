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

STEPS = {"max_steps": 10, "save_every": 1, "keep_last": 2, "log_every": 1}


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
    # Each launch is killed once the run has logged `target` steps in all, a random moment later: within a
    # step, while it writes that step's checkpoint, or between the two. The targets leave steps to the end.
    for target in (2, 4, 7):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while process.poll() is None and _lines(run) < target:
            time.sleep(0.02)
        time.sleep(chance.uniform(0.0, 0.3))
        assert process.poll() is None, "the run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert subprocess.run(command, capture_output=True).returncode == 0

    assert max_abs_diff(adapter_tensors(straight), adapter_tensors(run)) < 1e-5
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # no line repeated by a resumed run, none lost
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]  # no half-written checkpoint left behind
