"""A checkpoint from someone else cannot run code: non-tensor files are read with weights_only=True."""

import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from qllava.errors import QllavaError
from qllava.train import checkpoint as ckpt
from qllava.train.loop import train
from tests.conftest import make_recipe

ROOT = Path(__file__).resolve().parents[2]


class _RunsAShellCommand:
    """What a malicious pickle does: unpickling it calls os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("planted", ["optimizer.pt", "scheduler.pt", "rng.pt"])
def test_a_malicious_pickle_in_a_checkpoint_is_refused(tiny_base, tiny_data, tmp_path, planted):
    run = tmp_path / "run"
    train(make_recipe(tiny_base, tiny_data, run, train={"max_steps": 2, "save_every": 1}), progress=False)
    checkpoint = run / "checkpoint-1"
    marker = tmp_path / "code-ran"
    torch.save({"state": _RunsAShellCommand(marker)}, checkpoint / planted)
    resumed = make_recipe(tiny_base, tiny_data, tmp_path / "resumed", train={"max_steps": 2, "resume": str(checkpoint)})
    with pytest.raises(QllavaError, match=rf"{planted} holds Python objects .*posix.system.*could run code"):
        train(resumed, progress=False)
    assert not marker.exists()


def test_rng_states_round_trip_and_older_checkpoints_still_load(tmp_path):
    torch.save([ckpt._rng_state()], tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt._set_rng_state(ckpt.load_plain(tmp_path / "rng.pt")[0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    # Checkpoints written before the states were kept as tensors hold numpy's state as an array.
    older = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save([older], tmp_path / "older.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt._set_rng_state(ckpt.load_plain(tmp_path / "older.pt", allow=ckpt._NUMPY_ARRAY)[0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    with pytest.raises(QllavaError, match="could run code"):
        ckpt.load_plain(tmp_path / "older.pt")  # the array is allowed where it is expected only


def test_no_code_loads_pickles_unsafely_or_trusts_remote_code():
    sources = [p for folder in ("qllava", "tools") for p in (ROOT / folder).rglob("*.py")]
    assert len(sources) > 20
    unsafe = re.compile(
        r"weights_only\s*=\s*False|trust_remote_code\s*=\s*True|pickle\.(loads?|Unpickler)\b|allow_pickle\s*=\s*True"
        r"|yaml\.(load|unsafe_load|full_load)\("
    )
    found = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in sources
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if unsafe.search(line)
    ]
    assert found == []
