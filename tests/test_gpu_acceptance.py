"""tools/gpu_acceptance.py: the dry run end to end on the CPU (every stage at tiny sizes), and the parts
a real run depends on before its first stage: the GPU and wheel checks, the pip commands, time budgets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools import gpu_acceptance as acc

STAGES = [name for name, _ in acc.STAGES]


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_writes_the_json_and_table(tmp_path, capsys):
    """The commands a GPU run uses, at tiny sizes: each stage ends ok and leaves its figures."""
    out = tmp_path / "acc"
    assert acc.main(["--dry-run", "--out", str(out)]) == 0
    report = json.loads((out / "acceptance.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == STAGES
    flash = "unmeasured" if not report["meta"]["versions"].get("flash_attn") else "ok"
    assert {n: s["status"] for n, s in stages.items()} == {**dict.fromkeys(STAGES, "ok"), "flash-attention": flash}
    assert all(s["commands"] for n, s in stages.items() if n not in ("setup", "flash-attention"))
    fig = {n: s["figures"] for n, s in stages.items()}
    assert fig["setup"]["install_commands"][-1].endswith(f"-e {acc.ROOT}")
    # tests/test_gpu.py's tests are collected, and skipped on the CPU.
    assert fig["gpu tests"]["skipped"] >= 4 and fig["gpu tests"]["failed"] == 0
    assert "optim.name=paged_adamw_8bit" in fig["demo"]["overrides"]
    assert 0 <= fig["demo"]["accuracy_before"] <= 1 and 0 <= fig["demo"]["accuracy_after"] <= 1
    variants = [r["variant"] for r in fig["bench"]["rows"]]
    assert variants[0] == "qllava" and variants[1].startswith("baseline: TRL")
    assert fig["bench"]["vs_baseline"]["qllava"]["tokens_per_s"] > 0
    # The plan against the bench's measured peak of the same model (CPU: fp32 tensor peaks, which the
    # planner matches within 0.5% here; 5% catches a row gone wrong).
    assert [r["micro_batch"] for r in fig["plan"]["rows"]] == [1, 2, 4]
    assert all(abs(r["ratio"] - 1) < 0.05 for r in fig["plan"]["rows"]), fig["plan"]["rows"]
    assert fig["merge"]["passed"] is True and fig["merge"]["reply_positions"] > 0
    table = (out / "acceptance.md").read_text()
    for name, stage in stages.items():
        assert f"| {name} | {stage['status']} |" in table
    assert "micro-batch 4 x 128: predicted" in table and "/ baseline:" in table
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith(table.rstrip())  # the table comes last
    assert f"written: {out / 'acceptance.json'} and {out / 'acceptance.md'}" in printed


def test_a_real_run_without_a_gpu_is_one_message(tmp_path):
    """Through the shell entry point, as the README runs it."""
    done = subprocess.run(
        ["tools/gpu_acceptance.sh", "--out", str(tmp_path)],
        cwd=acc.ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable},
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("gpu_acceptance: no CUDA GPU visible") and "Traceback" not in done.stderr
    assert not (tmp_path / "acceptance.json").exists()


def _gpu_machine(versions: dict) -> dict:
    return {"cuda": True, "cuda_version": "13.0", "versions": versions, "device": "GPU", "python": "3.12.3"}


def test_missing_wheels_are_named_with_the_command_that_fetches_them(tmp_path):
    pins = acc.pinned_versions()
    args = acc.parse_args(["--wheels", str(tmp_path)])
    image = {"torch": "2.11.0", "transformers": "5.17.0", "datasets": None}  # the GPU machines' image
    message = acc.preflight(args, _gpu_machine(image))
    assert f"transformers=={pins['transformers']}" in message and f"bitsandbytes=={pins['bitsandbytes']}" in message
    assert acc.download_command(str(tmp_path)) in message
    # Each wheel present (as pip download names them) or already installed at its pin: nothing missing.
    for name, version in pins.items():
        if name != "dill":
            (tmp_path / f"{name}-{version}-py3-none-any.whl").write_bytes(b"")
    assert "dill==" in acc.preflight(args, _gpu_machine(image))
    assert acc.preflight(args, _gpu_machine({**image, "dill": pins["dill"]})) is None


def test_install_commands_never_reach_the_index_and_pin_torch(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name, version in acc.pinned_versions().items():
        (wheels / f"{name}-{version}-py3-none-any.whl").write_bytes(b"")
    (wheels / "flash_attn-2.8.3-cp312-cp312-linux_x86_64.whl").write_bytes(b"")
    carried, editable = acc.install_commands(wheels, "2.11.0+cu130", tmp_path)
    assert all("--no-index" in cmd for cmd in (carried, editable))
    assert (tmp_path / carried[carried.index("-c") + 1]).read_text() == "torch==2.11.0+cu130\n"
    assert sum(arg.endswith(".whl") for arg in carried) == len(acc.CARRIED) + 1
    assert editable[-2:] == ["-e", str(acc.ROOT)] and "--no-deps" in editable
    assert acc.install_commands(tmp_path / "none", "2.11.0", tmp_path) == [editable]


def _run(tmp_path, budget: float) -> acc.Run:
    args = acc.parse_args(["--dry-run", "--out", str(tmp_path), "--budget", f"demo={budget}"])
    sizes = acc.sizes(args)
    return acc.Run(args=args, out=tmp_path, deadline=time.monotonic() + 60, env=dict(os.environ), sizes=sizes)


def test_a_stage_out_of_time_is_recorded_with_what_it_reached(tmp_path):
    def slow(run, fig):
        fig["first"] = 1
        run.run([sys.executable, "-c", "import time; time.sleep(30)"])

    start = time.monotonic()
    result = acc.run_stage(_run(tmp_path, 1.5), "demo", slow)
    assert time.monotonic() - start < 10
    assert result["status"] == "timeout" and result["figures"] == {"first": 1} and "ran out of time" in result["error"]


@pytest.mark.parametrize(
    "code, status", [("raise SystemExit(3)", "failed"), ("print('fine')", "ok")], ids=["fails", "passes"]
)
def test_a_failing_command_fails_its_stage_alone(tmp_path, code, status):
    result = acc.run_stage(_run(tmp_path, 20), "demo", lambda run, fig: run.run([sys.executable, "-c", code]))
    assert result["status"] == status
    if status == "failed":
        assert result["error"].startswith("exit 3:")
    assert (tmp_path / "logs" / "demo.log").read_text().startswith("$ ")


def test_the_readme_gives_the_download_command_the_script_checks_for():
    readme = (Path(acc.ROOT) / "README.md").read_text()
    assert acc.download_command() in readme
    assert "tools/gpu_acceptance.sh" in readme


def test_junit_counts_name_the_failed_tests(tmp_path):
    report = tmp_path / "r.xml"
    report.write_text(
        '<testsuites><testsuite tests="4" skipped="1" failures="1" errors="1">'
        '<testcase classname="tests.test_gpu" name="a"/>'
        '<testcase classname="tests.test_gpu" name="b"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_gpu" name="c"><error message="y"/></testcase>'
        '<testcase classname="tests.test_gpu" name="d"><skipped message="no GPU"/></testcase>'
        "</testsuite></testsuites>"
    )
    assert acc.junit_counts(report) == {
        "passed": 1,
        "failed": 2,
        "skipped": 1,
        "failed_ids": ["tests.test_gpu::b", "tests.test_gpu::c"],
    }
