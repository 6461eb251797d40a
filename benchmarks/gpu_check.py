"""The GPU check: one short, prepared run on a bare GPU machine (`make gpu-check`).

Budget: 480 s of wall time for all steps (--budget-s), on an H100/H200 with torch 2.11,
Triton 3.6, nvcc and ncu, no network, no flash-attn / xformers / bitsandbytes unless
carried as wheels in .whl/. The repository is a plain copy (no install, maybe no .git):
every step runs with the checkout on PYTHONPATH, and the build step is the
`pip install --no-build-isolation --no-deps -e .` that compiles fastvlm._C for this GPU.
The steps' caps add up to 425 s (440 s with carried wheels), a margin of 40 s for the
runner (Python start-up, a capped step's 5 s to stop, the summaries). Steps, in order, with
their caps and their wall time in the CPU rehearsal (`--dry-run`: tiny sizes, the Triton
interpreter, caps and budget x4), on the shared 2-core dev machine, 2026-12-06: 442 s in all
at load average ~11 (run A, caps x3 then); 647 s at ~13 (run B, where a step's time above
its rehearsal cap means it was cut there: the cap path rehearsed too):

  step        cap    what                                                 CPU rehearsal A / B
  wheels       15 s  install carried wheels from .whl/ (if any)           (none carried)
  attention   190 s  THE HEADLINE: bench_attention_headline.py, fwd+bwd    23 / 55 s
                     at N=8192, head_dim 128, GQA 4:1, bf16: plain causal,
                     packed causal, image_bidirectional, mmca split vs
                     SDPA flash / cuDNN, FA2 varlen (PyTorch's; flash-attn's
                     if carried), FlexAttention; fastvlm's static-table
                     tiles first, then auto (its choice recorded) and the
                     deterministic backward; each row written to
                     --out/attention_headline.jsonl (+ .md with the targets)
                     as it is measured; skips what its budget cannot start
  info         10 s  python -m fastvlm info                               15 / 40 (cut) s
  build        80 s  fastvlm._C for this GPU's arch only                  239 / 324 (cut) s (CPU part)
  pytest       90 s  pytest -m gpu over the files with GPU tests, no -x,  16 / 20 s (they skip)
                     --continue-on-collection-errors, 60 s per test
                     (pytest-timeout, in the image), junit xml to --out
  connector    15 s  bench_fused_mlp at its issue target                  31 / 34 s (--smoke)
  encoder      15 s  bench_encoder                                        49 (cut) / 64 (cut) s
  lora         10 s  bench_lora_linear                                    27 / 31 s (--smoke)
  train        15 s  bench_train --smoke on the GPU (a functional check)  35 (cut) / 65 (cut) s

A step over its cap gets SIGINT (pytest then writes its report, the headline keeps its
rows), then SIGKILL 5 s later, and the next step runs; a failed step is recorded and the
next one runs; the exit status is non-zero if any step did not pass. --out holds at most 7
files at any moment (what the device tool brings back is 8): summary.md and summary.json
(rewritten after every step, with device, date, commit, versions and issue 28's targets
with their measured ratios and gaps), attention_headline.jsonl / .md, pytest_gpu.xml,
logs.tar.gz and results.tar.gz (re-bundled after every step); the work folder is outside.

    python3 benchmarks/gpu_check.py --out $OUT           # on the GPU machine (make gpu-check)
    python3 benchmarks/gpu_check.py --dry-run --out DIR  # CPU rehearsal: every step, tiny sizes

Without .git on the machine, pass the commit: FASTVLM_COMMIT=<sha> (the summary also
records the git blob ids of the attention sources, which name the commit they came from).
Through the device tool: one call, timeout_s 560 (the 480 s budget, Python start-up and a
margin), command `FASTVLM_COMMIT=<sha> python3 benchmarks/gpu_check.py --out $OUT` (make may
be absent there); commit what comes back under benchmarks/results/gpu_check_<device>_<date>/.

Wheels for the optional baselines, downloaded beforehand on a machine with a package
registry (the GPU machine's python is 3.12), into the repository's .whl/ (git-ignored),
then carried with the call:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl bitsandbytes==0.50.2
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(ROOT))  # fastvlm from this checkout, installed or not

from attention_targets import target_results, targets_markdown  # noqa: E402

WHEELS = ROOT / ".whl"
SITE = Path("/tmp/fastvlm-site")
BUDGET_S = 480
MARGIN_S = 40  # the runner's own time: start-up, a capped step's stop, summaries and bundles
STOP_GRACE_S = 5  # a step over its cap: SIGINT, then SIGKILL this much later
PER_TEST_TIMEOUT_S = 60
HEADLINE_CAP_S = 190
DRY_RUN_SCALE = 4  # the rehearsal's caps and budget: the interpreter and a shared 2-core machine are slow
GPU_MARK = "pytest.mark.gpu"  # how a GPU test is marked (tests/conftest.py skips it without CUDA)
SOURCES = ("fastvlm/kernels/attention.py", "fastvlm/ops/attention.py", "benchmarks/bench_attention_headline.py")


@dataclass
class Step:
    key: str  # short name for --only
    name: str
    cmd: list[str]
    cap_s: int  # wall-clock cap of this step
    env: dict = field(default_factory=dict)


@dataclass
class Outcome:
    name: str
    status: str  # passed | failed | timeout | skipped
    seconds: float
    returncode: int | None
    log: str
    tail: str
    cap_s: float = 0.0


def gpu_arch() -> str | None:
    """'9.0' for an H100/H200: the one arch the build targets."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}"


def gpu_test_files() -> list[str]:
    """The test files that hold GPU tests: collecting only them keeps the step's time for
    running tests (the whole suite's collection imports every model family)."""
    return sorted(f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")
                  if GPU_MARK in p.read_text(errors="replace"))


def steps(dry_run: bool, results: Path, python: str, out: Path | None = None) -> list[Step]:
    """The check, in order (headline first). Dry run: the same steps at tiny size on CPU.
    out: where the headline's rows and the pytest report land as they are written."""
    out = out or results
    py = [python]
    arch = None if dry_run else gpu_arch()
    wheels = sorted(WHEELS.glob("*.whl")) if WHEELS.is_dir() else []
    scale = DRY_RUN_SCALE if dry_run else 1
    plan = []
    if wheels:
        pip = ["-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", str(SITE)]
        plan.append(Step("wheels", "install carried wheels", py + pip + [str(w) for w in wheels], 15))
    tiny = ["--smoke"] if dry_run else []
    headline_cap = HEADLINE_CAP_S * scale
    plan.append(Step("attention", "headline: attention fwd+bwd at 8k", py + [
        str(BENCH / "bench_attention_headline.py"), *tiny, "--out", str(out),
        "--budget-s", str(headline_cap - STOP_GRACE_S - 2)], headline_cap))
    plan.append(Step("info", "import and info", py + ["-m", "fastvlm", "info"], 10 * scale))
    if dry_run:  # compile the CPU part into a scratch folder: the checkout's own build stays as it is
        scratch = results.parent / "build"
        plan.append(Step("build", "build fastvlm._C (CPU part)", py + [
            "setup.py", "-q", "build_ext", "--build-lib", str(scratch / "lib"), "--build-temp", str(scratch / "tmp")],
            80 * scale, env={"FASTVLM_CUDA": "0", "MAX_JOBS": "2"}))
    else:
        plan.append(Step("build", f"build fastvlm._C for sm {arch}", py + [
            "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."], 80,
            env={"TORCH_CUDA_ARCH_LIST": arch or "", "FASTVLM_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 4)}))
    # no -x: a suite's first run on hardware should report every failure, not the first;
    # a file that fails to import is one error, not the end of the run
    pytest = py + ["-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                   f"--junitxml={out / 'pytest_gpu.xml'}"]
    if _has_pytest_timeout(python):
        pytest.append(f"--timeout={PER_TEST_TIMEOUT_S}")
    plan.append(Step("pytest", "pytest -m gpu", pytest + gpu_test_files(), 90 * scale))

    def bench(key, name, script, args, cap, smoke_args=None):
        argv = [str(BENCH / script), *(tiny + (smoke_args or []) if dry_run else args)]
        plan.append(Step(key, name, py + argv, cap * scale))

    bench("connector", "connector vs eager / compile", "bench_fused_mlp.py",
          ["--only", "clip-l/336->4096", "--repeats", "10", "--out", str(results / "bench_fused_mlp.json")], 15,
          ["--out", str(results / "bench_fused_mlp_smoke.json")])
    bench("encoder", "encoder checkpointing + offload", "bench_encoder.py",
          ["--models", "clip-l14-336", "--layers", "6", "--repeats", "3", "--out", str(results / "bench_encoder.json")],
          15, ["--out", str(results / "bench_encoder_smoke.json")])
    bench("lora", "fused LoRA vs PEFT", "bench_lora_linear.py",
          ["--reps", "30", "--out", str(results / "bench_lora_linear.json")],
          10, ["--out", str(results / "bench_lora_linear_smoke.json")])
    bench("train", "bench_train --smoke (the training step runs)", "bench_train.py",
          ["--smoke", "--device", "cuda", "--out", str(results)], 15, ["--out", str(results)])
    return plan


def _has_pytest_timeout(python: str) -> bool:
    return subprocess.run([python, "-c", "import pytest_timeout"], capture_output=True).returncode == 0


def step_env(step: Step) -> dict:
    """The checkout (and carried wheels) on PYTHONPATH: the machine has no install of fastvlm
    before the build step, and an install elsewhere must not stand in for this checkout."""
    paths = [str(SITE)] if SITE.is_dir() else []
    paths += [str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, **step.env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_step(step: Step, logs: Path, deadline: float) -> Outcome:
    left = deadline - time.monotonic()
    log = logs / f"{len(list(logs.iterdir())):02d}-{''.join(c if c.isalnum() else '_' for c in step.name)[:40]}.log"
    if left < 10:
        log.write_text("skipped: the check's overall budget is spent\n")
        return Outcome(step.name, "skipped", 0.0, None, log.name, "budget spent", step.cap_s)
    cap = min(step.cap_s, left)
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(step.cmd)}\n(cap {cap:.0f} s)\n")
        f.flush()
        # its own process group (in this session, which the device tool ends with the command):
        # a stop reaches its children too (Inductor's compile workers)
        proc = subprocess.Popen(step.cmd, cwd=ROOT, env=step_env(step), stdout=f, stderr=subprocess.STDOUT,
                                preexec_fn=os.setpgrp)
        try:
            rc = proc.wait(timeout=cap)
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:  # SIGINT: pytest writes its report, the headline its rows
            _signal_group(proc, signal.SIGINT)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            status, rc = "timeout", None
        _signal_group(proc, signal.SIGKILL)  # whatever it left running
    seconds = time.monotonic() - t0
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    return Outcome(step.name, status, round(seconds, 1), rc, log.name, tail, step.cap_s)


def blob_id(path: Path) -> str:
    """git's object id of a file's content: `git log --find-object=<id>` names its commits."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def environment(dry_run: bool) -> dict:
    from common import environment as bench_environment  # imports torch and fastvlm (from ROOT)

    env = bench_environment("cpu" if dry_run else "cuda")
    if env["commit"] == "unknown":  # a copy of the checkout without .git
        env["commit"] = os.environ.get("FASTVLM_COMMIT") or "unknown (set FASTVLM_COMMIT)"
    env["sources"] = {s: blob_id(ROOT / s) for s in SOURCES if (ROOT / s).exists()}
    return env


def pytest_counts(xml: Path) -> str | None:
    """'tests T, failures F, errors E, skipped S' from the junit report, if written."""
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return ", ".join(f"{k} {v}" for k, v in total.items())


def headline_rows(out: Path) -> list[dict]:
    rows = out / "attention_headline.jsonl"
    return [json.loads(line) for line in rows.read_text().splitlines() if line.strip()] if rows.exists() else []


def summarize(plan: list[Step], outcomes: list[Outcome], env: dict, dry_run: bool, out: Path,
              budget_s: float) -> str:
    lines = [f"# fastvlm GPU check{' (CPU dry run: not a speed test)' if dry_run else ''}", "",
             f"{env['date']}  commit {env['commit']}  device {env['device']}  torch {env['torch']}  "
             f"triton {env['triton']}  cuda {env['cuda']}  python {env['python']}", "",
             "sources (git blob ids): " + ", ".join(f"{k} {v[:12]}" for k, v in env["sources"].items()), "",
             f"budget {budget_s:.0f} s; caps {sum(s.cap_s for s in plan)} s in all", "",
             "## Issue 28's targets (fwd+bwd, N=8192, head_dim 128, GQA 4:1, bf16)", "",
             targets_markdown(headline_rows(out)),
             "Every row: attention_headline.md / .jsonl (the config `auto` chose, the table's, each timed).", "",
             "| step | cap s | status | seconds | log |", "|---|---|---|---|---|"]
    done = {o.name: o for o in outcomes}
    for s in plan:
        o = done.get(s.name)
        lines.append(f"| {s.name} | {s.cap_s} | {o.status if o else 'pending'} | {o.seconds if o else ''} | "
                     f"{o.log if o else ''} |")
    counts = pytest_counts(out / "pytest_gpu.xml")
    if counts:
        lines += ["", f"pytest -m gpu: {counts} (pytest_gpu.xml)"]
    for o in outcomes:
        if o.status != "passed":
            lines += ["", f"## {o.name}: {o.status}", "```", o.tail, "```"]
    return "\n".join(lines) + "\n"


def bundle(folder: Path, name: str, out: Path) -> Path | None:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        return None
    path = out / name
    tmp = path.with_suffix(".partial")  # a kill mid-write keeps the last whole bundle
    with tarfile.open(tmp, "w:gz") as tar:
        for p in files:
            tar.add(p, arcname=str(p.relative_to(folder)))
    tmp.replace(path)
    return path


def record(plan, outcomes, env, dry_run, out: Path, work: Path, budget_s: float) -> str:
    """summary.md / summary.json and the bundles as they stand: a kill keeps all of it."""
    text = summarize(plan, outcomes, env, dry_run, out, budget_s)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({
        "env": env, "dry_run": dry_run, "budget_s": budget_s, "caps": {s.name: s.cap_s for s in plan},
        "steps": [asdict(o) for o in outcomes], "targets": target_results(headline_rows(out))}, indent=1))
    bundle(work / "logs", "logs.tar.gz", out)
    bundle(work / "results", "results.tar.gz", out)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU rehearsal of every step at tiny size")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "_local" / "gpu_check")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"wall-clock budget for all steps (default {BUDGET_S}; --dry-run: {DRY_RUN_SCALE}x that)")
    ap.add_argument("--only", nargs="+", metavar="STEP",
                    help="run only these steps (wheels attention info build pytest connector encoder lora train)")
    args = ap.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = BUDGET_S * (DRY_RUN_SCALE if args.dry_run else 1)
    if not args.dry_run and gpu_arch() is None:
        print("gpu_check: no CUDA GPU visible; use --dry-run to rehearse on CPU", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.budget_s - STOP_GRACE_S  # the last step's stop fits too
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))  # outside --out: it brings back 8 files at most
    logs, results = work / "logs", work / "results"
    for d in (logs, results):
        d.mkdir(parents=True)
    plan = steps(args.dry_run, results, sys.executable, out=args.out)
    if args.only:
        unknown = set(args.only) - {s.key for s in plan}
        if unknown:
            ap.error(f"--only: unknown steps {sorted(unknown)}; this run has {[s.key for s in plan]}")
        plan = [s for s in plan if s.key in args.only]
    env = environment(args.dry_run)
    outcomes = []
    try:
        record(plan, outcomes, env, args.dry_run, args.out, work, args.budget_s)
        for step in plan:
            o = run_step(step, logs, deadline)
            outcomes.append(o)
            print(f"[gpu-check] {o.status:8s} {o.seconds:7.1f}s  (cap {step.cap_s:4d} s)  {o.name}", flush=True)
            record(plan, outcomes, env, args.dry_run, args.out, work, args.budget_s)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print((args.out / "summary.md").read_text())
    return 0 if all(o.status == "passed" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
