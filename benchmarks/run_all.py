"""Every benchmark in one command, results in one dated folder.

    python benchmarks/run_all.py --quick      # CPU: small sizes, a few minutes
    python benchmarks/run_all.py              # GPU: the full set
    python benchmarks/run_all.py --smoke      # seconds per benchmark (the test)

Writes each benchmark's JSON + markdown under
benchmarks/results/<device>-<date>/ (or --out), then summary.md and
summary.png (the headline ratios of every result, via report.py). A benchmark
that fails is reported and the rest still run; the exit status says whether all
passed. `python benchmarks/report.py` then regenerates the README's Performance
section from the newest results.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import report

from common import RESULTS, environment, print_header

BENCH = Path(__file__).resolve().parent

# name -> (script, args per mode); "{out}" is the run's folder, "{json}" a file in it.
# The CPU-interpreter smoke runs of GPU kernels are correctness rehearsals, not speed
# tests: in --quick mode on CPU they run as --smoke and report.py marks them so.
PLAN = {
    "layout": ("bench_layout.py", {"smoke": ["--smoke"], "quick": ["--sizes", "4096", "16384", "--out", "{json}"],
                                 "full": ["--device", "cuda", "--out", "{json}"]}),
    "attention": ("bench_attention.py", {"smoke": ["--smoke", "--no-plot", "--out", "{out}"],
                                         "quick": ["--smoke", "--out", "{out}"],
                                         "full": ["--n", "1024", "8192", "--head-dims", "128", "--out", "{out}"]}),
    "fused_mlp": ("bench_fused_mlp.py", {"smoke": ["--smoke", "--out", "{json}"],
                                         "quick": ["--smoke", "--out", "{json}"], "full": ["--out", "{json}"]}),
    "encoder": ("bench_encoder.py", {"smoke": ["--smoke", "--out", "{json}"],
                                     "quick": ["--layers", "2", "--repeats", "2", "--out", "{json}"],
                                     "full": ["--out", "{json}"]}),
    "lora_linear": ("bench_lora_linear.py", {"smoke": ["--smoke", "--out", "{json}"],
                                             "quick": ["--smoke", "--out", "{json}"],
                                             "full": ["--out", "{json}"]}),
    "linear_cross_entropy": ("bench_linear_cross_entropy.py", {"smoke": ["--smoke"],
                                                               "quick": ["--tokens", "2048", "--out", "{json}"],
                                                               "full": ["--device", "cuda", "--out", "{json}"]}),
    "linear_logprob": ("bench_linear_logprob.py", {"smoke": ["--smoke"],
                                                   "quick": ["--tokens", "2048", "--out", "{json}"],
                                                   "full": ["--device", "cuda", "--out", "{json}"]}),
    "memory": ("bench_memory.py", {"smoke": ["--small", "--out", "{json}"], "quick": ["--small", "--out", "{json}"],
                                   "full": ["--out", "{json}"]}),
    "vlm": ("bench_vlm.py", {"smoke": ["--smoke"], "quick": ["--out", "{json}"],
                             "full": ["--device", "cuda", "--out", "{json}"]}),
    "data": ("bench_data.py", {"smoke": ["--smoke", "--out", "{json}"], "quick": ["--out", "{json}"],
                               "full": ["--out", "{json}"]}),
    "train": ("bench_train.py", {"smoke": ["--smoke", "--out", "{json}"], "quick": ["--quick", "--out", "{json}"],
                                 "full": ["--qlora", "--out", "{json}"]}),
    "train_hf_qwen": ("bench_train.py", {"smoke": ["--hf", "qwen2.5-vl", "--smoke", "--out", "{json}"],
                                         "quick": ["--hf", "qwen2.5-vl", "--quick", "--out", "{json}"],
                                         "full": ["--hf", "qwen2.5-vl", "--out", "{json}"]}),
    "train_hf_gemma3": ("bench_train.py", {"smoke": ["--hf", "gemma3", "--smoke", "--out", "{json}"],
                                           "quick": ["--hf", "gemma3", "--quick", "--out", "{json}"],
                                           "full": ["--hf", "gemma3", "--out", "{json}"]}),
    "preference": ("bench_preference.py", {"smoke": ["--smoke", "--out", "{json}"],
                                           "quick": ["--quick", "--out", "{json}"], "full": ["--out", "{json}"]}),
}


def command(name: str, mode: str, out: Path) -> list[str] | None:
    script, modes = PLAN[name]
    if not (BENCH / script).exists():
        return None
    args = [a.replace("{out}", str(out)).replace("{json}", str(out / f"bench_{name}.json")) for a in modes[mode]]
    return [sys.executable, str(BENCH / script), *args]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="CPU, small sizes (a few minutes)")
    mode.add_argument("--smoke", action="store_true", help="seconds per benchmark; what the tests run")
    ap.add_argument("--only", nargs="+", choices=list(PLAN), help="a subset of the benchmarks")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default benchmarks/results/<device>-<date>)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark")
    args = ap.parse_args(argv)
    run_mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    device = "cpu" if run_mode != "full" else "cuda"
    env = environment(device)
    tag = env["device"].split(":")[0].split("(")[0].strip().replace(" ", "_")
    out = args.out or RESULTS / f"{tag}-{env['date'][:10]}"
    out.mkdir(parents=True, exist_ok=True)
    print_header(f"run_all ({run_mode}) -> {out}", env)
    status = {}
    for name in args.only or PLAN:
        cmd = command(name, run_mode, out)
        if cmd is None:
            status[name] = ("missing", 0.0)
            continue
        t0 = time.monotonic()
        log = out / f"bench_{name}.log"
        with open(log, "w") as f:
            try:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
                state = "passed" if rc == 0 else f"failed (rc {rc})"
            except subprocess.TimeoutExpired:
                state = f"timeout ({args.timeout:.0f} s)"
        status[name] = (state, time.monotonic() - t0)
        print(f"[run_all] {name:10s} {state:16s} {status[name][1]:7.1f} s  log {log.name}", flush=True)
    rows = report.collect([out])
    (out / "summary.md").write_text(report.markdown(rows, status))
    report.plot(rows, out / "summary.png")
    print(report.markdown(rows, status))
    return 0 if all(s == "passed" or s == "missing" for s, _ in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
