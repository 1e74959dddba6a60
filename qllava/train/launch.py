"""`qllava train --num-processes N`: start N training processes through `accelerate launch`.

It is a convenience over `accelerate launch -m qllava train RECIPE ...`, which works as well: the
recipe is checked once here (so a typo is reported once, not N times), the machine is checked for
N devices, and accelerate's launcher starts the processes (one per GPU; gloo processes on a CPU).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from qllava.errors import QllavaError
from qllava.recipe import load_recipe


def available_processes() -> tuple[int, str]:
    """(how many processes this machine can run, what bounds it)."""
    if torch.cuda.is_available():
        return torch.cuda.device_count(), "GPU(s)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores, "CPU core(s) and no GPU"


def _free_port() -> int:
    # Two launches on one machine (a test beside a run) must not share torchrun's default port.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(
    recipe: str, overrides: list[str], num_processes: int, accelerate_config: Path | None = None
) -> list[str]:
    """The `accelerate launch` command line for `num_processes` processes on this machine."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    command += ["--num_machines", "1", "--main_process_port", str(_free_port())]
    if accelerate_config is not None:
        command += ["--config_file", str(accelerate_config)]
    else:
        # torchrun-style launch; without a GPU the processes form a gloo group on the CPU.
        command += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return command + ["-m", "qllava", "train", recipe, *overrides]


def check_accelerate_config(path: Path) -> None:
    """The config exists, accelerate reads it, and it asks for DDP or FSDP (DeepSpeed is refused)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    from qllava.train.fsdp import DEEPSPEED_UNSUPPORTED

    if not path.is_file():
        raise QllavaError(f"--accelerate-config `{path}` not found (see recipes/accelerate/)")
    try:
        config = load_config_from_file(str(path))
    except Exception as exc:  # yaml, missing keys, unknown values: accelerate raises many types
        raise QllavaError(f"--accelerate-config `{path}` is not a valid accelerate config: {exc}") from None
    if config.distributed_type == DistributedType.DEEPSPEED:
        raise QllavaError(f"--accelerate-config `{path}`: {DEEPSPEED_UNSUPPORTED}")


def launch_training(
    recipe: str, overrides: list[str], num_processes: int, accelerate_config: Path | None = None
) -> int:
    """Check, then run the launcher; return its exit code."""
    if "LOCAL_RANK" in os.environ:  # set by torchrun / accelerate launch in every process
        raise QllavaError("--num-processes starts the processes itself; drop it under `accelerate launch`")
    available, what = available_processes()
    if num_processes > available:
        raise QllavaError(
            f"--num-processes {num_processes} is more than this machine allows: it has {available} {what}; "
            "use one process per GPU (on several machines, see the README's multi-GPU section)"
        )
    if accelerate_config is not None:
        check_accelerate_config(accelerate_config)
    load_recipe(recipe, overrides)  # report recipe problems once, before any process starts
    return subprocess.call(launch_command(recipe, overrides, num_processes, accelerate_config))
