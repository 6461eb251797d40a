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

import os
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import _disable_current_modes  # private, stable since torch 1.13

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
# FASTVLM_AUTOTUNE=0: never time, always take the first candidate (the static choice), so
# that every process and every rank runs the same kernels with the same results.
AUTOTUNE = os.environ.get("FASTVLM_AUTOTUNE", "1") != "0"


def can_measure(device: torch.device) -> bool:
    """Whether a call on `device` may be timed now: CUDA, autotuning on, and neither
    torch.compile tracing nor a CUDA graph capturing (timing would break both)."""
    return (AUTOTUNE and device.type == "cuda" and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing())


def _median_ms(run: Callable[[], None], device: torch.device, repeats: int = 3) -> float:
    # The trials build and free their own small graphs, outside whatever encloses the
    # call: pass-through hooks keep an enclosing saved-tensor hook (non-reentrant
    # checkpointing, offloading) from taking their tensors, which would make a checkpoint
    # replay its region mid-forward; and with dispatch modes off, selective checkpointing
    # does not cache the trials' outputs, to be handed back for the real op's in recompute.
    with _disable_current_modes(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
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
    """The candidate whose runner is fastest, measured once per key and then cached.

    A runner that raises (no algorithm, out of shared memory, a compile error) is out
    of the running, with a warning naming the error; if all do, the first candidate is
    kept. A decision taken while a candidate ran out of GPU memory is not cached: the
    next call measures again."""
    if key in FASTEST:
        return FASTEST[key]
    if not AUTOTUNE:
        return next(iter(runners))
    times, dropped, out_of_memory = {}, [], False
    for name, run in runners.items():
        try:
            times[name] = _median_ms(run, device)
        except torch.cuda.OutOfMemoryError as exc:
            out_of_memory = True
            dropped.append(f"{name}: {exc}".splitlines()[0])
        except Exception as exc:  # noqa: BLE001 - any failure only disqualifies the candidate
            dropped.append(f"{name}: {type(exc).__name__}: {exc}".splitlines()[0][:200])
    if dropped:
        warnings.warn(f"fastvlm: candidates dropped while timing {key[0]}: " + "; ".join(dropped),
                      RuntimeWarning, stacklevel=2)
    choice = min(times, key=times.get) if times else next(iter(runners))
    if not out_of_memory:
        FASTEST[key] = choice
    return choice
