"""lora_linear: y = x Wᵀ + b + s·(x Aᵀ) Bᵀ, a frozen linear layer plus a rank-r adapter.

x: [..., K], W: [N, K] (frozen), b: [N] or None, A: [r, K], B: [N, r], s a float.
Gradients flow to x, A and B. The ``triton`` backend (fastvlm.kernels.lora_linear)
reads x once for both branches; it serves frozen W and b (LoRA training) in fp16,
bf16 or fp32, and computes in the autocast dtype when autocast is on, as the
reference's F.linear calls would. ``auto`` uses it on CUDA when it applies. It runs
as the torch.library custom ops ``fastvlm::lora_linear_fwd`` / ``_bwd`` with fake and
autograd registrations, so torch.compile(fullgraph=True) traces it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvlm.ops import backend as dispatch
from fastvlm.ops.backend import register_op, resolve_backend

FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_FUSED_RANK = 128  # the kernels' rank tiles fit shared memory up to here (see the kernel tests)


_kernels, _kernel_import_error = dispatch.import_kernels("lora_linear")


register_op("lora_linear", {"reference": dispatch.always,
                            "triton": dispatch.triton_serves(_kernels, _kernel_import_error)},
            {"cpu": ("reference",), "cuda": ("triton", "reference")},
            {"triton": ("fastvlm::lora_linear_fwd", "fastvlm::lora_linear_bwd")})


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


# ---- the Triton path as custom ops (x, W, A, B already 2-D, contiguous, in the compute dtype) ---
@torch.library.custom_op("fastvlm::lora_linear_fwd", mutates_args=())
def _lora_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
              lora_B: torch.Tensor, scaling: float, write_u: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, u = x Aᵀ when B's gradient needs it, else an empty tensor)."""
    y, u = _kernels.lora_forward(x, weight, bias, lora_A, lora_B, scaling, write_u=write_u)
    return y, x.new_empty(0) if u is None else u


@_lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, write_u):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty((x.shape[0], lora_A.shape[0]) if write_u else 0)


@torch.library.custom_op("fastvlm::lora_linear_bwd", mutates_args=())
def _lora_bwd(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
              u: torch.Tensor, scaling: float, needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grads of (x, A, B), empty where `needs` says not needed. One kernel gives dx and
    du = s·gy B; dA = duᵀ x and dB = s·gyᵀ u are rank-r GEMMs."""
    g = gy.contiguous()
    dx, du = _kernels.lora_backward_dx(g, weight, lora_A, lora_B, scaling)
    need_x, need_a, need_b = needs
    grads = (dx if need_x else None, du.t() @ x if need_a else None, (g.t() @ u) * scaling if need_b else None)
    return tuple(dispatch.empty_if_none(grads, gy))


@_lora_bwd.register_fake
def _(gy, x, weight, lora_A, lora_B, u, scaling, needs):
    return tuple(gy.new_empty(t.shape if need else (0,)) for t, need in zip((x, lora_A, lora_B), needs))


def _lora_setup(ctx, inputs, output):
    x, weight, _, lora_A, lora_B, scaling, _ = inputs
    ctx.scaling = scaling
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1])


def _lora_backward(ctx, gy, _du):
    needs = [ctx.needs_input_grad[i] for i in (0, 3, 4)]
    grad_x, grad_a, grad_b = dispatch.none_if_unneeded(
        torch.ops.fastvlm.lora_linear_bwd(gy, *ctx.saved_tensors, ctx.scaling, needs), needs)
    return grad_x, None, None, grad_a, grad_b, None, None


_lora_fwd.register_autograd(_lora_backward, setup_context=_lora_setup)


def _fused_lora_linear(x, weight, bias, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """The Triton path: casts to the compute dtype (autocast's, else x's) and flattens x to 2-D
    outside the op, so autograd casts the gradients back (fp32 adapter masters stay fp32)."""
    dt = _compute_dtype(x)
    x2 = x.reshape(-1, x.shape[-1]).to(dt).contiguous()
    w, a, b = (t.to(dt).contiguous() for t in (weight, lora_A, lora_B))
    write_u = torch.is_grad_enabled() and lora_B.requires_grad
    y, _ = torch.ops.fastvlm.lora_linear_fwd(x2, w, None if bias is None else bias.to(dt), a, b, scaling, write_u)
    return y.reshape(*x.shape[:-1], w.shape[0])


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, *, backend: str = "auto") -> torch.Tensor:
    check_lora_inputs(x, weight, bias, lora_A, lora_B)
    name = resolve_backend("lora_linear", backend, x.device)
    if name == "triton":
        reason = _why_not_fused(x, weight, bias, lora_A.shape[0])
        if reason is None:
            return _fused_lora_linear(x, weight, bias, lora_A, lora_B, float(scaling))
        if backend == "triton":
            raise ValueError(f"backend: 'triton' cannot serve this call: {reason}")
    return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling)
