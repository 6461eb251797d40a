"""Triton GEMM for fused_linear_act / fused_mlp (fastvlm.ops.fused_mlp): C = sum_i A_i @ B_i
with fused pro/epilogues. Kernels and their launcher only; the ops compose them.

One kernel serves every GEMM of the fused connector, forward and backward:

- up to MAX_OPERANDS (A_i, B_i) pairs accumulate into one fp32 tile, so a
  multi-level input [x_1 | x_2 | ...] @ W^T is computed without materialising
  the concatenation (longer lists are chained through the fp32 ``c_in`` input);
- A may be read through a 2x2 token-reduction index map (pixel shuffle or
  average pooling over the patch grid, see fastvlm.ops.token_reduction), so the
  reduced tokens are never written out;
- prologue ``gate``: A is multiplied by act'(G) as it is loaded (the backward of
  ``act(x W^T + b)`` w.r.t. its pre-activation, fused into dgrad and wgrad);
- ``rowsum``: the row sums of the (gated) A, i.e. a bias gradient when A is
  dY^T, reduced in the same pass over the reduction dimension;
- epilogue ``forward``: z = acc + c_in + bias, out = act(z), optionally aux = z
  (the pre-activation kept for backward);
- epilogue ``dact``: with G loaded from ``epi``, out = acc * act'(G) and
  optionally aux = act(G) (the MLP's dgrad through its hidden layer, which also
  rebuilds the activation for the second weight gradient).

Operands are arbitrary-strided views (a transpose is a stride swap, never a copy).
Under TRITON_INTERPRET=1 (CPU tensors) the kernel runs with fixed small tiles;
on a GPU it is autotuned.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvlm.kernels import INTERPRETED  # noqa: F401  (how these kernels were defined; read by the ops' checks)

# `act` / `gate_act` codes (_act_and_grad): 0 is the identity, the others are those of
# fastvlm.ops.activations.ACTIVATIONS (1 gelu, 2 gelu_tanh, 3 quick_gelu, 4 silu), which
# tests/test_op_registration.py checks against the kernel.
REDUCE_IDS = {None: 0, "pixel_shuffle": 1, "avg_pool": 2}
MAX_OPERANDS = 4
INTERPRETER_TILE = 32


@triton.jit
def _act_and_grad(x, ACT: tl.constexpr):
    """(act(x), act'(x)) in fp32; the compiler drops whichever a caller ignores."""
    if ACT == 1:  # exact GELU
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        value = x * cdf
        grad = cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACT == 2:  # tanh GELU; tanh via exp so it saturates cleanly to +-1
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
        value = 0.5 * x * (1.0 + t)
        grad = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    elif ACT == 3:  # quick GELU (CLIP): x * sigmoid(1.702 x)
        s = tl.sigmoid(1.702 * x)
        value = x * s
        grad = s + 1.702 * x * s * (1.0 - s)
    elif ACT == 4:  # SiLU
        s = tl.sigmoid(x)
        value = x * s
        grad = s * (1.0 + x * (1.0 - s))
    else:
        value = x
        grad = x * 0.0 + 1.0
    return value, grad


@triton.jit
def _a_row_offsets(rm, s_ab, s_am, REDUCE: tl.constexpr, GRID_W, TOKENS):
    """Offset of each A row; with a reduction, of the top-left token of its 2x2 block."""
    rm = rm.to(tl.int64)
    if REDUCE == 0:
        off = rm * s_am
    else:
        per_image = TOKENS // 4
        half_w = GRID_W // 2
        r = rm % per_image
        off = (rm // per_image) * s_ab + (2 * (r // half_w) * GRID_W + 2 * (r % half_w)) * s_am
    return off


@triton.jit
def _load_a(a_ptr, row_off, rk, mask_m, K, s_am, s_ak, REDUCE: tl.constexpr, GRID_W):
    mask = mask_m[:, None] & (rk < K)[None, :]
    if REDUCE == 1:  # pixel shuffle: column q*C + c reads token (di, dj) = divmod(q, 2), channel c
        width = K // 4
        q = rk // width
        col = ((q // 2) * GRID_W + q % 2).to(tl.int64) * s_am + (rk % width).to(tl.int64) * s_ak
    else:
        col = rk.to(tl.int64) * s_ak
    ptrs = a_ptr + row_off[:, None] + col[None, :]
    if REDUCE == 2:  # 2x2 mean in fp32, rounded once to the operand dtype like the reference
        s = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        s += tl.load(ptrs + s_am, mask=mask, other=0.0).to(tl.float32)
        s += tl.load(ptrs + GRID_W * s_am, mask=mask, other=0.0).to(tl.float32)
        s += tl.load(ptrs + (GRID_W + 1) * s_am, mask=mask, other=0.0).to(tl.float32)
        tile = (s * 0.25).to(a_ptr.dtype.element_ty)
    else:
        tile = tl.load(ptrs, mask=mask, other=0.0)
    return tile


@triton.jit
def _accumulate(acc, rowacc, a_ptr, b_ptr, K, s_ab, s_am, s_ak, s_bk, s_bn,
                gate_ptr, s_gm, s_gk, rm, rn, mask_m, mask_n, GRID_W, TOKENS,
                REDUCE: tl.constexpr, GATE_ACT: tl.constexpr, ROWSUM: tl.constexpr,
                FP32_IEEE: tl.constexpr, BLOCK_K: tl.constexpr):
    row_off = _a_row_offsets(rm, s_ab, s_am, REDUCE, GRID_W, TOKENS)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = _load_a(a_ptr, row_off, rk, mask_m, K, s_am, s_ak, REDUCE, GRID_W)
        if GATE_ACT != 0:
            g_ptrs = gate_ptr + rm.to(tl.int64)[:, None] * s_gm + rk.to(tl.int64)[None, :] * s_gk
            g = tl.load(g_ptrs, mask=mask_m[:, None] & (rk < K)[None, :], other=0.0)
            _, d = _act_and_grad(g.to(tl.float32), GATE_ACT)
            a = (a.to(tl.float32) * d).to(a_ptr.dtype.element_ty)
        if ROWSUM:
            rowacc += tl.sum(a.to(tl.float32), axis=1)
        b_ptrs = b_ptr + rk.to(tl.int64)[:, None] * s_bk + rn.to(tl.int64)[None, :] * s_bn
        b = tl.load(b_ptrs, mask=(rk < K)[:, None] & mask_n[None, :], other=0.0)
        if FP32_IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc, rowacc


@triton.jit
def fused_linear_kernel(
    out_ptr, s_om, s_on, aux_ptr, s_xm, s_xn, bias_ptr, cin_ptr, s_cm, s_cn,
    epi_ptr, s_em, s_en, rowsum_ptr, gate_ptr, s_gm, s_gk,
    a0, b0, K0, s_a0b, s_a0m, s_a0k, s_b0k, s_b0n,
    a1, b1, K1, s_a1b, s_a1m, s_a1k, s_b1k, s_b1n,
    a2, b2, K2, s_a2b, s_a2m, s_a2k, s_b2k, s_b2n,
    a3, b3, K3, s_a3b, s_a3m, s_a3k, s_b3k, s_b3n,
    M, N, GRID_W, TOKENS, M_BUCKET,
    NUM_OPERANDS: tl.constexpr, REDUCE: tl.constexpr, GATE_ACT: tl.constexpr,
    ACT: tl.constexpr, EPILOGUE: tl.constexpr, STORE_AUX: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_CIN: tl.constexpr, ROWSUM: tl.constexpr,
    FP32_IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped tile order: GROUP_M row-tiles share B tiles while they are in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rowacc = tl.zeros((BLOCK_M,), dtype=tl.float32)

    acc, rowacc = _accumulate(acc, rowacc, a0, b0, K0, s_a0b, s_a0m, s_a0k, s_b0k, s_b0n,
                              gate_ptr, s_gm, s_gk, rm, rn, mask_m, mask_n, GRID_W, TOKENS,
                              REDUCE, GATE_ACT, ROWSUM, FP32_IEEE, BLOCK_K)
    if NUM_OPERANDS > 1:
        acc, rowacc = _accumulate(acc, rowacc, a1, b1, K1, s_a1b, s_a1m, s_a1k, s_b1k, s_b1n,
                                  gate_ptr, s_gm, s_gk, rm, rn, mask_m, mask_n, GRID_W, TOKENS,
                                  REDUCE, 0, False, FP32_IEEE, BLOCK_K)
    if NUM_OPERANDS > 2:
        acc, rowacc = _accumulate(acc, rowacc, a2, b2, K2, s_a2b, s_a2m, s_a2k, s_b2k, s_b2n,
                                  gate_ptr, s_gm, s_gk, rm, rn, mask_m, mask_n, GRID_W, TOKENS,
                                  REDUCE, 0, False, FP32_IEEE, BLOCK_K)
    if NUM_OPERANDS > 3:
        acc, rowacc = _accumulate(acc, rowacc, a3, b3, K3, s_a3b, s_a3m, s_a3k, s_b3k, s_b3n,
                                  gate_ptr, s_gm, s_gk, rm, rn, mask_m, mask_n, GRID_W, TOKENS,
                                  REDUCE, 0, False, FP32_IEEE, BLOCK_K)

    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    mask = mask_m[:, None] & mask_n[None, :]
    if ROWSUM:
        tl.store(rowsum_ptr + rm64, rowacc.to(rowsum_ptr.dtype.element_ty), mask=mask_m & (pid_n == 0))
    if EPILOGUE == 0:
        if HAS_CIN:
            acc += tl.load(cin_ptr + rm64[:, None] * s_cm + rn64[None, :] * s_cn, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn64, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        result, _ = _act_and_grad(acc, ACT)
        if STORE_AUX:
            tl.store(aux_ptr + rm64[:, None] * s_xm + rn64[None, :] * s_xn,
                     acc.to(aux_ptr.dtype.element_ty), mask=mask)
    else:
        g = tl.load(epi_ptr + rm64[:, None] * s_em + rn64[None, :] * s_en, mask=mask, other=0.0)
        activated, d = _act_and_grad(g.to(tl.float32), ACT)
        result = acc * d
        if STORE_AUX:
            tl.store(aux_ptr + rm64[:, None] * s_xm + rn64[None, :] * s_xn,
                     activated.to(aux_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + rm64[:, None] * s_om + rn64[None, :] * s_on,
             result.to(out_ptr.dtype.element_ty), mask=mask)


def _gpu_configs():
    shapes = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
              (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
                          num_warps=w, num_stages=s) for m, n, k, w, s in shapes]


_tuned_kernel = triton.autotune(
    configs=_gpu_configs(),
    key=["M_BUCKET", "N", "K0", "NUM_OPERANDS", "REDUCE", "GATE_ACT", "ACT", "EPILOGUE",
         "ROWSUM", "FP32_IEEE"],
)(fused_linear_kernel)


def alloc(like: torch.Tensor, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every kernel output is allocated here (tests poison them through it)."""
    return like.new_empty(shape, dtype=dtype or like.dtype)


class Operand:
    """One (A, B) pair: A is [M, K] (any strides) or, with a token reduction,
    the [B, T, C] features it reads through the 2x2 index map; B is [K, N]."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        self.a, self.b = a, b

    def args(self):
        s_ab, s_am, s_ak = self.a.stride() if self.a.dim() == 3 else (0, *self.a.stride())
        return [self.a, self.b, self.b.shape[0], s_ab, s_am, s_ak, self.b.stride(0), self.b.stride(1)]


def launch(out, operands, *, act=0, epilogue=0, aux=None, bias=None, c_in=None, epi=None,
           rowsum=None, gate=None, gate_act=0, reduce=0, grid_w=0, tokens=0):
    """out[M, N] = epilogue(sum_i prologue(A_i) @ B_i); see the module docstring.

    `act` is the epilogue's activation, `gate_act` the one whose derivative
    (at `gate`) multiplies A_0 as it is loaded.
    """
    m, n = out.shape
    if m == 0 or n == 0:  # an empty batch: nothing to write, and a zero grid is not launchable everywhere
        return out
    if (gate is None) != (gate_act == 0):
        raise ValueError("gate: a gate tensor needs a gate_act, and a gate_act needs a gate")
    if len(operands) > MAX_OPERANDS:
        if epilogue != 0:
            raise ValueError(f"operands: at most {MAX_OPERANDS} with the dact epilogue")
        partial = alloc(out, m, n, dtype=torch.float32)
        launch(partial, operands[:MAX_OPERANDS], c_in=c_in, rowsum=rowsum, gate=gate,
               gate_act=gate_act, reduce=reduce, grid_w=grid_w, tokens=tokens)
        return launch(out, operands[MAX_OPERANDS:], act=act, aux=aux, bias=bias, c_in=partial,
                      reduce=reduce, grid_w=grid_w, tokens=tokens)
    slots = [op.args() for op in operands]
    slots += [slots[0]] * (MAX_OPERANDS - len(slots))  # unused slots, compiled out
    dummy = out
    gate_strides = gate.stride() if gate is not None else (0, 0)
    args = [out, *out.stride(),
            aux if aux is not None else dummy, *(aux.stride() if aux is not None else (0, 0)),
            bias if bias is not None else dummy,
            c_in if c_in is not None else dummy, *(c_in.stride() if c_in is not None else (0, 0)),
            epi if epi is not None else dummy, *(epi.stride() if epi is not None else (0, 0)),
            rowsum if rowsum is not None else dummy,
            gate if gate is not None else dummy, *gate_strides,
            *[v for slot in slots for v in slot],
            m, n, grid_w, tokens, triton.next_power_of_2(m)]
    meta = dict(NUM_OPERANDS=len(operands), REDUCE=reduce, GATE_ACT=gate_act,
                ACT=act, EPILOGUE=epilogue, STORE_AUX=aux is not None, HAS_BIAS=bias is not None,
                HAS_CIN=c_in is not None, ROWSUM=rowsum is not None,
                FP32_IEEE=operands[0].a.dtype == torch.float32)

    def grid(cfg):
        return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)

    if out.is_cuda:
        _tuned_kernel[grid](*args, **meta)
    else:  # TRITON_INTERPRET=1: fixed tiles, nothing to tune
        tiles = dict(BLOCK_M=INTERPRETER_TILE, BLOCK_N=INTERPRETER_TILE, BLOCK_K=INTERPRETER_TILE,
                     GROUP_M=4)
        fused_linear_kernel[grid(tiles)](*args, **meta, **tiles)
    return out
