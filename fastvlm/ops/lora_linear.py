"""lora_linear: y = x Wᵀ + b + s·(x Aᵀ) Bᵀ, a frozen linear layer plus a rank-r adapter.

x: [..., K], W: [N, K] (frozen), b: [N] or None, A: [r, K], B: [N, r], s a float.
Gradients flow to x, A and B. The ``triton`` backend (fastvlm.kernels.lora) reads
x once for both branches; it serves frozen W and b (LoRA training) in fp16,
bf16 or fp32, and computes in the autocast dtype when autocast is on, as the
reference's F.linear calls would. ``auto`` uses it on CUDA when it applies.
"""
from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from fastvlm.ops.backend import register_op, resolve_backend

FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_FUSED_RANK = 128  # the kernels' rank tiles fit shared memory up to here (see the kernel tests)


def _triton_available(device: torch.device):
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter)"


register_op("lora_linear", {"reference": lambda device: True, "triton": _triton_available},
            {"cpu": ("reference",), "cuda": ("triton", "reference")})


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


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _why_not_fused(x, weight, bias, rank: int) -> str | None:
    if x.numel() == 0:
        return "the input is empty"
    if rank > MAX_FUSED_RANK:
        return f"it serves ranks up to {MAX_FUSED_RANK}, got {rank}"
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return "it serves frozen weight and bias only (LoRA training)"
    if _compute_dtype(x) not in FUSED_DTYPES:
        return f"it computes in fp16, bf16 or fp32, not {_compute_dtype(x)}"
    return None


class _FusedLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        from fastvlm.kernels.lora import lora_forward

        dt = _compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).to(dt).contiguous()
        w, a, b = (t.to(dt).contiguous() for t in (weight, lora_A, lora_B))
        need_u = ctx.needs_input_grad[4]
        y, u = lora_forward(x2, w, None if bias is None else bias.to(dt), a, b, scaling, write_u=need_u)
        ctx.save_for_backward(x2, w, a, b, u)
        ctx.scaling, ctx.x_shape, ctx.x_dtype = scaling, x.shape, x.dtype
        ctx.ab_dtypes = (lora_A.dtype, lora_B.dtype)
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, gy):
        from fastvlm.kernels.lora import lora_backward_dx

        x2, w, a, b, u = ctx.saved_tensors
        g = gy.reshape(-1, w.shape[0]).to(w.dtype).contiguous()
        dx, du = lora_backward_dx(g, w, a, b, ctx.scaling)
        grad_a = (du.t() @ x2).to(ctx.ab_dtypes[0]) if ctx.needs_input_grad[3] else None
        grad_b = ((g.t() @ u) * ctx.scaling).to(ctx.ab_dtypes[1]) if ctx.needs_input_grad[4] else None
        grad_x = dx.reshape(ctx.x_shape).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, grad_a, grad_b, None


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, *, backend: str = "auto") -> torch.Tensor:
    check_lora_inputs(x, weight, bias, lora_A, lora_B)
    name = resolve_backend("lora_linear", backend, x.device)
    if name == "triton":
        reason = _why_not_fused(x, weight, bias, lora_A.shape[0])
        if reason is None:
            return _FusedLoRALinear.apply(x, weight, bias, lora_A, lora_B, float(scaling))
        if backend == "triton":
            raise ValueError(f"backend: 'triton' cannot serve this call: {reason}")
    return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling)
