"""What every numerical test shares: one error metric, one tolerance rule, one
poisoned allocator. (The seed fixture lives in conftest.py; random layouts in
tests/layouts.py.)

The tolerance rule (flash-attn's ``attention_ref(upcast=False)`` rule): a fast
path computing in dtype T may be off from the float64 reference by at most a
small multiple of what plain PyTorch computing in the same dtype T is off by on
the same inputs, plus a floor of a few units of T's roundoff times the output's
scale. The floor covers outputs that are ~0 (a single-key softmax has a zero
gradient) and baselines that happen to round exactly. No constant is guessed:
both terms scale with the dtype and the data, so a new seed cannot break it.
"""
from __future__ import annotations

import torch

# How many times plain PyTorch's own error a fast path may have: fused kernels
# sum in other orders and round intermediates differently, which costs a few x.
ERROR_FACTOR = 4.0
# Floor, in units of the dtype's unit roundoff times the output's scale.
FLOOR_ULPS = 16.0


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖₂ / ‖want‖₂ in float64; non-finite values fail (a poisoned output left unwritten)."""
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), "non-finite values (an output left unwritten?)"
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def error_bound(baseline: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, scale: float | None = None,
                factor: float = ERROR_FACTOR) -> float:
    """The largest ‖got − ref64‖₂ a fast path in `dtype` may have, given `baseline`, the
    plain-PyTorch result in the same dtype on the same inputs. `scale` is the magnitude
    the floor is relative to (default ‖ref64‖₂; pass the norm of a comparable nonzero
    quantity when ref64 itself is ~0)."""
    ref64 = ref64.double()
    base_err = float((baseline.double() - ref64).norm())
    scale = float(ref64.norm()) if scale is None else scale
    return factor * base_err + FLOOR_ULPS * unit_roundoff(dtype) * scale


def assert_close(got: torch.Tensor, ref64: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype | None = None,
                 scale: float | None = None, factor: float = ERROR_FACTOR, name: str = "output"):
    """``got`` (fast path) within ``error_bound`` of the float64 reference ``ref64``."""
    dtype = dtype or got.dtype
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an output left unwritten?)"
    err = float((got.double() - ref64.double()).norm())
    bound = error_bound(baseline, ref64, dtype, scale, factor)
    assert err <= bound, (f"{name}: error {err:.3e} > bound {bound:.3e} ({factor}x plain PyTorch's "
                          f"{float((baseline.double() - ref64.double()).norm()):.3e} in {dtype} + floor); "
                          f"relative {rel_err(got, ref64):.3e}")


def poisoned(*shape, dtype=torch.float32, device="cpu", like: torch.Tensor | None = None) -> torch.Tensor:
    """A NaN-filled buffer: any element a kernel fails to write shows up as NaN."""
    if like is not None:
        return torch.full_like(like, float("nan"))
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
