"""Shared benchmark plumbing: environment header, timing, result files."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from fastvlm.ops.backend import median_ms
from fastvlm.utils.io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def environment(device: str) -> dict:
    import triton

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(), "device": device_name(device), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "load_average_1min": round(os.getloadavg()[0], 2)}


def print_header(title: str, env: dict) -> None:
    print(f"# {title}")
    print(f"{env['date']}  commit {env['commit']}  device {env['device']}  torch {env['torch']}  "
          f"triton {env['triton']}  load average {env['load_average_1min']}")
    if env["device"].startswith("CPU") and env["load_average_1min"] > 0.5 * (os.cpu_count() or 1):
        # Each CPU kernel's threads wait at a barrier for the slowest: with another process on
        # the cores, short calls stretch (2 cores: a 251-token attention call 1 ms -> 8 ms).
        print(f"warning: load average {env['load_average_1min']} on {os.cpu_count()} cores: CPU timings "
              "are distorted by the other processes; measure on an idle machine")


def median_time(fn, repeats: int = 5, warmup: int = 1, device: str = "cpu") -> float:
    """Median seconds over `repeats` calls: the package's timer (fastvlm.ops.backend.median_ms,
    CUDA events on a GPU), which dispatch measures with too."""
    return median_ms(fn, torch.device(device), repeats, warmup) / 1e3


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=2))


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save_results(name: str, env: dict, payload: dict, markdown: str, out: Path | None = None) -> Path:
    """JSON (+ a markdown twin) under benchmarks/results/, named by device and date."""
    tag = env["device"].split(":")[0].split("(")[0].strip().replace(" ", "_")
    out = out or RESULTS / f"{name}_{tag}_{env['date'][:10]}.json"
    write_json(out, payload)
    out.with_suffix(".md").write_text(f"# {name}\n\n{json.dumps(env)}\n\n{markdown}\n")
    print(f"wrote {out}")
    return out


def peak_memory(step, device: str) -> int:
    """Bytes a call of `step` adds at its peak: CUDA's allocator peak over what was
    allocated before, or on CPU the growth of the process's peak resident set
    (meaningful in a fresh process: see run_isolated)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024


def run_isolated(script: str, args: list[str]) -> dict:
    """Run one benchmark case in a fresh Python process (so CPU peak memory is its
    own) and return the JSON object it prints last."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{Path(script).name} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the command line of the end-to-end training-step benchmarks (bench_train, bench_hf) ----
def training_step_parser(description: str) -> argparse.ArgumentParser:
    """The options bench_train and bench_hf share: shapes, device, variants, batches, LoRA rank."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU, small shapes")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, seconds (the test)")
    p.add_argument("--device", default=None, help="default: cuda if available (7B shapes), else cpu (--quick)")
    p.add_argument("--qlora", action="store_true", help="also the NF4 variants (bitsandbytes)")
    p.add_argument("--budget", type=int, default=None, help="packed row length (default 2048)")
    p.add_argument("--hf-batch", type=int, default=4, help="samples per padded micro-batch of the baseline")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON path or folder (default benchmarks/results/)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: one variant in a fresh process
    return p


def training_step_settings(args) -> dict:
    """device, shape (smoke / quick / 7b), budget and repeats the options resolve to."""
    device = args.device or ("cuda" if torch.cuda.is_available() and not (args.quick or args.smoke) else "cpu")
    shape = "smoke" if args.smoke else "quick" if (args.quick or device == "cpu") else "7b"
    return {"device": device, "shape": shape, "budget": args.budget or (256 if shape == "smoke" else 2048),
            "repeats": args.repeats or (1 if shape == "smoke" else 3)}


def run_training_cases(script: str, args, settings: dict, variants, one_case, write_checkpoint) -> list[dict] | None:
    """With --case (the child process): run that one variant with `one_case` and print its JSON;
    returns None. Otherwise write a random-weight checkpoint of the shape and run every variant
    in a fresh process of `script` (CPU peak memory is then its own); returns their rows."""
    s = settings
    common_args = (s["shape"], s["device"], s["repeats"], s["budget"], args.hf_batch, args.rank, args.seed)
    if args.case:
        case = json.loads(args.case)
        shape, device, repeats, budget, *rest = common_args
        print(json.dumps(one_case(shape, case["variant"], case["path"], device, repeats, budget, *rest)))
        return None
    flags = ["--smoke"] if args.smoke else ["--quick"] if s["shape"] == "quick" else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(s["shape"], Path(tmp), args.seed)
        for v in variants:
            case = json.dumps({"variant": v, "path": tmp})
            rows.append(run_isolated(script, [*flags, "--device", s["device"], "--budget", str(s["budget"]),
                                              "--hf-batch", str(args.hf_batch), "--rank", str(args.rank),
                                              "--repeats", str(s["repeats"]), "--seed", str(args.seed),
                                              "--case", case]))
            print(f"  {v}: {rows[-1]['seconds']:.2f} s/step, {rows[-1]['peak_bytes'] / 2**30:.2f} GiB", flush=True)
    return rows


def run_training_benchmark(argv, doc: str, name: str, script: str, variants, one_case, write_checkpoint,
                           baseline_of):
    """The shared main of bench_train and bench_hf: (args, settings, env, rows with their ratios);
    rows is None in a --case child, which has printed its result. `variants(qlora)` lists them."""
    args = training_step_parser(doc).parse_args(argv)
    settings = training_step_settings(args)
    env = None if args.case else environment(settings["device"])
    if env is not None:
        print_header(f"{name} ({settings['shape']} shapes, LoRA r {args.rank})", env)
    rows = run_training_cases(script, args, settings, variants(args.qlora), one_case, write_checkpoint)
    if rows is not None:
        add_ratios(rows, baseline_of)
    return args, settings, env, rows


def add_ratios(rows: list[dict], baseline_of) -> None:
    """speedup, memory_ratio and loss_gap of every row against the row `baseline_of(variant)` names."""
    by = {r["variant"]: r for r in rows}
    for r in rows:
        base = by[baseline_of(r["variant"])]
        r["speedup"] = base["seconds"] / r["seconds"]
        r["memory_ratio"] = r["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else float("nan")
        r["loss_gap"] = abs(r["loss"] - base["loss"]) / abs(base["loss"])


def results_path(out: Path | None, name: str, env: dict) -> Path | None:
    """--out as given when it is a .json path; a folder gets <name>_<device>_<date>.json; None: the default."""
    if out is None or out.suffix == ".json":
        return out
    tag = env["device"].split("(")[0].strip().replace(" ", "_")
    return out / f"{name}_{tag}_{env['date'][:10]}.json"


# ---- the LM-head benchmarks (bench_linear_cross_entropy, bench_linear_logprob) ----
def lm_head_benchmark(argv, doc: str, script: str, name: str, title: str, one_case, extra=()) -> dict | None:
    """The shared main: naive vs fastvlm per vocabulary, each CPU case in a fresh process.
    ``one_case(method, tokens, hidden, vocab, dtype, device, repeats, **extra)`` times one case;
    ``extra``: (flag, type, default, help) of the script's own options, passed to it by name."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--vocabs", type=int, nargs="+", default=[32000, 152064])
    p.add_argument("--supervised", type=float, default=0.3, help="fraction of tokens with a label")
    for flag, kind, default, text in extra:
        p.add_argument(flag, type=kind, default=default, help=text)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: one CPU case in a fresh process
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    tokens = args.tokens or (8192 if gpu else 2048)
    hidden = args.hidden or (4096 if gpu else 256)
    if args.smoke:
        tokens, hidden, args.vocabs, args.repeats = 256, 32, [2000], 1
    own = {flag.lstrip("-").replace("-", "_"): getattr(args, flag.lstrip("-").replace("-", "_"))
           for flag, *_ in extra}
    case = {"supervised": args.supervised, **own}
    if args.case:
        method, vocab = args.case.split(":")
        print(json.dumps(one_case(method, tokens, hidden, int(vocab), dtype, "cpu", args.repeats, **case)))
        return None
    env = environment(args.device)
    print_header(f"{title} ({name}.py)", env)
    rows = []
    for vocab in args.vocabs:
        for method in ("naive", "fastvlm"):
            if gpu:
                res = one_case(method, tokens, hidden, vocab, dtype, "cuda", args.repeats, **case)
            else:
                flags = [a for k, v in case.items() for a in (f"--{k.replace('_', '-')}", str(v))]
                res = run_isolated(script, ["--case", f"{method}:{vocab}", "--tokens", str(tokens),
                                            "--hidden", str(hidden), "--repeats", str(args.repeats), *flags])
            rows.append({"vocab": vocab, "method": method, **res})
            print(f"  vocab {vocab:6d} {method:8s} peak {res['peak_bytes'] / 2**20:9.1f} MiB  "
                  f"{res['seconds'] * 1e3:9.1f} ms", flush=True)
    table = []
    for vocab in args.vocabs:
        naive, ours = (next(r for r in rows if r["vocab"] == vocab and r["method"] == m) for m in ("naive", "fastvlm"))
        table.append([vocab, f"{naive['peak_bytes'] / 2**20:.0f}", f"{ours['peak_bytes'] / 2**20:.0f}",
                      f"{naive['peak_bytes'] / max(ours['peak_bytes'], 1):.1f}x",
                      f"{naive['seconds'] * 1e3:.1f}", f"{ours['seconds'] * 1e3:.1f}",
                      f"{naive['seconds'] / ours['seconds']:.2f}x"])
    md = markdown_table(["vocab", "naive peak MiB", "fastvlm peak MiB", "memory saved", "naive ms (median)",
                         "fastvlm ms (median)", "speedup"], table)
    print(f"tokens={tokens} hidden={hidden} dtype={dtype} " + " ".join(f"{k}={v}" for k, v in case.items()))
    print(md)
    payload = {"benchmark": name, "env": env, "tokens": tokens, "hidden": hidden, "dtype": str(dtype), **case,
               "rows": rows}
    if args.out or not args.smoke:
        save_results(f"{name}_sup{round(100 * args.supervised)}", env, payload, md, args.out)
    return payload
