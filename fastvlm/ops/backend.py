"""Backend registry and dispatch shared by every op.

Each op registers its backends once, as ``name -> availability check``; a
check returns True, or a string saying why it cannot serve a device. ``auto``
takes the first available backend in the op's preference order for the
device; an explicitly requested backend that cannot serve the call raises
instead of silently falling back. ``fastvlm info`` reads the same registry.
Every Triton backend uses the one check ``triton_serves``.

Where the faster of several ways to serve a call depends on the GPU and the
shape (cuBLASLt vs Triton, tile sizes, flash-attn vs our kernel), ``auto``
decides by measurement: ``fastest_backend`` times each candidate (a ``trial``:
forward, and backward when training, on detached inputs) once per shape key
(sizes rounded by ``shape_bucket``) with ``median_ms`` on the caller's device
and caches the winner for the process. Measurement never happens while
torch.compile traces, a CUDA graph captures, or with FASTVLM_AUTOTUNE=0
(``can_measure``): the first candidate, the static choice, serves then.

Tile configs, per op family (each has exactly one way):

- ``multimodal_attention``: a static table per GPU generation and head_dim
  (fastvlm/kernels/attention.py ``gpu_config``; the block map is built at its
  tile sizes, so forward and backward share one config) is the first of the
  candidates (``candidate_configs``) that ``fastest_backend`` times per shape
  key, together with flash-attn where it can serve the call.
- ``fused_linear_act`` / ``fused_mlp``: every GEMM launch is autotuned by
  Triton over ``_gpu_configs`` (fastvlm/kernels/fused_mlp.py), keyed by its
  M bucket, N, K and variant; the launches of one call differ in shape, so
  each picks its own. ``fastest_backend`` chooses only between the Triton and
  cuBLASLt backends.
- ``lora_linear``: fixed tiles per operand dtype (fastvlm/kernels/lora_linear.py
  ``_default_blocks``): its GEMMs are bandwidth-bound on x and W, which the
  fixed tiles read once.
- Under TRITON_INTERPRET=1 (CPU tensors, tests) every family runs one small
  fixed config: there is nothing to time.
"""
from __future__ import annotations

import importlib
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import _disable_current_modes  # private, stable since torch 1.13

Availability = Callable[[torch.device], "bool | str"]


@dataclass(frozen=True)
class OpBackends:
    name: str
    backends: dict[str, Availability]
    preference: dict[str, tuple[str, ...]]  # device type -> order for "auto"
    # backend -> the torch.library ops (namespace::name) it runs as: custom ops with fake and
    # autograd registrations, so torch.compile traces them (tests/test_op_registration.py)
    custom_ops: dict[str, tuple[str, ...]]


REGISTRY: dict[str, OpBackends] = {}


def register_op(name: str, backends: dict[str, Availability], preference: dict[str, tuple[str, ...]],
                custom_ops: dict[str, tuple[str, ...]] | None = None) -> OpBackends:
    REGISTRY[name] = OpBackends(name, dict(backends), dict(preference), dict(custom_ops or {}))
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


def always(device: torch.device) -> bool:
    """The availability of a backend that serves every device (a torch reference)."""
    return True


def import_kernels(name: str):
    """(fastvlm.kernels.<name>, None), or (None, why) where it does not import (no triton):
    the op's reference still serves then."""
    try:
        return importlib.import_module(f"fastvlm.kernels.{name}"), None
    except ImportError as exc:
        return None, f"{type(exc).__name__}: {exc}"


def triton_serves(kernels, import_error: str | None = None) -> Availability:
    """The availability check of a Triton backend whose kernel module is `kernels` (None where
    it failed to import, with `import_error`): CUDA tensors, or CPU tensors in the interpreter."""
    def check(device: torch.device):
        if kernels is None:
            return f"triton is not importable ({import_error})"
        if device.type == "cuda":
            return True
        if device.type == "cpu":
            # triton decides interpreter vs compiler when a kernel module is imported
            return True if kernels.INTERPRETED else (
                "Triton kernels need a CUDA device; CPU tensors run them only in the interpreter: set "
                "TRITON_INTERPRET=1 in the environment before importing fastvlm (tests only; it is not fast)")
        return f"no Triton kernels for device type {device.type!r}"
    return check


def shape_bucket(size: int) -> int:
    """`size` rounded up to a power of two: the sizes a measured choice is shared across."""
    return 1 << max(int(size) - 1, 0).bit_length()


def empty_if_none(tensors, like: torch.Tensor) -> list[torch.Tensor]:
    """A custom op returns no None: outputs (gradients) not asked for travel as empty tensors."""
    return [like.new_empty(0) if t is None else t for t in tensors]


def none_if_unneeded(tensors, needs) -> list[torch.Tensor | None]:
    """The inverse at the autograd formula: None where no gradient was asked for."""
    return [t if need else None for t, need in zip(tensors, needs)]


FASTEST: dict[tuple, object] = {}  # shape key -> the candidate measured fastest for it
# FASTVLM_AUTOTUNE=0: never time, always take the first candidate (the static choice), so
# that every process and every rank runs the same kernels with the same results.
AUTOTUNE = os.environ.get("FASTVLM_AUTOTUNE", "1") != "0"


def can_measure(device: torch.device) -> bool:
    """Whether a call on `device` may be timed now: CUDA, autotuning on, and neither
    torch.compile tracing nor a CUDA graph capturing (timing would break both)."""
    return (AUTOTUNE and device.type == "cuda" and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing())


def median_ms(run: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median milliseconds of `repeats` calls of run() after `warmup` untimed ones (compilation,
    autotuning): CUDA events on a GPU, the wall clock elsewhere. The one timer of dispatch
    and benchmarks."""
    device = torch.device(device)
    for _ in range(warmup):
        run()
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


def trial(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor | None], training: bool):
    """A runner for fastest_backend: fn(*inputs) on detached copies of the inputs (None passes
    through) and, when training, its backward for those that require grad; the caller's
    graph is untouched."""
    def run():
        with torch.set_grad_enabled(training):
            leaves = [None if t is None else t.detach().requires_grad_(training and t.requires_grad)
                      for t in inputs]
            out = fn(*leaves)
            if training:
                out.backward(torch.ones_like(out))
    return run


def _isolated_median_ms(run: Callable[[], object], device: torch.device) -> float:
    # The trials build and free their own small graphs, outside whatever encloses the
    # call: pass-through hooks keep an enclosing saved-tensor hook (non-reentrant
    # checkpointing, offloading) from taking their tensors, which would make a checkpoint
    # replay its region mid-forward; and with dispatch modes off, selective checkpointing
    # does not cache the trials' outputs, to be handed back for the real op's in recompute.
    with _disable_current_modes(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        return median_ms(run, device)


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
            times[name] = _isolated_median_ms(run, device)
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
