"""What every numerical test shares: one error metric, one tolerance rule, one
poisoned allocator, one way to check an op and its gradients. (The seed fixture
lives in conftest.py; random layouts in tests/layouts.py.)

The tolerance rule (flash-attn's ``attention_ref(upcast=False)`` rule): a fast
path computing in dtype T may be off from the float64 reference by at most a
small multiple of what plain PyTorch computing in the same dtype T is off by on
the same inputs, plus a floor of a few units of T's roundoff times the output's
scale. The floor covers outputs that are ~0 (a single-key softmax has a zero
gradient) and baselines that happen to round exactly. No constant is guessed:
both terms scale with the dtype and the data, so a new seed cannot break it.

Errors are norm-wise (‖got − ref‖₂): a sum over every element, so the ratio of a
fast path's error to the baseline's is stable from seed to seed (a max over
elements is an extreme value and is not), while a wrong tile, row or edge adds
O(1) relative error to its elements and still dwarfs the rounding term.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

# How many times plain PyTorch's own error a fast path may have: fused kernels
# sum in other orders and round intermediates differently, which costs a few x.
ERROR_FACTOR = 4.0
# Floor, in units of the dtype's unit roundoff times the output's scale.
FLOOR_ULPS = 4.0
# FASTVLM_TEST_MARGINS=FILE appends every comparison's error / bound there (the stress
# run's record of how close each bound came to failing).
MARGINS_FILE = os.environ.get("FASTVLM_TEST_MARGINS")


def _record_margin(name: str, err: float, bound: float, ulps: float):
    if MARGINS_FILE:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(MARGINS_FILE, "a") as f:
            f.write(f"{err / bound if bound else float('inf'):.4f} {ulps:.2f} {test} {name}\n")


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖₂ / ‖want‖₂ in float64; non-finite values fail (a poisoned output left unwritten)."""
    got, want = got.detach().double(), want.detach().double()
    assert torch.isfinite(got).all(), "non-finite values (an output left unwritten?)"
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def error_bound(baseline: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, scale: float | None = None,
                factor: float = ERROR_FACTOR) -> float:
    """The largest ‖got − ref64‖₂ a fast path in `dtype` may have, given `baseline`, the
    plain-PyTorch result in the same dtype on the same inputs. `scale` is the magnitude
    the floor is relative to (default ‖ref64‖₂; pass the norm of a comparable nonzero
    quantity when ref64 itself is ~0). A scalar (a loss) needs one too: one number's
    rounding error is a single draw, and plain PyTorch's may happen to be ~0; pass the
    magnitude its worst-case error scales with (e.g. |loss| times the terms it sums)."""
    ref64 = ref64.detach().double()
    base_err = float((baseline.detach().double() - ref64).norm())
    scale = float(ref64.norm()) if scale is None else scale
    return factor * base_err + FLOOR_ULPS * unit_roundoff(dtype) * scale


def assert_close(got: torch.Tensor, ref64: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype | None = None,
                 scale: float | None = None, factor: float = ERROR_FACTOR, name: str = "output"):
    """``got`` (fast path) within ``error_bound`` of the float64 reference ``ref64``.
    ``dtype`` (default ``got.dtype``) is the precision both got and baseline computed in."""
    dtype = dtype or got.dtype
    got, ref64, baseline = got.detach(), ref64.detach(), baseline.detach()
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an output left unwritten?)"
    err = float((got.double() - ref64.double()).norm())
    bound = error_bound(baseline, ref64, dtype, scale, factor)
    scale = float(ref64.double().norm()) if scale is None else scale
    _record_margin(name, err, bound, err / (unit_roundoff(dtype) * scale) if scale else float("inf"))
    assert err <= bound, (f"{name}: error {err:.3e} > bound {bound:.3e} ({factor}x plain PyTorch's "
                          f"{float((baseline.double() - ref64.double()).norm()):.3e} in {dtype} + floor); "
                          f"relative {rel_err(got, ref64):.3e}")


def assert_close_rescaled(got: torch.Tensor, ref64: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype,
                          factor: float = ERROR_FACTOR, name: str = "output", scale: float | None = None):
    """``got``, computed in ``dtype``, where plain PyTorch's error in ``dtype`` cannot be
    measured, but its error in another precision can (``baseline``, the same computation in
    ``baseline.dtype``, vs ``ref64``): to first order rounding error scales with the unit
    roundoff for the same algorithm, so it is estimated as that error times
    u(dtype) / u(baseline.dtype)."""
    ratio = unit_roundoff(dtype) / unit_roundoff(baseline.dtype)
    assert_close(got, ref64, baseline, dtype, scale=scale, factor=factor * ratio, name=name)


def assert_close_float64(got: torch.Tensor, ref64: torch.Tensor, baseline32: torch.Tensor,
                         factor: float = ERROR_FACTOR, name: str = "output", scale: float | None = None):
    """Two float64 computations, ``got`` and ``ref64``, with nothing more precise to measure
    either against: plain PyTorch's float64 error is its float32 error (``baseline32``, the
    same computation in float32, vs ``ref64``) rescaled (see assert_close_rescaled); ``got``
    may differ from ``ref64`` by ``factor`` such errors (both carry one) plus the float64
    floor. A float64 path that silently computes in float32 is off by ~5e8 times that."""
    assert got.dtype == ref64.dtype == torch.float64, f"{name}: expected float64, got {got.dtype}"
    assert_close_rescaled(got, ref64, baseline32, torch.float64, factor=factor, name=name, scale=scale)


def poisoned(*shape, dtype=torch.float32, device="cpu", like: torch.Tensor | None = None) -> torch.Tensor:
    """A NaN-filled buffer: any element a kernel fails to write shows up as NaN."""
    if like is not None:
        return torch.full_like(like, float("nan"))
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


# ---- an op and its gradients, three ways ---------------------------------------------------------
def _flat(inputs) -> list:
    return [t for i in inputs for t in (i if isinstance(i, (list, tuple)) else [i]) if t is not None]


def _cast_inputs(inputs, dtype: torch.dtype | None):
    """Fresh leaves holding the same values (exactly: a cast up, or no cast), keeping requires_grad."""
    def cast(t):
        if t is None or not t.is_floating_point():
            return t
        return t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)
    return [[cast(t) for t in i] if isinstance(i, (list, tuple)) else cast(i) for i in inputs]


def _run(fn, inputs, grad_out: torch.Tensor | None):
    """fn(*inputs) and the gradients of the inputs that require grad, for the upstream grad_out."""
    out = fn(*inputs)
    leaves = [t for t in _flat(inputs) if t.requires_grad]
    if grad_out is None or not leaves:
        return out, []
    return out, list(torch.autograd.grad(out, leaves, grad_out.to(out.dtype)))


def check_op(fast: Callable, reference: Callable, inputs: Sequence, *, baseline: Callable | None = None,
             dtype: torch.dtype | None = None, grads: bool = True, factor: float = ERROR_FACTOR,
             name: str = "output") -> torch.Tensor:
    """``fast(*inputs)`` and the gradients of every input that requires grad, each against
    ``reference`` run on float64 copies, bound by ``baseline`` (default: ``reference``) run
    on the inputs as they are: plain PyTorch in the inputs' own dtype. Inputs may be
    tensors, None, or lists of tensors. Returns the fast output."""
    leaves = _flat(inputs)
    dtype = dtype or next(t.dtype for t in leaves if t.is_floating_point())
    ref_in, base_in = _cast_inputs(inputs, torch.float64), _cast_inputs(inputs, None)
    ref = reference(*ref_in)
    # one upstream gradient, representable in dtype, for all three runs
    grad_out = torch.randn(ref.shape, dtype=torch.float64).to(dtype) if grads else None
    out, got = _run(fast, inputs, grad_out)
    ref_grads = _run(lambda *a: ref, ref_in, grad_out)[1] if grads else []
    base, base_grads = _run(baseline or reference, base_in, grad_out)
    assert out.dtype == base.dtype, f"{name}: dtype {out.dtype}, plain PyTorch gives {base.dtype}"
    assert_close(out, ref, base, dtype, factor=factor, name=name)
    for i, (g, r, b) in enumerate(zip(got, ref_grads, base_grads)):
        assert g.dtype == b.dtype, f"{name}: gradient {i} dtype {g.dtype} != {b.dtype}"
        assert_close(g, r, b, dtype, factor=factor, name=f"{name}: gradient {i}")
    return out


def lm_head_benchmark_smoke(script: str, out) -> dict:
    """Run an LM-head benchmark (bench_linear_cross_entropy / bench_linear_logprob) with
    --smoke into `out`; its payload, after checking both methods were timed."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, f"benchmarks/{script}", "--smoke", "--out", str(out)], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    payload = json.loads(Path(out).read_text())
    assert {r["method"] for r in payload["rows"]} == {"naive", "fastvlm"}
    assert all(r["seconds"] > 0 for r in payload["rows"])
    return payload

