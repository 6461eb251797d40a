"""lora_linear: y = x Wᵀ + b + s·(x Aᵀ) Bᵀ, a frozen linear layer plus a rank-r adapter.

x: [..., K], W: [N, K] (frozen), b: [N] or None, A: [r, K], B: [N, r], s a float.
Gradients flow to x, A and B. The ``triton`` backend (fastvlm.kernels.lora_linear)
reads x once for both branches; it serves frozen W and b (LoRA training) in fp16,
bf16 or fp32, and computes in the autocast dtype when autocast is on, as the
reference's F.linear calls would. ``auto`` uses it on CUDA when it applies. The
``cpu`` backend (``auto`` on CPU tensors, frozen W and b, any float dtype) is the same
contract in torch GEMMs: the adapter's GEMM accumulates into the base GEMM's output
and its scale is applied to rank-r products, so the reference's three element-wise
passes over the [tokens, out] result (scale, add, and the add's temporary) are gone.
Each path runs as torch.library custom ops (``fastvlm::lora_linear_fwd`` / ``_bwd``,
``fastvlm::lora_linear_cpu_fwd`` / ``_bwd``) with fake and autograd registrations, so
torch.compile(fullgraph=True) traces them and selective checkpointing can keep their
outputs (fastvlm.nn.checkpointing).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvlm.ops import backend as dispatch
from fastvlm.ops.backend import register_op, resolve_backend

FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_FUSED_RANK = 128  # the kernels' rank tiles fit shared memory up to here (see the kernel tests)


_kernels, _kernel_import_error = dispatch.import_kernels("lora_linear")


def _cpu_serves(device: torch.device):
    return True if device.type == "cpu" else f"it runs on CPU tensors only, not {device.type!r}"


register_op("lora_linear", {"reference": dispatch.always,
                            "triton": dispatch.triton_serves(_kernels, _kernel_import_error),
                            "cpu": _cpu_serves},
            {"cpu": ("cpu", "reference"), "cuda": ("triton", "reference")},
            {"triton": ("fastvlm::lora_linear_fwd", "fastvlm::lora_linear_bwd"),
             "cpu": ("fastvlm::lora_linear_cpu_fwd", "fastvlm::lora_linear_cpu_bwd")})


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


def _why_not_fused(x, weight, bias, rank: int, path: str = "triton") -> str | None:
    if x.numel() == 0:
        return "the input is empty"
    if path == "triton" and rank > MAX_FUSED_RANK:
        return f"it serves ranks up to {MAX_FUSED_RANK}, got {rank}"
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return "it serves frozen weight and bias only (LoRA training)"
    if path == "triton" and _compute_dtype(x) not in FUSED_DTYPES:
        return f"it computes in fp16, bf16 or fp32, not {_compute_dtype(x)}"
    return None


class _TorchKernels:
    """The CPU path's two "kernels" in torch, the Triton kernels' contract: the adapter's
    scale is applied to the rank-r products and its GEMM accumulates into the base GEMM's
    output in place, so no [tokens, out] temporary is written, scaled or added (on a CPU
    those element-wise passes over the output cost more than the adapter's GEMMs)."""

    @staticmethod
    def lora_forward(x, weight, bias, lora_A, lora_B, scaling, write_u):
        u = x @ lora_A.t()
        y = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
        y.addmm_(u, lora_B.t(), alpha=scaling)
        return y, u if write_u else None

    @staticmethod
    def lora_backward_dx(gy, weight, lora_A, lora_B, scaling):
        du = (gy @ lora_B).mul_(scaling)
        dx = gy @ weight
        return dx.addmm_(du, lora_A), du


# ---- the Triton and CPU paths as custom ops (x, W, A, B already 2-D, contiguous, in the compute
# dtype); both share the fake and autograd registrations below
def _fwd_impl(kernels):
    def fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
            lora_B: torch.Tensor, scaling: float, write_u: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, u = x Aᵀ when B's gradient needs it, else an empty tensor)."""
        y, u = kernels.lora_forward(x, weight, bias, lora_A, lora_B, scaling, write_u=write_u)
        return y, x.new_empty(0) if u is None else u
    return fwd


def _bwd_impl(kernels):
    def bwd(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
            u: torch.Tensor, scaling: float, needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Grads of (x, A, B), empty where `needs` says not needed. One kernel gives dx and
        du = s·gy B; dA = duᵀ x and dB = s·gyᵀ u are rank-r GEMMs."""
        g = gy.contiguous()
        dx, du = kernels.lora_backward_dx(g, weight, lora_A, lora_B, scaling)
        need_x, need_a, need_b = needs
        grads = (dx if need_x else None, du.t() @ x if need_a else None, (g.t() @ u) * scaling if need_b else None)
        return tuple(dispatch.empty_if_none(grads, gy))
    return bwd


def _fwd_fake(x, weight, bias, lora_A, lora_B, scaling, write_u):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty((x.shape[0], lora_A.shape[0]) if write_u else 0)


def _bwd_fake(gy, x, weight, lora_A, lora_B, u, scaling, needs):
    return tuple(gy.new_empty(t.shape if need else (0,)) for t, need in zip((x, lora_A, lora_B), needs))


def _lora_setup(ctx, inputs, output):
    x, weight, _, lora_A, lora_B, scaling, _ = inputs
    ctx.scaling = scaling
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1])


def _register(name: str, kernels):
    """fastvlm::<name>_fwd / _bwd: the custom ops of one path, with fake and autograd registrations."""
    fwd = torch.library.custom_op(f"fastvlm::{name}_fwd", _fwd_impl(kernels), mutates_args=())
    bwd = torch.library.custom_op(f"fastvlm::{name}_bwd", _bwd_impl(kernels), mutates_args=())
    fwd.register_fake(_fwd_fake)
    bwd.register_fake(_bwd_fake)

    def backward(ctx, gy, _du):
        needs = [ctx.needs_input_grad[i] for i in (0, 3, 4)]
        grad_x, grad_a, grad_b = dispatch.none_if_unneeded(bwd(gy, *ctx.saved_tensors, ctx.scaling, needs), needs)
        return grad_x, None, None, grad_a, grad_b, None, None

    fwd.register_autograd(backward, setup_context=_lora_setup)
    return fwd


_OPS = {"triton": _register("lora_linear", _kernels), "cpu": _register("lora_linear_cpu", _TorchKernels)}


def _fused_lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, path: str = "triton") -> torch.Tensor:
    """The Triton or CPU path: casts to the compute dtype (autocast's, else x's) and flattens x to
    2-D outside the op, so autograd casts the gradients back (fp32 adapter masters stay fp32)."""
    dt = _compute_dtype(x)
    x2 = x.reshape(-1, x.shape[-1]).to(dt).contiguous()
    w, a, b = (t.to(dt).contiguous() for t in (weight, lora_A, lora_B))
    write_u = torch.is_grad_enabled() and lora_B.requires_grad
    y, _ = _OPS[path](x2, w, None if bias is None else bias.to(dt), a, b, scaling, write_u)
    return y.reshape(*x.shape[:-1], w.shape[0])


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, *, backend: str = "auto") -> torch.Tensor:
    check_lora_inputs(x, weight, bias, lora_A, lora_B)
    name = resolve_backend("lora_linear", backend, x.device)
    if name in _OPS:
        reason = _why_not_fused(x, weight, bias, lora_A.shape[0], name)
        if reason is None:
            return _fused_lora_linear(x, weight, bias, lora_A, lora_B, float(scaling), name)
        if backend == name:
            raise ValueError(f"backend: {name!r} cannot serve this call: {reason}")
    return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling)
