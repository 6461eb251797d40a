"""lora_linear: y = x Wᵀ + b + s·(x Aᵀ) Bᵀ, a frozen linear layer plus a rank-r adapter.

x: [..., K], W: [N, K] (frozen), b: [N] or None, A: [r, K], B: [N, r], s a float.
Gradients flow to x, A and B (W and b are frozen, as in LoRA training).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvlm.ops._backend import register_op, resolve_backend

register_op("lora_linear", {"reference": lambda device: True},
            {"cpu": ("reference",), "cuda": ("reference",)})


def lora_delta(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The adapter branch s·(x Aᵀ) Bᵀ; outside autocast it computes in x's dtype."""
    if not torch.is_autocast_enabled(x.device.type):
        lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    return F.linear(F.linear(x, lora_A), lora_B) * scaling


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling: float) -> torch.Tensor:
    return F.linear(x, weight, bias) + lora_delta(x, lora_A, lora_B, scaling)


def check_lora_inputs(x, weight, bias, lora_A, lora_B):
    n, k = weight.shape
    r = lora_A.shape[0]
    if x.shape[-1] != k:
        raise ValueError(f"x: last dim {x.shape[-1]} != weight in_features {k}")
    if lora_A.shape != (r, k):
        raise ValueError(f"lora_A: expected [r, {k}], got {tuple(lora_A.shape)}")
    if lora_B.shape != (n, r):
        raise ValueError(f"lora_B: expected [{n}, {r}], got {tuple(lora_B.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias: expected [{n}], got {tuple(bias.shape)}")


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, *, backend: str = "auto") -> torch.Tensor:
    check_lora_inputs(x, weight, bias, lora_A, lora_B)
    resolve_backend("lora_linear", backend, x.device)
    return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling)
