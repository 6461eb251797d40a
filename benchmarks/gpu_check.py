"""The GPU check: one short, prepared run on a bare GPU machine (`make gpu-check`).

On an H100/H200 with torch, Triton and nvcc but no network, in about 8 minutes
of wall time including the build:
  1. installs carried wheels from .whl/ (flash-attn, xformers, bitsandbytes),
  2. builds fastvlm._C for this machine's GPU architecture only,
  3. runs every GPU test (`pytest -m gpu`),
  4. runs the headline benchmarks at the issue targets, each under its own time
     cap so one slow piece cannot eat the rest,
  5. bundles everything into at most 8 files under --out (summary.md,
     summary.json, logs.tar.gz, results.tar.gz).

    python benchmarks/gpu_check.py --out $OUT           # on the GPU machine
    python benchmarks/gpu_check.py --dry-run --out DIR  # CPU rehearsal: every step, tiny sizes

Wheels for the optional baselines, downloaded beforehand on a machine with a
package registry (the GPU machine's python is 3.12), into the repository's
.whl/ (git-ignored), then carried with the call:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl bitsandbytes==0.50.2

A step that fails or runs out of time is recorded and the next one runs; the
exit status is non-zero if any step failed, so a caller can tell.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
WHEELS = ROOT / ".whl"
SITE = Path("/tmp/fastvlm-site")


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


def gpu_arch() -> str | None:
    """'9.0' for an H100/H200: the one arch the build targets."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}"


def steps(dry_run: bool, results: Path, python: str) -> list[Step]:
    """The check, in order. Dry run: the same steps at tiny size on CPU."""
    py = [python]
    arch = None if dry_run else gpu_arch()
    wheels = sorted(WHEELS.glob("*.whl")) if WHEELS.is_dir() else []
    out = []
    if wheels:
        pip = ["-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", str(SITE)]
        out.append(Step("wheels", "install carried wheels", py + pip + [str(w) for w in wheels], 120))
    if dry_run:  # compile the CPU part into a scratch folder: the checkout's own build stays as it is
        scratch = results.parent / "build"
        out.append(Step("build", "build fastvlm._C (CPU part)", py + ["setup.py", "-q", "build_ext", "--build-lib",
                                                           str(scratch / "lib"), "--build-temp",
                                                           str(scratch / "tmp")], 300,
                        env={"FASTVLM_CUDA": "0", "MAX_JOBS": "2"}))
    else:
        out.append(Step("build", f"build fastvlm._C for sm {arch}", py + ["-m", "pip", "install", "-q",
                                                               "--no-build-isolation", "--no-deps", "-e", "."],
                        240, env={"TORCH_CUDA_ARCH_LIST": arch or "", "FASTVLM_CUDA": "1",
                                  "MAX_JOBS": str(os.cpu_count() or 4)}))
    out.append(Step("info", "import and info", py + ["-m", "fastvlm", "info"], 60))
    if dry_run:  # collect the GPU tests (they skip without a GPU) and run one CPU file through the same path
        out.append(Step("pytest", "pytest -m gpu", py + ["-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                               "tests/test_attention_triton.py"], 120))
    else:
        out.append(Step("pytest", "pytest -m gpu", py + ["-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                               "-x", "--timeout=120", "tests"]
                        if _has_pytest_timeout(python) else
                        py + ["-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"], 200))
    tiny = ["--smoke"] if dry_run else []

    def bench(key, name, script, args, cap, smoke_args=None):
        argv = [str(BENCH / script), *(tiny + (smoke_args or []) if dry_run else args)]
        out.append(Step(key, name, py + argv, cap * (3 if dry_run else 1)))

    bench("attention", "attention fwd+bwd at 1k/8k + 50-batch loop", "bench_attention.py",
          ["--n", "1024", "8192", "--head-dims", "128", "--kinds", "causal", "mmca", "image_bidirectional",
           "--repeats", "5", "--out", str(results)], 150, ["--out", str(results), "--no-plot"])
    bench("connector", "connector vs eager / compile", "bench_connector.py",
          ["--only", "clip-l/336->4096", "--repeats", "10", "--out", str(results / "bench_connector.json")], 60,
          ["--out", str(results / "bench_connector_smoke.json")])
    bench("encoder", "encoder checkpointing + offload", "bench_encoder.py",
          ["--models", "clip-l14-336", "--layers", "6", "--repeats", "3", "--out", str(results / "bench_encoder.json")],
          60, ["--out", str(results / "bench_encoder_smoke.json")])
    bench("lora", "fused LoRA vs PEFT", "bench_lora.py", ["--reps", "30", "--out", str(results / "bench_lora.json")],
          45, ["--out", str(results / "bench_lora_smoke.json")])
    for optional, args in (("bench_train.py", ["--out", str(results)]), ("bench_hf.py", ["--out", str(results)])):
        if (BENCH / optional).exists():  # the end-to-end benchmarks, once they exist
            stem = optional.removesuffix(".py")
            bench(stem.removeprefix("bench_"), stem, optional, args, 90, ["--out", str(results)])
    return out


def _has_pytest_timeout(python: str) -> bool:
    return subprocess.run([python, "-c", "import pytest_timeout"], capture_output=True).returncode == 0


def run_step(step: Step, logs: Path, deadline: float) -> Outcome:
    left = deadline - time.monotonic()
    log = logs / f"{len(list(logs.iterdir())):02d}-{''.join(c if c.isalnum() else '_' for c in step.name)[:40]}.log"
    if left < 10:
        log.write_text("skipped: the check's overall budget is spent\n")
        return Outcome(step.name, "skipped", 0.0, None, log.name, "budget spent")
    env = {**os.environ, **step.env, "PYTHONUNBUFFERED": "1"}
    if SITE.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE), env.get("PYTHONPATH", "")) if p)
    cap = min(step.cap_s, left)
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(step.cmd)}\n(cap {cap:.0f} s)\n")
        f.flush()
        try:
            proc = subprocess.run(step.cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=cap)
            status, rc = ("passed" if proc.returncode == 0 else "failed"), proc.returncode
        except subprocess.TimeoutExpired:
            status, rc = "timeout", None
    seconds = time.monotonic() - t0
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    return Outcome(step.name, status, round(seconds, 1), rc, log.name, tail)


def summarize(outcomes: list[Outcome], env: dict, dry_run: bool) -> str:
    lines = [f"# fastvlm GPU check{' (CPU dry run: not a speed test)' if dry_run else ''}", "",
             f"{env['date']}  commit {env['commit']}  device {env['device']}  torch {env['torch']}  "
             f"triton {env['triton']}  cuda {env['cuda']}", "",
             "| step | status | seconds | log |", "|---|---|---|---|"]
    lines += [f"| {o.name} | {o.status} | {o.seconds} | {o.log} |" for o in outcomes]
    for o in outcomes:
        if o.status != "passed":
            lines += ["", f"## {o.name}: {o.status}", "```", o.tail, "```"]
    return "\n".join(lines) + "\n"


def bundle(folder: Path, name: str, out: Path) -> Path | None:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        return None
    path = out / name
    with tarfile.open(path, "w:gz") as tar:
        for p in files:
            tar.add(p, arcname=str(p.relative_to(folder)))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU rehearsal of every step at tiny size")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "_local" / "gpu_check")
    ap.add_argument("--budget-s", type=float, default=480, help="wall-clock budget for all steps")
    ap.add_argument("--only", nargs="+", metavar="STEP",
                    help="run only these steps (wheels build info pytest attention connector encoder lora train hf)")
    args = ap.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "_work"
    logs, results = work / "logs", work / "results"
    for d in (logs, results):
        d.mkdir(parents=True, exist_ok=True)
    if not args.dry_run and gpu_arch() is None:
        print("gpu_check: no CUDA GPU visible; use --dry-run to rehearse on CPU", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.budget_s
    outcomes = []
    plan = steps(args.dry_run, results, sys.executable)
    if args.only:
        unknown = set(args.only) - {s.key for s in plan}
        if unknown:
            ap.error(f"--only: unknown steps {sorted(unknown)}; this run has {[s.key for s in plan]}")
        plan = [s for s in plan if s.key in args.only]
    for step in plan:
        o = run_step(step, logs, deadline)
        outcomes.append(o)
        print(f"[gpu-check] {o.status:8s} {o.seconds:7.1f}s  {o.name}", flush=True)

    from common import environment  # after the build step: it imports torch (and fastvlm's commit)

    env = environment("cpu" if args.dry_run else "cuda")
    text = summarize(outcomes, env, args.dry_run)
    (args.out / "summary.md").write_text(text)
    (args.out / "summary.json").write_text(json.dumps({"env": env, "dry_run": args.dry_run,
                                                       "steps": [asdict(o) for o in outcomes]}, indent=1))
    bundle(logs, "logs.tar.gz", args.out)
    bundle(results, "results.tar.gz", args.out)
    import shutil

    shutil.rmtree(work)
    print(text)
    return 0 if all(o.status == "passed" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
