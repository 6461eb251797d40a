"""Backend registry and dispatch shared by every op.

Each op registers its backends once, as ``name -> availability check``; a
check returns True, or a string saying why it cannot serve a device. ``auto``
takes the first available backend in the op's preference order for the
device; an explicitly requested backend that cannot serve the call raises
instead of silently falling back. ``fastvlm info`` reads the same registry.

Where the faster of several ways to serve a call depends on the GPU and the
shape (cuBLASLt vs Triton, tile sizes, flash-attn vs our kernel), ``auto``
decides by measurement: ``fastest_backend`` times each candidate once per
shape key on the caller's device and caches the winner for the process.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

Availability = Callable[[torch.device], "bool | str"]


@dataclass(frozen=True)
class OpBackends:
    name: str
    backends: dict[str, Availability]
    preference: dict[str, tuple[str, ...]]  # device type -> order for "auto"


REGISTRY: dict[str, OpBackends] = {}


def register_op(name: str, backends: dict[str, Availability],
                preference: dict[str, tuple[str, ...]]) -> OpBackends:
    REGISTRY[name] = OpBackends(name, dict(backends), dict(preference))
    return REGISTRY[name]


def why_unavailable(op: str, backend: str, device: torch.device) -> str | None:
    """None if `backend` can serve `op` on `device`, else the reason."""
    ok = REGISTRY[op].backends[backend](torch.device(device))
    return None if ok is True else (ok or "unavailable")


def resolve_backend(op: str, requested: str, device) -> str:
    spec = REGISTRY[op]
    device = torch.device(device)
    if requested == "auto":
        order = spec.preference.get(device.type, ())
        for name in order:
            if why_unavailable(op, name, device) is None:
                return name
        raise RuntimeError(f"{op}: no backend can serve device {device} (tried {', '.join(order) or 'none'})")
    if requested not in spec.backends:
        raise ValueError(f"backend: unknown backend {requested!r} for {op}; expected 'auto' or one of "
                         f"{', '.join(spec.backends)}")
    reason = why_unavailable(op, requested, device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend={requested!r} cannot serve tensors on {device}: {reason}")
    return requested


FASTEST: dict[tuple, object] = {}  # shape key -> the candidate measured fastest for it


def _median_ms(run: Callable[[], None], device: torch.device, repeats: int = 3) -> float:
    run()  # warm-up: compilation, autotuning
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fastest_backend(key: tuple, runners: dict, device: torch.device):
    """The candidate whose runner is fastest, measured once per key and then cached;
    a runner that raises (no algorithm, out of shared memory, a compile error) is out
    of the running; if all do, the first candidate is kept."""
    if key not in FASTEST:
        times = {}
        for name, run in runners.items():
            try:
                times[name] = _median_ms(run, device)
            except Exception:  # noqa: BLE001 - any failure only disqualifies the candidate
                continue
        FASTEST[key] = min(times, key=times.get) if times else next(iter(runners))
    return FASTEST[key]
