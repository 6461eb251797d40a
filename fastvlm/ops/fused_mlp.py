"""fused_linear_act and fused_mlp: the connector's GEMM + bias + activation.

    fused_linear_act(x, w, b, activation)      = act(x W^T + b)
    fused_mlp(x, w1, b1, w2, b2, activation)   = act(x W1^T + b1) W2^T + b2

x is [..., K] (leading dims kept), w/w1 is [N, K] as in nn.Linear, biases may
be None. activation is one of ACTIVATIONS. Multi-level input: x may be a list
of tensors [..., K_i] with the same leading dims, and w/w1 either one [N, sum K_i]
weight (concat -> Linear) or a list of [N, K_i] weights (sum of per-input
Linears); the fast path never builds the concatenation. ``reduce`` applies a
2x2 token reduction (fastvlm.ops.token_reduction) to every input first; inputs
are then [B, H*W, C] and the output is [B, H*W/4, N].

Memory kept for backward by the Triton path: the inputs, the weights and the
pre-activation (M x N); with ``recompute=True`` only inputs and weights (under
``reduce="avg_pool"`` the pooled tokens instead of the inputs: 4x fewer bytes),
and backward recomputes the pre-activation with one more GEMM. fused_mlp never
keeps the activation itself (eager keeps both the pre-activation and it).

Backends: ``reference`` (plain torch, any dtype), ``triton`` (fastvlm.kernels.
fused_linear; CPU only under TRITON_INTERPRET=1) and, for fused_mlp with
gelu_tanh, ``cublaslt`` (csrc/connector: GELU_AUX_BIAS forward, DGELU_BGRAD
backward). ``auto`` takes triton on CUDA, the reference elsewhere; where the cuBLASLt path
can serve a fused_mlp call too, the first call of each shape times both (forward
+ backward on detached views) and the faster one serves that shape from then
on (FASTVLM_AUTOTUNE=0: always triton).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from fastvlm import _ext
from fastvlm.ops.backend import can_measure, fastest_backend, register_op, resolve_backend
from fastvlm.ops.token_reduction import check_reduce, reduce_tokens

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "silu")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_serves(device: torch.device):
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return True if os.environ.get("TRITON_INTERPRET") == "1" else \
            "CPU tensors run Triton only under TRITON_INTERPRET=1 (tests)"
    return f"no Triton backend for {device.type}"


def _cublaslt_serves(device: torch.device):
    if device.type != "cuda":
        return "cuBLASLt runs on CUDA devices only"
    return True if _ext.cublaslt_built() else "fastvlm._C was built without CUDA or without cuBLASLt"


register_op("fused_linear_act", {"reference": lambda device: True, "triton": _triton_serves},
            {"cpu": ("reference",), "cuda": ("triton", "reference")})
# cublaslt: gelu_tanh only (cuBLASLt's GELU epilogues are the tanh form), one input, no
# token reduction, both biases, float16/bfloat16, hidden width a multiple of 8 (see
# cublaslt_limitation); never picked by "auto" until it has been benchmarked on a GPU.
register_op("fused_mlp", {"reference": lambda device: True, "triton": _triton_serves,
                          "cublaslt": _cublaslt_serves},
            {"cpu": ("reference",), "cuda": ("triton", "reference")})


def activation_reference(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "quick_gelu":
        return z * torch.sigmoid(1.702 * z)
    if activation == "silu":
        return F.silu(z)
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def fused_linear_act_reference(x, w, b, activation, *, reduce=None, grid=None):
    """The reference: materialises the reduced tokens and the concatenation."""
    xs = x if isinstance(x, (list, tuple)) else [x]
    if reduce is not None:
        xs = [reduce_tokens(xi, reduce, grid) for xi in xs]
    w = torch.cat(list(w), 1) if isinstance(w, (list, tuple)) else w
    x = xs[0] if len(xs) == 1 else torch.cat(xs, -1)
    return activation_reference(F.linear(x, w, b), activation)


def fused_mlp_reference(x, w1, b1, w2, b2, activation, *, reduce=None, grid=None):
    return F.linear(fused_linear_act_reference(x, w1, b1, activation, reduce=reduce, grid=grid), w2, b2)


def _autocast(*args):
    """Under autocast, run in its dtype like nn.Linear does (grads flow back through the cast).
    Each arg is a tensor, None, or a list of tensors; anything else is left for the checks."""
    flat = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])]
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    if not tensors or not torch.is_autocast_enabled(tensors[0].device.type):
        return args
    dtype = torch.get_autocast_dtype(tensors[0].device.type)

    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return tuple([cast(t) for t in a] if isinstance(a, (list, tuple)) else cast(a) for a in args)


def _check_tensor(name, t, *, dims=None):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating dtype, got {t.dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name}: expected {dims} dims, got shape {tuple(t.shape)}")


def _check_inputs(xs, reduce, grid):
    if not xs:
        raise ValueError("x: expected a tensor or a non-empty list of tensors")
    for i, x in enumerate(xs):
        name = "x" if len(xs) == 1 else f"x[{i}]"
        _check_tensor(name, x)
        if x.dim() < 2:
            raise ValueError(f"{name}: expected [..., K] with a leading (token) dim, got shape "
                             f"{tuple(x.shape)}; use x[None] for a single row")
        if x.shape[-1] == 0:
            raise ValueError(f"{name}: has zero features")
        if x.shape[:-1] != xs[0].shape[:-1]:
            raise ValueError(f"{name}: leading dims {tuple(x.shape[:-1])} differ from x[0]'s "
                             f"{tuple(xs[0].shape[:-1])}")
        if x.dtype != xs[0].dtype or x.device != xs[0].device:
            raise ValueError(f"{name}: dtype/device must match x[0] ({xs[0].dtype}, {xs[0].device})")
    return check_reduce(reduce, xs[0], grid)


def _split_weight(name, w, widths, x):
    """w as one [N, K_i] weight per input: the list as given, or column views of one weight."""
    ws = list(w) if isinstance(w, (list, tuple)) else [w]
    for i, wi in enumerate(ws):
        _check_tensor(name if len(ws) == 1 else f"{name}[{i}]", wi, dims=2)
        if wi.dtype != x.dtype:
            raise ValueError(f"{name}: dtype {wi.dtype} must match x's {x.dtype}")
        if wi.device != x.device:
            raise ValueError(f"{name}: on {wi.device}, x on {x.device}")
        if wi.shape[0] != ws[0].shape[0]:
            raise ValueError(f"{name}[{i}]: out-features {wi.shape[0]} differ from {ws[0].shape[0]}")
    if len(ws) == 1 and len(widths) > 1:
        if ws[0].shape[1] != sum(widths):
            raise ValueError(f"{name}: expects {ws[0].shape[1]} in-features, the inputs have "
                             f"{' + '.join(map(str, widths))} = {sum(widths)}")
        bounds = torch.tensor([0, *widths]).cumsum(0).tolist()
        return [ws[0][:, lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
    if len(ws) != len(widths):
        raise ValueError(f"{name}: {len(ws)} weights for {len(widths)} inputs")
    for i, (wi, k) in enumerate(zip(ws, widths)):
        if wi.shape[1] != k:
            label = name if len(ws) == 1 else f"{name}[{i}]"
            raise ValueError(f"{label}: expects {wi.shape[1]} in-features, x has {k}")
    return ws


def _check_bias(name, b, n, x):
    if b is None:
        return
    _check_tensor(name, b, dims=1)
    if b.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},), got {tuple(b.shape)}")
    if b.dtype != x.dtype or b.device != x.device:
        raise ValueError(f"{name}: dtype/device must match x ({x.dtype}, {x.device})")


def _prepare(x, w, b, activation, reduce, grid, w_name, b_name):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    xs = list(x) if isinstance(x, (list, tuple)) else [x]
    grid = _check_inputs(xs, reduce, grid)
    widths = [xi.shape[-1] * (4 if reduce == "pixel_shuffle" else 1) for xi in xs]
    ws = _split_weight(w_name, w, widths, xs[0])
    _check_bias(b_name, b, ws[0].shape[0], xs[0])
    return xs, ws, grid


def _pick_backend(op, backend, x):
    if backend == "auto" and x.dtype not in TRITON_DTYPES:
        return "reference"
    chosen = resolve_backend(op, backend, x.device)
    if chosen == "triton" and x.dtype not in TRITON_DTYPES:
        raise ValueError(f"x: backend='triton' takes float16/bfloat16/float32, got {x.dtype}")
    return chosen


def cublaslt_limitation(xs, ws, b1, b2, activation, reduce) -> str | None:
    """Why the cuBLASLt path cannot compute this fused_mlp call (None if it can)."""
    if activation != "gelu_tanh":
        return f"activation: cuBLASLt's GELU epilogue is gelu_tanh, got {activation!r}"
    if len(xs) != 1 or reduce is not None:
        return "x: cuBLASLt path takes one input without token reduction"
    if b1 is None or b2 is None:
        return "b1, b2: cuBLASLt path needs both biases"
    if xs[0].dtype not in (torch.float16, torch.bfloat16):
        return f"x: cuBLASLt path takes float16/bfloat16, got {xs[0].dtype}"
    if ws[0].shape[0] % 8:
        return f"w1: cuBLASLt needs a hidden width that is a multiple of 8, got {ws[0].shape[0]}"
    return None


class _CublasLtMLP(torch.autograd.Function):
    """gelu_tanh MLP on cuBLASLt: GELU_AUX_BIAS forward writes the activation and the
    pre-activation in one GEMM, DGELU_BGRAD backward gives the hidden gradient and b1's
    gradient in one GEMM. Keeps the pre-activation, or (recompute) nothing: backward
    then reruns the GELU_AUX_BIAS GEMM, which returns the activation W2's gradient
    needs as well."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, recompute: bool):
        hidden, pre = _ext.cublaslt_linear_gelu(x, w1, b1)
        ctx.recompute = recompute
        ctx.save_for_backward(x, w1, b1 if recompute else pre, w2)
        return torch.addmm(b2, hidden, w2.t())

    @staticmethod
    def backward(ctx, dy):
        x, w1, kept, w2 = ctx.saved_tensors
        dy = dy.contiguous()
        if ctx.recompute:
            hidden, pre = _ext.cublaslt_linear_gelu(x, w1, kept)
        else:  # W2's gradient needs the activation, rebuilt elementwise rather than kept from forward
            pre, hidden = kept, None
        dz, db1 = _ext.cublaslt_dgelu_bgrad(dy, w2, pre)
        need_x, need_w1, _, need_w2, need_b2, _ = ctx.needs_input_grad
        if need_w2 and hidden is None:
            hidden = F.gelu(pre, approximate="tanh")
        return (dz @ w1 if need_x else None, dz.t() @ x if need_w1 else None, db1,
                dy.t() @ hidden if need_w2 else None, dy.sum(0) if need_b2 else None, None)


def _trial(backend, xs, w1, b1, w2, b2, activation, recompute):
    """Forward + backward of fused_mlp on detached copies (no effect on the caller's graph)."""
    def run():
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in (xs[0], w1, b1, w2, b2)]
            fused_mlp(*leaves, activation, recompute=recompute, backend=backend).sum().backward()
    return run


def _auto_mlp_backend(xs, ws, b1, w2, b2, activation, reduce, recompute) -> str:
    """triton, or cublaslt where it can serve the call and was measured faster for the
    shape (measured only in training calls, where the backward is what gets timed)."""
    x = xs[0]
    if (not torch.is_grad_enabled() or not can_measure(x.device) or _cublaslt_serves(x.device) is not True
            or cublaslt_limitation(xs, ws, b1, b2, activation, reduce) is not None):
        return "triton"
    m = x.numel() // x.shape[-1]
    key = ("fused_mlp", 1 << max(m - 1, 0).bit_length(), x.shape[-1], ws[0].shape[0], w2.shape[0], x.dtype, x.device,
           bool(recompute))
    runners = {name: _trial(name, xs, ws[0], b1, w2, b2, activation, recompute) for name in ("triton", "cublaslt")}
    return fastest_backend(key, runners, x.device)


def _kernel_inputs(xs, reduce):
    """2-D views of the inputs (3-D [B, T, C] under a token reduction) and the output's leading dims."""
    if reduce is not None:
        return list(xs), (xs[0].shape[0], xs[0].shape[1] // 4)
    lead = xs[0].shape[:-1]
    return [xi.reshape(-1, xi.shape[-1]) for xi in xs], lead


def fused_linear_act(x, w, b, activation: str = "gelu", *, reduce: str | None = None,
                     grid: tuple[int, int] | None = None, recompute: bool = False,
                     backend: str = "auto") -> torch.Tensor:
    """act(x W^T + b) with the bias and activation in the GEMM's epilogue."""
    x, w, b = _autocast(x, w, b)
    xs, ws, grid = _prepare(x, w, b, activation, reduce, grid, "w", "b")
    if _pick_backend("fused_linear_act", backend, xs[0]) == "reference":
        return fused_linear_act_reference(xs, ws, b, activation, reduce=reduce, grid=grid)
    from fastvlm.kernels.fused_linear import ACTIVATIONS as IDS, FirstLayer, FusedLinearActFunction

    flat, lead = _kernel_inputs(xs, reduce)
    spec = FirstLayer(len(xs), IDS[activation], reduce, grid, bool(recompute))
    out = FusedLinearActFunction.apply(spec, b, *flat, *ws)
    return out.view(*lead, out.shape[-1])


def fused_mlp(x, w1, b1, w2, b2, activation: str = "gelu", *, reduce: str | None = None,
              grid: tuple[int, int] | None = None, recompute: bool = False,
              backend: str = "auto") -> torch.Tensor:
    """act(x W1^T + b1) W2^T + b2; backward recomputes the activation from the
    kept pre-activation (or, with recompute, the pre-activation from x)."""
    x, w1, b1, w2, b2 = _autocast(x, w1, b1, w2, b2)
    xs, ws, grid = _prepare(x, w1, b1, activation, reduce, grid, "w1", "b1")
    _check_tensor("w2", w2, dims=2)
    if w2.shape[1] != ws[0].shape[0]:
        raise ValueError(f"w2: expects {w2.shape[1]} in-features, the hidden layer has {ws[0].shape[0]}")
    if w2.dtype != xs[0].dtype or w2.device != xs[0].device:
        raise ValueError(f"w2: dtype/device must match x ({xs[0].dtype}, {xs[0].device})")
    _check_bias("b2", b2, w2.shape[0], xs[0])
    chosen = _pick_backend("fused_mlp", backend, xs[0])
    if backend == "auto" and chosen == "triton":
        chosen = _auto_mlp_backend(xs, ws, b1, w2, b2, activation, reduce, recompute)
    if chosen == "reference":
        return fused_mlp_reference(xs, ws, b1, w2, b2, activation, reduce=reduce, grid=grid)
    if chosen == "cublaslt":
        reason = cublaslt_limitation(xs, ws, b1, b2, activation, reduce)
        if reason is not None:
            raise ValueError(reason)
        x2d = xs[0].reshape(-1, xs[0].shape[-1])
        out = _CublasLtMLP.apply(x2d, ws[0], b1, w2, b2, bool(recompute))
        return out.view(*xs[0].shape[:-1], out.shape[-1])
    from fastvlm.kernels.fused_linear import ACTIVATIONS as IDS, FirstLayer, FusedMLPFunction

    flat, lead = _kernel_inputs(xs, reduce)
    spec = FirstLayer(len(xs), IDS[activation], reduce, grid, bool(recompute))
    out = FusedMLPFunction.apply(spec, b1, w2, b2, *flat, *ws)
    return out.view(*lead, out.shape[-1])
