"""The GPU check: one short, prepared run on a bare GPU machine (`make gpu-check`).

Budget: 480 s of wall time for all steps (--budget-s), on an H100/H200 with torch 2.11,
Triton 3.6 and nvcc, no network, no flash-attn / xformers / bitsandbytes unless carried.
The steps' caps add up to 415 s (445 s with carried wheels): a 35 s margin for the
runner itself, Python start-up and the bundle. Steps, in order, with their caps and
their wall time on the CPU rehearsal (`--dry-run`, tiny sizes, Triton interpreter, the
shared 2-core dev machine, 2026-12-06, 275 s in all; the rehearsal triples each cap):

  step        cap    what                                              CPU rehearsal
  wheels       30 s  install carried wheels from .whl/ (if any)        (none carried)
  attention   140 s  THE HEADLINE: bench_attention_headline.py, fwd+bwd  56 s
                     at N=8192, head_dim 128, GQA 4:1, bf16: plain
                     causal, packed causal, image_bidirectional, mmca
                     split vs SDPA flash / cuDNN, FA2 varlen (carried),
                     FlexAttention; fastvlm's static-table tiles, auto's
                     choice (recorded) and the deterministic backward;
                     each row written to --out/attention_headline.jsonl
                     the moment it is measured
  info         10 s  python -m fastvlm info                            8 s
  build        90 s  fastvlm._C for this machine's arch only            107 s (CPU part)
  pytest      100 s  pytest -m gpu, no -x, 60 s per test (pytest-timeout 8 s (one file: skips)
                     is in the image), -v so the log holds each result
  connector    20 s  bench_fused_mlp at its issue target                15 s (--smoke)
  encoder      20 s  bench_encoder                                      22 s (--smoke)
  lora         15 s  bench_lora_linear                                  17 s (--smoke)
  train        20 s  bench_train (7B shapes: likely cut at its cap)     41 s (--smoke)

A step that fails or runs out of time is recorded and the next one runs; the exit
status is non-zero if any step failed. Everything is bundled into at most 8 files under
--out (summary.md, summary.json, logs.tar.gz, results.tar.gz, attention_headline.jsonl).

    python benchmarks/gpu_check.py --out $OUT           # on the GPU machine
    python benchmarks/gpu_check.py --dry-run --out DIR  # CPU rehearsal: every step, tiny sizes

Wheels for the optional baselines, downloaded beforehand on a machine with a
package registry (the GPU machine's python is 3.12), into the repository's
.whl/ (git-ignored), then carried with the call:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl bitsandbytes==0.50.2
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


BUDGET_S = 480


def steps(dry_run: bool, results: Path, python: str, out: Path | None = None) -> list[Step]:
    """The check, in order (headline first). Dry run: the same steps at tiny size on CPU.
    out: where the headline's rows land as they are measured (default: results)."""
    py = [python]
    arch = None if dry_run else gpu_arch()
    wheels = sorted(WHEELS.glob("*.whl")) if WHEELS.is_dir() else []
    scale = 3 if dry_run else 1  # the interpreter is slow: the rehearsal's caps are tripled
    plan = []
    if wheels:
        pip = ["-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", str(SITE)]
        plan.append(Step("wheels", "install carried wheels", py + pip + [str(w) for w in wheels], 30))
    tiny = ["--smoke"] if dry_run else []
    plan.append(Step("attention", "headline: attention fwd+bwd at 8k", py + [
        str(BENCH / "bench_attention_headline.py"), *tiny, "--out", str(out or results)], 140 * scale))
    plan.append(Step("info", "import and info", py + ["-m", "fastvlm", "info"], 10 * scale))
    if dry_run:  # compile the CPU part into a scratch folder: the checkout's own build stays as it is
        scratch = results.parent / "build"
        plan.append(Step("build", "build fastvlm._C (CPU part)", py + ["setup.py", "-q", "build_ext", "--build-lib",
                                                            str(scratch / "lib"), "--build-temp",
                                                            str(scratch / "tmp")], 300,
                         env={"FASTVLM_CUDA": "0", "MAX_JOBS": "2"}))
    else:
        plan.append(Step("build", f"build fastvlm._C for sm {arch}", py + ["-m", "pip", "install", "-q",
                                                                "--no-build-isolation", "--no-deps", "-e", "."],
                         90, env={"TORCH_CUDA_ARCH_LIST": arch or "", "FASTVLM_CUDA": "1",
                                  "MAX_JOBS": str(os.cpu_count() or 4)}))
    pytest = py + ["-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider"]
    if dry_run:  # collect the GPU tests (they skip without a GPU) and run one CPU file through the same path
        plan.append(Step("pytest", "pytest -m gpu", pytest + ["tests/test_attention_triton.py"], 120))
    else:  # no -x: a suite's first run on hardware should report every failure, not the first
        timeout = ["--timeout=60"] if _has_pytest_timeout(python) else []
        plan.append(Step("pytest", "pytest -m gpu", pytest + timeout + ["tests"], 100))

    def bench(key, name, script, args, cap, smoke_args=None):
        argv = [str(BENCH / script), *(tiny + (smoke_args or []) if dry_run else args)]
        plan.append(Step(key, name, py + argv, cap * scale))

    bench("connector", "connector vs eager / compile", "bench_fused_mlp.py",
          ["--only", "clip-l/336->4096", "--repeats", "10", "--out", str(results / "bench_fused_mlp.json")], 20,
          ["--out", str(results / "bench_fused_mlp_smoke.json")])
    bench("encoder", "encoder checkpointing + offload", "bench_encoder.py",
          ["--models", "clip-l14-336", "--layers", "6", "--repeats", "3", "--out", str(results / "bench_encoder.json")],
          20, ["--out", str(results / "bench_encoder_smoke.json")])
    bench("lora", "fused LoRA vs PEFT", "bench_lora_linear.py",
          ["--reps", "30", "--out", str(results / "bench_lora_linear.json")],
          15, ["--out", str(results / "bench_lora_linear_smoke.json")])
    if (BENCH / "bench_train.py").exists():  # the end-to-end benchmark, once it exists
        bench("train", "bench_train", "bench_train.py", ["--out", str(results)], 20, ["--out", str(results)])
    return plan


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


def summarize(outcomes: list[Outcome], env: dict, dry_run: bool, headline: list[dict] = ()) -> str:
    lines = [f"# fastvlm GPU check{' (CPU dry run: not a speed test)' if dry_run else ''}", "",
             f"{env['date']}  commit {env['commit']}  device {env['device']}  torch {env['torch']}  "
             f"triton {env['triton']}  cuda {env['cuda']}", "",
             "| step | status | seconds | log |", "|---|---|---|---|"]
    lines += [f"| {o.name} | {o.status} | {o.seconds} | {o.log} |" for o in outcomes]
    if headline:
        lines += ["", "## Headline: attention fwd+bwd (ratio = method's time / fastvlm_table's: > 1, fastvlm faster)",
                  "", "| layout | kind | method | fwd ms | fwd+bwd ms | ratio | config |",
                  "|---|---|---|---|---|---|---|"]
        for r in headline:
            timing = (f"{r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r.get('fwd_bwd_ratio', 1.0):.2f}"
                      if "fwd_bwd_ms" in r else f"{r.get('error', '')} | | ")
            lines.append(f"| {r['layout']} | {r['kind']} | {r['method']} | {timing} | {r.get('config', '')} |")
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
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="wall-clock budget for all steps")
    ap.add_argument("--only", nargs="+", metavar="STEP",
                    help="run only these steps (wheels attention info build pytest connector encoder lora train)")
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
    plan = steps(args.dry_run, results, sys.executable, out=args.out)
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
    rows = args.out / "attention_headline.jsonl"
    headline = [json.loads(line) for line in rows.read_text().splitlines()] if rows.exists() else []
    text = summarize(outcomes, env, args.dry_run, headline)
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
