"""fused_linear_act and fused_mlp: the connector's GEMM + bias + activation.

    fused_linear_act(x, w, b, activation)      = act(x W^T + b)
    fused_mlp(x, w1, b1, w2, b2, activation)   = act(x W1^T + b1) W2^T + b2

x is [..., K] (leading dims kept), w/w1 is [N, K] as in nn.Linear, biases may
be None. activation is a name of fastvlm.ops.activations.ACTIVATIONS. Multi-level input: x may be a list
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

Backends: ``reference`` (plain torch, any dtype), ``triton`` (the GEMM of
fastvlm.kernels.fused_mlp; CPU only under TRITON_INTERPRET=1) and, for fused_mlp
with gelu_tanh, ``cublaslt`` (csrc/connector: GELU_AUX_BIAS forward,
DGELU_BGRAD backward). ``auto`` takes triton on CUDA for float16/bfloat16/float32,
the reference elsewhere; in a training call that the cuBLASLt path can serve too
(see cublaslt_limitation), the first call of each shape times both (forward +
backward on detached inputs) and the faster serves that shape from then on
(FASTVLM_AUTOTUNE=0, torch.compile tracing, CUDA graph capture: always triton).

The Triton and cuBLASLt paths are torch.library custom ops (``fastvlm::fused_linear_act_fwd``
/ ``_bwd``, ``fastvlm::fused_mlp_fwd`` / ``_bwd``, ``fastvlm::cublaslt_mlp_fwd`` / ``_bwd``)
with fake and autograd registrations: torch.compile(fullgraph=True) traces them.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from fastvlm import _ext
from fastvlm.ops import backend as dispatch
from fastvlm.ops.activations import FUSED_ACTIVATIONS as ACTIVATIONS
from fastvlm.ops.activations import activation as act
from fastvlm.ops.backend import register_op, resolve_backend
from fastvlm.ops.token_reduction import check_reduce, reduce_tokens, reduce_tokens_backward

__all__ = ["ACTIVATIONS", "fused_linear_act", "fused_linear_act_reference", "fused_mlp", "fused_mlp_reference"]

_kernels, _kernel_import_error = dispatch.import_kernels("fused_mlp")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _cublaslt_serves(device: torch.device):
    if device.type != "cuda":
        return "cuBLASLt runs on CUDA devices only"
    return True if _ext.cublaslt_built() else "fastvlm._C was built without CUDA or without cuBLASLt"


_triton_serves = dispatch.triton_serves(_kernels, _kernel_import_error)
register_op("fused_linear_act", {"reference": dispatch.always, "triton": _triton_serves},
            {"cpu": ("reference",), "cuda": ("triton", "reference")},
            {"triton": ("fastvlm::fused_linear_act_fwd", "fastvlm::fused_linear_act_bwd")})
# cublaslt: gelu_tanh only (cuBLASLt's GELU epilogues are the tanh form), one input, no
# token reduction, both biases, float16/bfloat16, hidden width a multiple of 8 (see
# cublaslt_limitation); "auto" picks it over triton where it was measured faster.
register_op("fused_mlp", {"reference": dispatch.always, "triton": _triton_serves,
                          "cublaslt": _cublaslt_serves},
            {"cpu": ("reference",), "cuda": ("triton", "reference")},
            {"triton": ("fastvlm::fused_mlp_fwd", "fastvlm::fused_mlp_bwd"),
             "cublaslt": ("fastvlm::cublaslt_mlp_fwd", "fastvlm::cublaslt_mlp_bwd")})


# ---- the one reference ---------------------------------------------------------------------------
def activation_reference(z: torch.Tensor, activation: str) -> torch.Tensor:
    return act(activation, table=ACTIVATIONS).fn(z)


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


# ---- validation ----------------------------------------------------------------------------------
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
        bounds = [0, *itertools.accumulate(widths)]
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
    act(activation, table=ACTIVATIONS)
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


# ---- the Triton path: the first layer composed from GEMM launches ------------------------------
@dataclass(frozen=True)
class FirstLayer:
    """Static description of the first GEMM: sum_i x_i W_i^T + b, then activation code `act`.

    Each x_i is [M, K_i] or, with `reduce`, [B, T, C] read through the 2x2 token
    reduction over the (H, W) patch `grid`."""
    n_inputs: int
    act: int
    reduce: str | None = None
    grid: tuple[int, int] | None = None
    recompute: bool = False

    @classmethod
    def of(cls, n_inputs: int, act: int, reduce: str | None, grid_h: int, grid_w: int,
           recompute: bool) -> "FirstLayer":
        """From a custom op's arguments (grid 0 x 0 for none)."""
        return cls(n_inputs, act, reduce, (grid_h, grid_w) if grid_h else None, recompute)

    def rows(self, x) -> int:
        return x.shape[0] if self.reduce is None else x.shape[0] * x.shape[1] // 4

    def launch_args(self, x: torch.Tensor) -> dict:
        if self.reduce is None:
            return {}
        return dict(reduce=_kernels.REDUCE_IDS[self.reduce], grid_w=self.grid[1], tokens=x.shape[1])

    def pools_kept_inputs(self, training: bool) -> bool:
        """With recompute under avg_pool, backward keeps the pooled tokens: 4x fewer bytes than
        x, and all backward reads of it (the recomputed GEMM, W's gradient; x's gradient needs
        only its shape). Pooling them once costs one pass over x, which the fused read saved."""
        return training and self.recompute and self.reduce == "avg_pool"

    def gathered(self, x: torch.Tensor) -> torch.Tensor:
        """The GEMM input as a 2-D tensor (the reduced tokens are materialised here, for the
        kept inputs and the weight gradient only; the forward reads them in place)."""
        if self.reduce is None:
            return x
        r = reduce_tokens(x, self.reduce, self.grid)
        return r.reshape(-1, r.shape[-1])

    def input_grad(self, batch: int, d_gathered: torch.Tensor) -> torch.Tensor:
        """The gradient of an input with `batch` images, from that of its gathered rows."""
        if self.reduce is None:
            return d_gathered
        return reduce_tokens_backward(d_gathered.view(batch, -1, d_gathered.shape[-1]), self.reduce, self.grid)


def _first_layer_forward(spec: FirstLayer, xs, ws, bias, act: int, keep_pre: bool):
    """(act(z), z or None) for z = sum_i x_i W_i^T + b, in one launch."""
    m, n = spec.rows(xs[0]), ws[0].shape[0]
    out = _kernels.alloc(xs[0], m, n)
    pre = _kernels.alloc(xs[0], m, n) if keep_pre else None
    _kernels.launch(out, [_kernels.Operand(x, w.t()) for x, w in zip(xs, ws)], act=act, aux=pre, bias=bias,
                    **spec.launch_args(xs[0]))
    return out, pre


def _first_layer_backward(spec: FirstLayer, dz, gate, xs, ws, needs_x, needs_w, needs_b):
    """Grads of z = sum_i x_i W_i^T + b from dz = dL/dz, or, with `gate` (the kept
    pre-activation), from dz = dL/d act(z): act'(gate) is applied as dz is loaded. The
    inputs' grads are those of their gathered rows (FirstLayer.input_grad maps them back)."""
    gate_act = spec.act if gate is not None else 0
    d_rows = []
    for w, need in zip(ws, needs_x):
        d = None
        if need:
            d = _kernels.alloc(dz, dz.shape[0], w.shape[1])
            _kernels.launch(d, [_kernels.Operand(dz, w)], gate=gate, gate_act=gate_act)
        d_rows.append(d)
    db = _kernels.alloc(dz, dz.shape[1]) if needs_b else None
    dws = []
    for i, (x, w, need) in enumerate(zip(xs, ws, needs_w)):
        with_db = i == 0 and db is not None
        if not (need or with_db):
            dws.append(None)
            continue
        dw = _kernels.alloc(w, *w.shape)
        _kernels.launch(dw, [_kernels.Operand(dz.t(), spec.gathered(x))], gate=None if gate is None else gate.t(),
                        gate_act=gate_act, rowsum=db if with_db else None)
        dws.append(dw if need else None)
    return d_rows, dws, db


def _run_first_layer(xs, ws, bias, act, reduce, grid_h, grid_w, recompute, training):
    """The forward ops' first layer: (act(z), z or an empty tensor, the pooled kept inputs or [])."""
    spec = FirstLayer.of(len(xs), act, reduce, grid_h, grid_w, recompute)
    pooled = [spec.gathered(x) for x in xs] if spec.pools_kept_inputs(training) else []
    run = replace(spec, reduce=None, grid=None) if pooled else spec
    hidden, pre = _first_layer_forward(run, pooled or xs, ws, bias, act, keep_pre=training and not recompute)
    return hidden, hidden.new_empty(0) if pre is None else pre, pooled


def _fake_first_layer(xs, ws, act, reduce, grid_h, grid_w, recompute, training):
    spec = FirstLayer.of(len(xs), act, reduce, grid_h, grid_w, recompute)
    rows = spec.rows(xs[0])
    hidden = xs[0].new_empty(rows, ws[0].shape[0])
    pre = torch.empty_like(hidden) if training and not recompute else hidden.new_empty(0)
    pooled = [x.new_empty(rows, x.shape[-1]) for x in xs] if spec.pools_kept_inputs(training) else []
    return hidden, pre, pooled


def _recomputed_pre(xs, ws, bias, pre, act, reduce, grid_h, grid_w, recompute):
    """The backward ops' (run spec, pre-activation): kept from forward, or recomputed (one more GEMM)."""
    run = FirstLayer.of(len(xs), act, reduce, grid_h, grid_w, recompute)
    if recompute:
        pre, _ = _first_layer_forward(run, xs, ws, bias, act=0, keep_pre=False)
    return run, pre


def _fake_grads(ts, needs, like: torch.Tensor, shape=lambda t: t.shape) -> list[torch.Tensor]:
    return [like.new_empty(shape(t) if need else (0,)) for t, need in zip(ts, needs)]


def _setup_first_layer(ctx, xs, ws, bias, pooled, act, reduce, grid_h, grid_w, recompute, pre, *extra):
    """What the autograd formulas keep: the inputs the first layer ran on (the pooled tokens
    or xs), its weights and bias, the pre-activation (empty with recompute), `extra`."""
    ctx.spec = FirstLayer.of(len(xs), act, reduce, grid_h, grid_w, recompute)
    ctx.run = replace(ctx.spec, reduce=None, grid=None) if pooled else ctx.spec
    ctx.batches = [x.shape[0] for x in xs]
    ctx.save_for_backward(bias, pre, *extra, *(pooled or xs), *ws)


def _saved_first_layer(ctx, n_extra: int):
    bias, pre, *rest = ctx.saved_tensors
    n = ctx.spec.n_inputs
    extra, rest = rest[:n_extra], rest[n_extra:]
    run = ctx.run
    return bias, pre, extra, list(rest[:n]), list(rest[n:]), [run.reduce, *(run.grid or (0, 0)), run.recompute]


def _input_grads(ctx, d_rows, needs_x):
    return [ctx.spec.input_grad(b, d) if need else None for b, d, need in zip(ctx.batches, d_rows, needs_x)]


# fused_linear_act: act(sum_i x_i W_i^T + b); keeps the pre-activation (or nothing, with recompute)
@torch.library.custom_op("fastvlm::fused_linear_act_fwd", mutates_args=())
def _linear_act_fwd(xs: list[torch.Tensor], ws: list[torch.Tensor], bias: torch.Tensor | None, act: int,
                    reduce: str | None, grid_h: int, grid_w: int, recompute: bool, training: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(act(z), z when training without recompute else empty, pooled kept inputs or [])."""
    return _run_first_layer(xs, ws, bias, act, reduce, grid_h, grid_w, recompute, training)


@_linear_act_fwd.register_fake
def _(xs, ws, bias, act, reduce, grid_h, grid_w, recompute, training):
    return _fake_first_layer(xs, ws, act, reduce, grid_h, grid_w, recompute, training)


@torch.library.custom_op("fastvlm::fused_linear_act_bwd", mutates_args=())
def _linear_act_bwd(dy: torch.Tensor, xs: list[torch.Tensor], ws: list[torch.Tensor], bias: torch.Tensor | None,
                    pre: torch.Tensor, act: int, reduce: str | None, grid_h: int, grid_w: int, recompute: bool,
                    needs_x: list[bool], needs_w: list[bool], needs_b: bool
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(grads of the inputs' gathered rows, of the weights, of the bias); empty where not needed."""
    run, pre = _recomputed_pre(xs, ws, bias, pre, act, reduce, grid_h, grid_w, recompute)
    d_rows, dws, db = _first_layer_backward(run, dy, pre, xs, ws, needs_x, needs_w, needs_b)
    return dispatch.empty_if_none(d_rows, dy), dispatch.empty_if_none(dws, dy), dispatch.empty_if_none([db], dy)[0]


@_linear_act_bwd.register_fake
def _(dy, xs, ws, bias, pre, act, reduce, grid_h, grid_w, recompute, needs_x, needs_w, needs_b):
    rows = FirstLayer.of(len(xs), act, reduce, grid_h, grid_w, recompute).rows(xs[0])
    return (_fake_grads(ws, needs_x, dy, lambda w: (rows, w.shape[1])), _fake_grads(ws, needs_w, dy),
            dy.new_empty(dy.shape[1] if needs_b else 0))


def _linear_act_setup(ctx, inputs, output):
    xs, ws, bias, act, reduce, grid_h, grid_w, recompute, _ = inputs
    _setup_first_layer(ctx, xs, ws, bias, output[2], act, reduce, grid_h, grid_w, recompute, output[1])


def _linear_act_backward(ctx, dy, _dpre, _dpooled):
    bias, pre, _, xs, ws, run_args = _saved_first_layer(ctx, 0)
    needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
    d_rows, dws, db = torch.ops.fastvlm.fused_linear_act_bwd(dy, xs, ws, bias, pre, ctx.spec.act, *run_args,
                                                             needs_x, needs_w, needs_b)
    return (_input_grads(ctx, d_rows, needs_x), dispatch.none_if_unneeded(dws, needs_w), db if needs_b else None,
            None, None, None, None, None, None)


_linear_act_fwd.register_autograd(_linear_act_backward, setup_context=_linear_act_setup)


# fused_mlp: act(sum_i x_i W1_i^T + b1) W2^T + b2; keeps the hidden pre-activation (or nothing,
# with recompute), never the activation itself
@torch.library.custom_op("fastvlm::fused_mlp_fwd", mutates_args=())
def _mlp_fwd(xs: list[torch.Tensor], ws: list[torch.Tensor], b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None, act: int, reduce: str | None, grid_h: int, grid_w: int, recompute: bool,
             training: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(y, the hidden pre-activation when training without recompute else empty, pooled kept inputs or [])."""
    hidden, pre, pooled = _run_first_layer(xs, ws, b1, act, reduce, grid_h, grid_w, recompute, training)
    y = _kernels.alloc(hidden, hidden.shape[0], w2.shape[0])
    _kernels.launch(y, [_kernels.Operand(hidden, w2.t())], bias=b2)
    return y, pre, pooled


@_mlp_fwd.register_fake
def _(xs, ws, b1, w2, b2, act, reduce, grid_h, grid_w, recompute, training):
    hidden, pre, pooled = _fake_first_layer(xs, ws, act, reduce, grid_h, grid_w, recompute, training)
    return hidden.new_empty(hidden.shape[0], w2.shape[0]), pre, pooled


@torch.library.custom_op("fastvlm::fused_mlp_bwd", mutates_args=())
def _mlp_bwd(dy: torch.Tensor, xs: list[torch.Tensor], ws: list[torch.Tensor], b1: torch.Tensor | None,
             pre: torch.Tensor, w2: torch.Tensor, act: int, reduce: str | None, grid_h: int, grid_w: int,
             recompute: bool, needs_x: list[bool], needs_w1: list[bool], needs_b1: bool, needs_w2: bool, needs_b2: bool
             ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grads of the inputs' gathered rows, of W1, b1, W2, b2); empty where not needed."""
    run, pre = _recomputed_pre(xs, ws, b1, pre, act, reduce, grid_h, grid_w, recompute)
    # dgrad through W2 with act'(pre) in the epilogue; the same pass rebuilds act(pre) for
    # W2's gradient instead of having kept it from forward
    dz = _kernels.alloc(pre, *pre.shape)
    hidden = _kernels.alloc(pre, *pre.shape) if needs_w2 or needs_b2 else None
    _kernels.launch(dz, [_kernels.Operand(dy, w2)], epilogue=1, act=run.act, epi=pre, aux=hidden)
    dw2 = db2 = None
    if hidden is not None:
        dw2 = _kernels.alloc(w2, *w2.shape)
        db2 = _kernels.alloc(dy, dy.shape[1]) if needs_b2 else None
        _kernels.launch(dw2, [_kernels.Operand(dy.t(), hidden)], rowsum=db2)
    del hidden, pre
    d_rows, dws, db1 = _first_layer_backward(run, dz, None, xs, ws, needs_x, needs_w1, needs_b1)
    return (dispatch.empty_if_none(d_rows, dy), dispatch.empty_if_none(dws, dy),
            *dispatch.empty_if_none([db1, dw2 if needs_w2 else None, db2], dy))


@_mlp_bwd.register_fake
def _(dy, xs, ws, b1, pre, w2, act, reduce, grid_h, grid_w, recompute, needs_x, needs_w1, needs_b1, needs_w2,
      needs_b2):
    rows = FirstLayer.of(len(xs), act, reduce, grid_h, grid_w, recompute).rows(xs[0])
    return (_fake_grads(ws, needs_x, dy, lambda w: (rows, w.shape[1])), _fake_grads(ws, needs_w1, dy),
            dy.new_empty(w2.shape[1] if needs_b1 else 0), dy.new_empty(w2.shape if needs_w2 else (0,)),
            dy.new_empty(dy.shape[1] if needs_b2 else 0))


def _mlp_setup(ctx, inputs, output):
    xs, ws, b1, w2, b2, act, reduce, grid_h, grid_w, recompute, _ = inputs
    _setup_first_layer(ctx, xs, ws, b1, output[2], act, reduce, grid_h, grid_w, recompute, output[1], w2)


def _mlp_backward(ctx, dy, _dpre, _dpooled):
    b1, pre, (w2,), xs, ws, run_args = _saved_first_layer(ctx, 1)
    needs_x, needs_w1, needs_b1, needs_w2, needs_b2 = ctx.needs_input_grad[:5]
    d_rows, dws, db1, dw2, db2 = torch.ops.fastvlm.fused_mlp_bwd(
        dy, xs, ws, b1, pre, w2, ctx.spec.act, *run_args, needs_x, needs_w1, needs_b1, needs_w2, needs_b2)
    return (_input_grads(ctx, d_rows, needs_x), dispatch.none_if_unneeded(dws, needs_w1), db1 if needs_b1 else None,
            dw2 if needs_w2 else None, db2 if needs_b2 else None, None, None, None, None, None, None)


_mlp_fwd.register_autograd(_mlp_backward, setup_context=_mlp_setup)


# ---- the cuBLASLt path ---------------------------------------------------------------------------
# gelu_tanh MLP on cuBLASLt: GELU_AUX_BIAS forward writes the activation and the pre-activation
# in one GEMM, DGELU_BGRAD backward gives the hidden gradient and b1's gradient in one GEMM.
# Keeps the pre-activation, or (recompute) nothing: backward then reruns the GELU_AUX_BIAS GEMM,
# which returns the activation W2's gradient needs as well.
@torch.library.custom_op("fastvlm::cublaslt_mlp_fwd", mutates_args=())
def _cublaslt_mlp_fwd(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                      recompute: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, the pre-activation, or an empty tensor with recompute)."""
    hidden, pre = _ext.cublaslt_linear_gelu(x, w1, b1)
    return torch.addmm(b2, hidden, w2.t()), pre.new_empty(0) if recompute else pre


@_cublaslt_mlp_fwd.register_fake
def _(x, w1, b1, w2, b2, recompute):
    return x.new_empty(x.shape[0], w2.shape[0]), x.new_empty(0 if recompute else (x.shape[0], w1.shape[0]))


@torch.library.custom_op("fastvlm::cublaslt_mlp_bwd", mutates_args=())
def _cublaslt_mlp_bwd(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                      pre: torch.Tensor, recompute: bool, needs: list[bool]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grads of (x, W1, b1, W2, b2), empty where `needs` says not needed."""
    dy = dy.contiguous()
    if recompute:
        hidden, pre = _ext.cublaslt_linear_gelu(x, w1, b1)
    else:  # W2's gradient needs the activation, rebuilt elementwise rather than kept from forward
        hidden = None
    dz, db1 = _ext.cublaslt_dgelu_bgrad(dy, w2, pre)
    need_x, need_w1, need_b1, need_w2, need_b2 = needs
    if need_w2 and hidden is None:
        hidden = F.gelu(pre, approximate="tanh")
    grads = (dz @ w1 if need_x else None, dz.t() @ x if need_w1 else None, db1 if need_b1 else None,
             dy.t() @ hidden if need_w2 else None, dy.sum(0) if need_b2 else None)
    return tuple(dispatch.empty_if_none(grads, dy))


@_cublaslt_mlp_bwd.register_fake
def _(dy, x, w1, b1, w2, pre, recompute, needs):
    return tuple(_fake_grads((x, w1, b1, w2, dy[0]), needs, dy))


def _cublaslt_setup(ctx, inputs, output):
    x, w1, b1, w2, _, recompute = inputs
    ctx.recompute = recompute
    ctx.save_for_backward(x, w1, b1, w2, output[1])


def _cublaslt_backward(ctx, dy, _dpre):
    needs = list(ctx.needs_input_grad[:5])
    grads = torch.ops.fastvlm.cublaslt_mlp_bwd(dy, *ctx.saved_tensors, ctx.recompute, needs)
    return (*dispatch.none_if_unneeded(grads, needs), None)


_cublaslt_mlp_fwd.register_autograd(_cublaslt_backward, setup_context=_cublaslt_setup)


# ---- dispatch ------------------------------------------------------------------------------------
def _auto_mlp_backend(xs, ws, b1, w2, b2, activation, reduce, recompute) -> str:
    """triton, or cublaslt where it can serve the call and was measured faster for the
    shape (measured only in training calls, where the backward is what gets timed)."""
    x = xs[0]
    if (not torch.is_grad_enabled() or not dispatch.can_measure(x.device) or _cublaslt_serves(x.device) is not True
            or cublaslt_limitation(xs, ws, b1, b2, activation, reduce) is not None):
        return "triton"
    m = x.numel() // x.shape[-1]
    key = ("fused_mlp", dispatch.shape_bucket(m), x.shape[-1], ws[0].shape[0], w2.shape[0], x.dtype, x.device,
           bool(recompute))
    runners = {name: dispatch.trial(functools.partial(fused_mlp, activation=activation, recompute=recompute,
                                                      backend=name), (x, ws[0], b1, w2, b2), training=True)
               for name in ("triton", "cublaslt")}
    return dispatch.fastest_backend(key, runners, x.device)


def _kernel_inputs(xs, reduce):
    """2-D views of the inputs (3-D [B, T, C] under a token reduction) and the output's leading dims."""
    if reduce is not None:
        return list(xs), (xs[0].shape[0], xs[0].shape[1] // 4)
    lead = xs[0].shape[:-1]
    return [xi.reshape(-1, xi.shape[-1]) for xi in xs], lead


def _training(*args) -> bool:
    """Whether this call builds a graph (then the Triton ops keep what backward needs)."""
    flat = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])]
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in flat)


def fused_linear_act(x, w, b, activation: str = "gelu", *, reduce: str | None = None,
                     grid: tuple[int, int] | None = None, recompute: bool = False,
                     backend: str = "auto") -> torch.Tensor:
    """act(x W^T + b) with the bias and activation in the GEMM's epilogue."""
    x, w, b = _autocast(x, w, b)
    xs, ws, grid = _prepare(x, w, b, activation, reduce, grid, "w", "b")
    if _pick_backend("fused_linear_act", backend, xs[0]) == "reference":
        return fused_linear_act_reference(xs, ws, b, activation, reduce=reduce, grid=grid)
    flat, lead = _kernel_inputs(xs, reduce)
    code = act(activation, table=ACTIVATIONS).code
    out, _, _ = torch.ops.fastvlm.fused_linear_act_fwd(flat, ws, b, code, reduce, *(grid or (0, 0)),
                                                       bool(recompute), _training(flat, ws, b))
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
        out, _ = torch.ops.fastvlm.cublaslt_mlp_fwd(x2d, ws[0], b1, w2, b2, bool(recompute))
        return out.view(*xs[0].shape[:-1], out.shape[-1])
    flat, lead = _kernel_inputs(xs, reduce)
    code = act(activation, table=ACTIVATIONS).code
    out, _, _ = torch.ops.fastvlm.fused_mlp_fwd(flat, ws, b1, w2, b2, code, reduce,
                                                *(grid or (0, 0)), bool(recompute), _training(flat, ws, b1, w2, b2))
    return out.view(*lead, out.shape[-1])
