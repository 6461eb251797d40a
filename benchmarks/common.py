"""Shared benchmark plumbing: environment header, timing, result files."""
from __future__ import annotations

import datetime
import json
import platform
import resource
import subprocess
import sys
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
            "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}


def print_header(title: str, env: dict) -> None:
    print(f"# {title}")
    print(f"{env['date']}  commit {env['commit']}  device {env['device']}  torch {env['torch']}  "
          f"triton {env['triton']}")


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
