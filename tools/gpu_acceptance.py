"""One-command GPU acceptance: every GPU-only path of qllava, measured in one run of at most 10 minutes.

    tools/gpu_acceptance.sh [--out DIR] [--wheels DIR] [--time-limit S] [--bench-layers L] [--dry-run]

On a machine with one CUDA GPU and no network it installs the carried wheels (README, "GPU
acceptance run"), then runs these stages, each a subprocess with its own time budget:

- setup: install bitsandbytes, trl, datasets (+ dill, multiprocess) and transformers from --wheels
  with `pip install --no-index` (torch pinned to the installed one, so pip never touches it), then
  qllava itself with `pip install --no-deps -e .`; flash-attn too when its wheel is there;
- gpu tests: the `gpu`-marked tests (pytest -m gpu);
- demo: `qllava demo` on the GPU with paged 8-bit AdamW (bf16 autocast is the GPU default):
  held-out accuracy before and after, wall time (the demo cache is built first, timed apart);
- bench: tools/bench.py on the LLaVA-1.5-7B shape cut to --bench-layers layers, qllava against TRL's
  SFTTrainer in the same process (tokens/s, peak memory, MFU, ratios);
- plan: tools/bench.py --full-length at micro-batch 1, 2 and 4 of 2048 tokens: `qllava plan`'s
  predicted peak beside the measured one, for the same model and recipe;
- merge: `qllava merge` of the demo's final adapter on CUDA, with its verification figures;
- flash-attention: bench rows with flash_attention_2 when flash-attn imports, else one row that says
  it is unmeasured and why.

A stage that fails or runs out of its budget (or of the whole run's --time-limit) is recorded as such
and the run goes on with the next one. After every stage DIR/acceptance.json and DIR/acceptance.md
are rewritten, so a run killed midway still leaves the stages it finished; the table is printed last.
Each stage's output is in DIR/logs/STAGE.log.

`--dry-run` (CPU, CI: tests/test_gpu_acceptance.py) runs the same code with the same commands at tiny
sizes: the tiny model instead of the 7B shape, 2 demo steps on 8 held-out questions, a merge on the
CPU; it checks the wheels folder without installing anything.

Only the standard library is imported here: everything that imports torch, transformers or qllava
runs in a subprocess, after the setup stage has installed the versions it needs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# Carried as wheels (README): missing from the GPU machines' image (bitsandbytes, trl, datasets and the
# two datasets needs that the image lacks), or too old there (transformers 5.17: qllava calls
# activation_checkpointing_enable, which 5.17 does not have). Versions are constraints.txt's.
CARRIED = ("bitsandbytes", "transformers", "trl", "datasets", "dill", "multiprocess")
# Each stage's budget in seconds: 600 together, the run's 10 minutes, without flash-attention, which
# runs only where flash-attn is installed (--time-limit caps the whole run either way). The demo's
# includes building the demo cache on the CPU (89 s on 2 cores here), and the merge needs its adapter.
BUDGETS = {
    "setup": 40,
    "gpu tests": 60,
    "demo": 200,
    "bench": 170,
    "plan": 90,
    "merge": 40,
    "flash-attention": 60,
}
PLAN_MICRO_BATCHES = (1, 2, 4)


@dataclass(frozen=True)
class Sizes:
    """What each stage runs: the real sizes on a GPU, tiny ones for --dry-run on a CPU."""

    bench: list[str]
    bench_flags: list[str]
    plan: list[str]
    demo: list[str]
    merge: list[str]
    demo_eval_questions: int  # 0: the demo's whole held-out split


def sizes(args: argparse.Namespace) -> Sizes:
    if args.dry_run:
        tiny = ["--tiny", "--steps", "1", "--warmup", "1", "--seq-len", "128"]
        return Sizes(
            bench=tiny,
            bench_flags=["--micro-batch", "2"],
            plan=tiny,
            demo=["train.max_steps=2"],
            merge=["--device", "cpu", "--verify-samples", "2"],
            demo_eval_questions=8,
        )
    return Sizes(
        bench=["--layers", str(args.bench_layers), "--steps", str(args.bench_steps), "--seq-len", "2048"],
        bench_flags=["--micro-batch", "8"],  # recipes/llava-1.5-7b-qlora.yaml's
        plan=["--layers", str(args.plan_layers), "--steps", "1", "--warmup", "1", "--seq-len", "2048"],
        demo=[],
        merge=["--device", "cuda"],
        demo_eval_questions=0,
    )


class StageError(Exception):
    """A stage's command failed (exit status) or ran out of time; `timed_out` tells which."""

    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out


@dataclass
class Run:
    """The run's state: where things go, the clock, and what each stage recorded."""

    args: argparse.Namespace
    out: Path
    deadline: float
    env: dict[str, str]
    sizes: Sizes
    results: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    stage: str = ""
    stage_deadline: float = 0.0
    commands: list[str] = field(default_factory=list)

    def run(self, cmd: list[str]) -> str:
        """Run `cmd` within the stage's remaining time; its output goes to logs/STAGE.log and is returned.

        It runs in a process group of its own, so that a timeout ends its children (pytest's,
        accelerate's) with it.
        """
        self.commands.append(shlex.join(cmd))
        left = min(self.stage_deadline, self.deadline) - time.monotonic()
        if left < 1:
            raise StageError("no time left for: " + shlex.join(cmd), timed_out=True)
        path = self.out / "logs" / f"{self.stage.replace(' ', '-')}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as sink:
            sink.write(f"$ {shlex.join(cmd)}\n")
            sink.flush()
            start = len(path.read_text())
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=self.env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                rc = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise StageError(f"ran out of time after {left:.0f} s: {shlex.join(cmd)}", timed_out=True) from None
        output = path.read_text()[start:]
        if rc != 0:
            raise ExitStatus(rc, output, shlex.join(cmd))
        return output


class ExitStatus(StageError):
    def __init__(self, rc: int, output: str, cmd: str):
        tail = " | ".join(line.strip() for line in output.strip().splitlines()[-3:])
        super().__init__(f"exit {rc}: {cmd}: {tail}")
        self.rc, self.output = rc, output


# ---------------------------------------------------------------- the environment


def probe(env: dict[str, str]) -> dict:
    """Versions and the GPU, read by a subprocess (this process imports none of them)."""
    code = (
        "import importlib.metadata as m, json, platform, torch\n"
        "v = {}\n"
        f"for n in {('torch', 'transformers', 'peft', 'accelerate', *CARRIED, 'flash_attn', 'qllava')!r}:\n"
        "    try: v[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: v[n] = None\n"
        "cuda = torch.cuda.is_available()\n"
        "print(json.dumps({'python': platform.python_version(), 'versions': v, 'cuda': cuda,\n"
        "    'cuda_version': torch.version.cuda, 'device': torch.cuda.get_device_name() if cuda else 'CPU'}))\n"
    )
    done = subprocess.run([PYTHON, "-c", code], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"gpu_acceptance: cannot import torch with {PYTHON}: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def pinned_versions(names=CARRIED) -> dict[str, str]:
    """The versions of `names` that constraints.txt pins (those CI tests)."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[_norm(name)] = version.strip()
    return {name: pins[_norm(name)] for name in names}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_for(folder: Path, name: str, version: str | None = None) -> Path | None:
    """The wheel of `name` (at `version`) in `folder`, if there is one."""
    for path in sorted(folder.glob("*.whl")) if folder.is_dir() else []:
        parts = path.name.split("-")
        if _norm(parts[0]) == _norm(name) and (version is None or parts[1] == version):
            return path
    return None


def missing_wheels(folder: Path, installed: dict[str, str | None]) -> list[str]:
    """`name==version` of each carried package that is neither installed at that version nor in `folder`."""
    return [
        f"{name}=={version}"
        for name, version in pinned_versions().items()
        if installed.get(name) != version and wheel_for(folder, name, version) is None
    ]


def download_command(folder: str = "wheels") -> str:
    """The README's command that fetches the carried wheels for the GPU machines (Python 3.12, x86-64)."""
    pins = " ".join(f"{n}=={v}" for n, v in pinned_versions().items())
    return (
        "pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "
        f"--platform manylinux_2_24_x86_64 --platform any -d {folder} {pins}"
    )


def install_commands(folder: Path, torch_version: str, workdir: Path) -> list[list[str]]:
    """pip commands of the setup stage: the carried wheels (when `folder` holds any of them), then
    qllava (editable, no dependencies)."""
    wheels = [str(p) for p in (wheel_for(folder, n, v) for n, v in pinned_versions().items()) if p]
    flash = wheel_for(folder, "flash_attn")
    # pip resolves the wheels' needs against what is installed and the folder alone (--no-index);
    # the constraint keeps torch the installed build, whatever a wheel's requirement says.
    pin = workdir / "torch-constraint.txt"
    pin.write_text(f"torch=={torch_version}\n")
    pip = [PYTHON, "-m", "pip", "install", "-q", "--no-index"]
    carried = [*pip, "--find-links", str(folder), "-c", str(pin)]
    editable = [*pip, "--no-deps", "--no-build-isolation", "-e", str(ROOT)]
    wheels += [str(flash)] if flash else []
    return ([carried + wheels] if wheels else []) + [editable]


# ---------------------------------------------------------------- the stages


def stage_setup(run: Run, fig: dict) -> None:
    folder = Path(run.args.wheels)
    info = run.meta["before"]
    fig["wheels_dir"] = str(folder)
    fig["wheels"] = {p.name: p.stat().st_size for p in sorted(folder.glob("*.whl"))} if folder.is_dir() else {}
    fig["wheels_mib"] = round(sum(fig["wheels"].values()) / 2**20, 1)
    fig["missing"] = missing_wheels(folder, info["versions"])
    *carried, editable = install_commands(folder, info["versions"]["torch"], run.out)
    fig["install_commands"] = [shlex.join(c) for c in (*carried, editable)]
    if run.args.dry_run:
        fig["note"] = "dry run: nothing installed"
    else:
        for cmd in carried:
            try:
                run.run(cmd)
            except ExitStatus as err:
                # A requirement the image fails (say an older pyarrow than datasets asks for) stops the
                # resolved install; the wheels alone may still import, which the stages then show.
                fig["resolved_install_failed"] = str(err)
                run.run([*cmd[:4], "--no-deps", *cmd[4:]])
        try:
            run.run(editable)
        except ExitStatus as err:
            fig["editable_install_failed"] = f"{err}; the stages import qllava through PYTHONPATH"
    versions = info["versions"] if run.args.dry_run else probe(run.env)["versions"]
    run.meta["versions"] = versions
    fig["versions"] = {n: versions[n] for n in ("torch", "transformers", "bitsandbytes", "trl", "datasets")}


def gpu_test_files() -> list[str]:
    """The test files that mark tests `gpu`: pytest then imports only them (collecting every test
    module costs more than the GPU tests themselves on a CPU)."""
    files = sorted(p for p in (ROOT / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text())
    return [str(p.relative_to(ROOT)) for p in files]


def stage_gpu_tests(run: Run, fig: dict) -> None:
    report = run.out / "gpu-tests.xml"
    files = gpu_test_files()
    cmd = [PYTHON, "-m", "pytest", "-m", "gpu", *files, "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
    try:
        run.run(cmd)
    finally:
        if report.is_file():
            fig.update(junit_counts(report))


def junit_counts(report: Path) -> dict:
    """passed / failed / skipped counts and the failed tests' ids from pytest's JUnit XML."""
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    total, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    return {"passed": total - skipped - len(failed), "failed": len(failed), "skipped": skipped, "failed_ids": failed}


def stage_demo(run: Run, fig: dict) -> None:
    start = time.monotonic()
    cache = run.run([PYTHON, "-c", "from qllava.demo import materialize; print(materialize())"])
    fig["cache_s"] = round(time.monotonic() - start, 1)
    overrides = ["optim.name=paged_adamw_8bit", *run.sizes.demo]
    if run.sizes.demo_eval_questions:
        records = json.loads((Path(cache.strip().splitlines()[-1]) / "eval.json").read_text())
        subset = run.out / "demo-eval.json"
        subset.write_text(json.dumps(records[: run.sizes.demo_eval_questions]))
        overrides.append(f"data.eval={subset}")
    fig["overrides"] = overrides
    out = run.out / "demo"
    run.run([PYTHON, "-m", "qllava", "demo", "--out", str(out), *overrides])
    fig.update(json.loads((out / "metrics.json").read_text()))
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [s["tokens_per_s"] for s in steps if s.get("tokens_per_s")]
    fig["tokens_per_s_median"] = sorted(rates)[len(rates) // 2] if rates else None
    fig["final"] = str(out / "final")


def _bench(run: Run, out: Path, shape: list[str], flags: list[str]) -> dict:
    run.run([PYTHON, "tools/bench.py", *shape, *flags, "--out", str(out)])
    return json.loads((out / "bench.json").read_text())


def stage_bench(run: Run, fig: dict) -> None:
    result = _bench(run, run.out / "bench", run.sizes.bench, [*run.sizes.bench_flags, "--attention", "sdpa"])
    meta = result["meta"]
    fig["model"], fig["device"] = meta["model"], meta["device"]
    fig["rows"] = [_bench_figures(r) for r in result["rows"]]
    fig["vs_baseline"] = meta["vs_baseline"]
    fig["baseline"] = meta["baseline"]


def _bench_figures(row: dict) -> dict:
    keys = ("variant", "micro_batch", "steps", "tokens_per_s", "peak_mem_mib", "peak_reserved_mib", "mfu", "step_s")
    return {k: row[k] for k in keys}


def stage_plan(run: Run, fig: dict) -> None:
    # One process for the three micro-batches: the model is built once.
    micro = ",".join(map(str, PLAN_MICRO_BATCHES))
    flags = ["--micro-batches", micro, "--full-length", "--attention", "sdpa"]
    result = _bench(run, run.out / "plan", run.sizes.plan, flags)
    fig["model"] = result["meta"]["model"]
    fig["rows"] = [
        {
            "micro_batch": row["micro_batch"],
            "seq_len": result["meta"]["seq_len"],
            "predicted_mib": row["plan_peak_mib"],
            "measured_mib": row["peak_mem_mib"],
            "predicted_reserved_mib": row["plan_reserved_mib"],
            "measured_reserved_mib": row["peak_reserved_mib"],
            "ratio": row["plan_peak_mib"] / row["peak_mem_mib"] if row["peak_mem_mib"] else None,
            "worst_moment": row["plan_worst"],
        }
        for row in result["rows"]
    ]


def stage_merge(run: Run, fig: dict) -> None:
    demo = next((r for r in run.results if r["stage"] == "demo"), None)
    final = Path(demo["figures"].get("final", "")) if demo else None
    if not final or not (final / "adapter_model.safetensors").is_file():
        raise StageError("no trained adapter: the demo stage did not finish")
    out = run.out / "merged"
    try:
        run.run([PYTHON, "-m", "qllava", "merge", str(final), "--out", str(out), *run.sizes.merge])
    finally:
        report = out / "merge_report.json"
        if report.is_file():
            keys = ("passed", "dtype", "method", "positions", "reply_positions", "top1_agreement", "mean_kl")
            data = json.loads(report.read_text())
            fig.update({k: data[k] for k in (*keys, "max_abs_logit_diff")})


def stage_flash(run: Run, fig: dict) -> None:
    if not run.meta["versions"].get("flash_attn"):
        fig["unmeasured"] = (
            "flash-attn is not installed and no flash_attn wheel was carried (the package index has none; "
            "it builds from source for tens of minutes)"
        )
        return
    out = run.out / "bench-flash"
    flags = [*run.sizes.bench_flags, "--attention", "flash_attention_2", "--no-baseline"]
    result = _bench(run, out, run.sizes.bench, flags)
    fig["rows"] = [_bench_figures(r) for r in result["rows"]]


STAGES: list[tuple[str, Callable[[Run, dict], None]]] = [
    ("setup", stage_setup),
    ("gpu tests", stage_gpu_tests),
    ("demo", stage_demo),
    ("bench", stage_bench),
    ("plan", stage_plan),
    ("merge", stage_merge),
    ("flash-attention", stage_flash),
]


# ---------------------------------------------------------------- the report


def _f(x, spec: str = ".0f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def describe(stage: str, fig: dict, run_meta: dict) -> list[str]:
    """The table's result cells for one stage (one line per table row)."""
    if stage == "setup":
        v = fig.get("versions") or {}
        installed = ", ".join(f"{n} {v.get(n) or 'missing'}" for n in ("transformers", "bitsandbytes", "trl"))
        return [f"{installed}; wheels {fig.get('wheels_mib', 0)} MiB" + (f"; {fig['note']}" if fig.get("note") else "")]
    if stage == "gpu tests":
        if "passed" not in fig:
            return ["-"]
        line = f"{fig['passed']} passed, {fig['failed']} failed, {fig['skipped']} skipped"
        return [line + (f": {', '.join(fig['failed_ids'])}" if fig["failed_ids"] else "")]
    if stage == "demo":
        if "accuracy_after" not in fig:
            return [f"cache built in {fig['cache_s']} s" if "cache_s" in fig else "-"]
        return [
            f"held-out accuracy {fig['accuracy_before']:.3f} -> {fig['accuracy_after']:.3f}, "
            f"{fig['wall_time_s']:.0f} s (cache {fig['cache_s']} s), median {_f(fig['tokens_per_s_median'])} tokens/s"
        ]
    if stage in ("bench", "flash-attention"):
        if fig.get("unmeasured"):
            return [f"unmeasured: {fig['unmeasured']}"]
        lines = [
            f"{r['variant']}: {r['tokens_per_s']:.0f} tokens/s, peak {_f(r['peak_mem_mib'])} MiB, MFU {r['mfu']:.1%}"
            for r in fig.get("rows", [])
        ]
        for name, ratio in (fig.get("vs_baseline") or {}).items():
            lines.append(
                f"{name} / baseline: {ratio['tokens_per_s']:.2f}x tokens/s, {_f(ratio['peak_mem'], '.2f')}x memory"
            )
        return lines or ["-"]
    if stage == "plan":
        return [
            f"micro-batch {r['micro_batch']} x {r['seq_len']}: predicted {r['predicted_mib']:.0f} MiB, "
            f"measured {_f(r['measured_mib'])} MiB (ratio {_f(r['ratio'], '.3f')})"
            + (
                f"; reserved predicted {r['predicted_reserved_mib']:.0f}, measured {r['measured_reserved_mib']:.0f}"
                if r["measured_reserved_mib"] is not None  # CUDA's caching allocator only
                else ""
            )
            for r in fig.get("rows", [])
        ] or ["-"]
    if stage == "merge":
        if "passed" not in fig:
            return ["-"]
        return [
            f"{fig['method']} {fig['dtype']}: top-1 {_f(fig['top1_agreement'], '.4f')} on {fig['reply_positions']} "
            f"reply tokens, mean KL {_f(fig['mean_kl'], '.1e')}, max |logit diff| "
            f"{_f(fig['max_abs_logit_diff'], '.2e')}, {'passed' if fig['passed'] else 'FAILED'}"
        ]
    return ["-"]


def render(results: list[dict], meta: dict) -> str:
    """The Markdown table: a header line, then one row per result line of each stage."""
    lines = [
        f"# qllava GPU acceptance{' (dry run)' if meta['dry_run'] else ''}: {meta['device']}",
        "",
        f"{meta['started']}; bench: {meta['bench_model']}; {meta['elapsed_s']:.0f} s of {meta['time_limit_s']} s",
        "",
        "| stage | status | s | result |",
        "|---|---|---|---|",
    ]
    for r in results:
        cells = describe(r["stage"], r["figures"], meta)
        if r["status"] not in ("ok", "unmeasured") and r.get("error"):
            cells.append(r["error"][:300])
        for i, cell in enumerate(c.replace("|", "\\|") for c in cells):
            head = f"| {r['stage']} | {r['status']} | {r['seconds']:.0f} |" if i == 0 else "| | | |"
            lines.append(f"{head} {cell} |")
    return "\n".join(lines) + "\n"


def write(run: Run) -> str:
    run.meta["elapsed_s"] = round(time.monotonic() - run.meta["_start"], 1)
    meta = {k: v for k, v in run.meta.items() if not k.startswith("_")}
    (run.out / "acceptance.json").write_text(json.dumps({"meta": meta, "stages": run.results}, indent=2) + "\n")
    table = render(run.results, meta)
    (run.out / "acceptance.md").write_text(table)
    return table


# ---------------------------------------------------------------- the run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu-acceptance", help="where acceptance.json/.md and logs/ go")
    parser.add_argument("--wheels", default=str(ROOT / "wheels"), help="the carried wheels (README)")
    parser.add_argument("--time-limit", type=float, default=600, help="seconds for the whole run (default 600)")
    parser.add_argument("--bench-layers", type=int, default=8, help="decoder layers of the 7B shape in the bench")
    parser.add_argument("--bench-steps", type=int, default=8, help="timed steps per bench row")
    parser.add_argument("--plan-layers", type=int, default=4, help="decoder layers of the 7B shape in the plan check")
    parser.add_argument(
        "--budget", action="append", default=[], metavar="STAGE=S", help="a stage's budget in seconds, e.g. demo=200"
    )
    parser.add_argument(
        "--only", action="append", default=[], metavar="STAGE", help="run only these stages (setup always runs)"
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, nothing installed (CI)")
    args = parser.parse_args(argv)
    args.budgets = dict(BUDGETS)
    for item in args.budget:
        name, _, seconds = item.rpartition("=")
        if name not in BUDGETS:
            parser.error(f"--budget {item}: no stage `{name}`; stages: {', '.join(BUDGETS)}")
        args.budgets[name] = float(seconds)
    unknown = [s for s in args.only if s not in BUDGETS]
    if unknown:
        parser.error(f"--only {unknown}: stages are {', '.join(BUDGETS)}")
    return args


def preflight(args: argparse.Namespace, before: dict) -> str | None:
    """Why a real run cannot start (no GPU, wheels missing), as one message; None when it can."""
    if args.dry_run:
        return None
    if not before["cuda"]:
        return (
            f"gpu_acceptance: no CUDA GPU visible to torch {before['versions']['torch']} "
            f"(CUDA build {before['cuda_version']}); run it on the GPU machine, or --dry-run here"
        )
    missing = missing_wheels(Path(args.wheels), before["versions"])
    if missing:
        return (
            f"gpu_acceptance: wheels missing from {args.wheels}: {', '.join(missing)}. Fetch them where pip "
            f"reaches the package index (README, 'GPU acceptance run'):\n  {download_command(args.wheels)}"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env["PYTHONUNBUFFERED"] = "1"
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, also where a GPU is present
    start = time.monotonic()
    before = probe(env)
    problem = preflight(args, before)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    run = Run(args=args, out=out, deadline=start + args.time_limit, env=env, sizes=sizes(args))
    layers = "tiny model" if args.dry_run else f"LLaVA-1.5-7B shape, {args.bench_layers} of 32 decoder layers"
    run.meta = {
        "_start": start,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "dry_run": args.dry_run,
        "device": before["device"],
        "python": before["python"],
        "cuda_version": before["cuda_version"],
        "before": before,
        "versions": before["versions"],
        "time_limit_s": args.time_limit,
        "budgets_s": args.budgets,
        "bench_model": layers,
        "plan_model": "tiny model" if args.dry_run else f"LLaVA-1.5-7B shape, {args.plan_layers} decoder layers",
    }
    for name, fn in STAGES:
        if args.only and name != "setup" and name not in args.only:
            continue
        result = run_stage(run, name, fn)
        run.results.append(result)
        table = write(run)
        print(f"gpu_acceptance: {name}: {result['status']} in {result['seconds']:.0f} s", flush=True)
    print(f"written: {out / 'acceptance.json'} and {out / 'acceptance.md'}\n")
    print(table, end="")
    return 0


def run_stage(run: Run, name: str, fn: Callable[[Run, dict], None]) -> dict:
    """Run one stage within its budget; its status, time, commands and whatever figures it reached."""
    run.stage, run.commands = name, []
    start = time.monotonic()
    run.stage_deadline = start + run.args.budgets[name]
    fig: dict = {}
    status, error = "ok", None
    try:
        fn(run, fig)
        if fig.get("unmeasured"):
            status = "unmeasured"
    except StageError as err:
        status, error = ("timeout" if err.timed_out else "failed"), str(err)
    except Exception as err:  # noqa: BLE001 - a broken stage must not stop the others
        status, error = "failed", f"{type(err).__name__}: {err}"
    return {
        "stage": name,
        "status": status,
        "seconds": round(time.monotonic() - start, 1),
        "budget_s": run.args.budgets[name],
        "commands": list(run.commands),
        "figures": fig,
        "error": error,
    }


if __name__ == "__main__":
    sys.exit(main())
