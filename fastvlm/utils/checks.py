"""Argument checks shared across modules: each failure is a ValueError naming the argument."""
from __future__ import annotations

import operator

import torch


def as_int(value, arg: str, minimum: int | None = None) -> int:
    """`value` as a Python int. Ints, numpy integers and 0-d integer tensors are ints;
    bools and floats are refused, even integral ones (a length of 2.0 or True is a bug
    upstream, not a length)."""
    is_bool = isinstance(value, bool) or type(value).__name__ == "bool" or (
        isinstance(value, torch.Tensor) and value.dtype == torch.bool)
    try:
        if is_bool or (isinstance(value, torch.Tensor) and (value.dim() or value.is_floating_point())):
            raise TypeError
        result = operator.index(value)
    except TypeError:
        raise ValueError(f"{arg}: expected an int, got {value!r} ({type(value).__name__})") from None
    if minimum is not None and result < minimum:
        raise ValueError(f"{arg}: expected an int >= {minimum}, got {result}")
    return result


def check_finite(x: torch.Tensor, arg: str, hint: str) -> None:
    """Refuse NaN/inf where data enters the model, before it turns into a NaN loss with
    no trace of where it came from. One fp32-accumulated sum (NaN and inf survive it)
    and one host sync per call, at the model's input only, never per layer."""
    if not bool(torch.isfinite(x.sum(dtype=torch.promote_types(x.dtype, torch.float32)))):
        raise ValueError(f"{arg}: non-finite values; {hint}")
