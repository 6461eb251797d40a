"""Triton kernels for lora_linear (fastvlm.ops.lora_linear): y = x Wᵀ + b + s·(x Aᵀ) Bᵀ.
Kernels and their launchers only; the op composes them.

Forward: each program owns a [BLOCK_M, BLOCK_N] tile of y; its K loop loads an x
tile once and feeds it to two dots, x·Wᵀ and x·Aᵀ (the rank-r projection
u = x Aᵀ, recomputed per column tile: r/BLOCK_N extra FLOPs instead of a second
pass over x), and the epilogue adds s·u·Bᵀ and the bias. Column-tile 0 also
writes u for the backward pass.

Backward (dx): the same trick over N: each [BLOCK_M, BLOCK_K] tile of dx loops
over gy tiles once, accumulating gy·W and gy·B together; the epilogue adds
(s·gy·B)·A. Column-tile 0 writes du = s·gy·B, from which the caller gets
dA = duᵀ x; dB = s·gyᵀ u is a rank-r GEMM the caller runs with torch.
All accumulation is fp32; operands are fp16, bf16 or fp32 (fp32 dots in IEEE
precision, as torch's default matmul, not TF32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvlm.kernels import INTERPRETED  # noqa: F401  (how these kernels were defined; read by the ops' checks)


@triton.jit
def _lora_fwd_kernel(X, W, A, B, BIAS, Y, U, M, N, K, R, scaling,
                     stride_xm, stride_wn, stride_ar, stride_bn, stride_ym, stride_um,
                     HAS_BIAS: tl.constexpr, WRITE_U: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    # row * stride in int64: M * K (x) or M * N (y) passes 2^31 at realistic sizes
    # (131k tokens x 14336 features), and int32 offsets wrap on a GPU
    rm64, rn64 = rm.to(tl.int64), rn.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(X + rm64[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        wt = tl.load(W + rn64[None, :] * stride_wn + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
        at = tl.load(A + rr[None, :] * stride_ar + kk[:, None], mask=(rr[None, :] < R) & (kk[:, None] < K), other=0.0)
        acc = tl.dot(x, wt, acc, input_precision=PRECISION)
        u = tl.dot(x, at, u, input_precision=PRECISION)
    # u is rounded to the operand dtype before the second product, as an unfused
    # F.linear chain in that dtype would.
    u_lp = u.to(X.dtype.element_ty)
    bt = tl.load(B + rn[None, :] * stride_bn + rr[:, None], mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)
    acc += tl.dot(u_lp, bt, input_precision=PRECISION) * scaling
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm64[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))
    if WRITE_U:
        if pid_n == 0:
            tl.store(U + rm64[:, None] * stride_um + rr[None, :], u_lp, mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.jit
def _lora_bwd_dx_kernel(G, W, B, A, DX, DU, M, N, K, R, scaling,
                        stride_gm, stride_wn, stride_bn, stride_ar, stride_dxm, stride_dum,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    rn = tl.arange(0, BLOCK_N)
    rm64 = rm.to(tl.int64)  # int64 row offsets, as in the forward (M * N, M * K past 2^31)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    gb = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nn = n0 + rn
        g = tl.load(G + rm64[:, None] * stride_gm + nn[None, :], mask=(rm[:, None] < M) & (nn[None, :] < N), other=0.0)
        w = tl.load(W + nn.to(tl.int64)[:, None] * stride_wn + rk[None, :],
                    mask=(nn[:, None] < N) & (rk[None, :] < K), other=0.0)
        b = tl.load(B + nn[:, None] * stride_bn + rr[None, :], mask=(nn[:, None] < N) & (rr[None, :] < R), other=0.0)
        acc = tl.dot(g, w, acc, input_precision=PRECISION)
        gb = tl.dot(g, b, gb, input_precision=PRECISION)
    du = (gb * scaling).to(G.dtype.element_ty)
    a = tl.load(A + rr[:, None] * stride_ar + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)
    acc = tl.dot(du, a, acc, input_precision=PRECISION)
    tl.store(DX + rm64[:, None] * stride_dxm + rk[None, :], acc.to(DX.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))
    if pid_k == 0:
        tl.store(DU + rm64[:, None] * stride_dum + rr[None, :], du, mask=(rm[:, None] < M) & (rr[None, :] < R))


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dim >= 16


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for 16-bit operands


def _default_blocks(dtype: torch.dtype) -> tuple[int, int, int]:
    # fp32 tiles are twice the bytes: smaller ones keep shared memory under the ~99 KB
    # consumer GPUs (sm_86 / sm_89) allow, at ranks up to 128.
    return (32, 64, 32) if dtype == torch.float32 else (64, 128, 64)


def lora_forward(x, weight, bias, lora_A, lora_B, scaling: float, *, write_u: bool = True,
                 y=None, u=None, blocks: tuple[int, int, int] | None = None):
    """y = x Wᵀ + b + s·(x Aᵀ) Bᵀ and u = x Aᵀ for 2-D contiguous x [M, K], all one dtype.
    `y` / `u` may be passed preallocated (tests poison them)."""
    m, k = x.shape
    n, r = weight.shape[0], lora_A.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype) if y is None else y
    u = (torch.empty(m, r, device=x.device, dtype=x.dtype) if u is None else u) if write_u else y
    bm, bn, bk = blocks or _default_blocks(x.dtype)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _lora_fwd_kernel[grid](x, weight, lora_A, lora_B, bias if bias is not None else y, y, u, m, n, k, r,
                           float(scaling), x.stride(0), weight.stride(0), lora_A.stride(0), lora_B.stride(0),
                           y.stride(0), u.stride(0), HAS_BIAS=bias is not None, WRITE_U=write_u,
                           PRECISION=_precision(x.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                           BLOCK_R=_rank_block(r))
    return y, (u if write_u else None)


def lora_backward_dx(gy, weight, lora_A, lora_B, scaling: float, *, dx=None, du=None,
                     blocks: tuple[int, int, int] | None = None):
    """dx = gy W + (s·gy B) A and du = s·gy B, for 2-D contiguous gy [M, N], all one dtype."""
    m, n = gy.shape
    k, r = weight.shape[1], lora_A.shape[0]
    dx = torch.empty(m, k, device=gy.device, dtype=gy.dtype) if dx is None else dx
    du = torch.empty(m, r, device=gy.device, dtype=gy.dtype) if du is None else du
    bm, bn, bk = blocks or _default_blocks(gy.dtype)
    grid = (triton.cdiv(m, bm), triton.cdiv(k, bk))
    _lora_bwd_dx_kernel[grid](gy, weight, lora_B, lora_A, dx, du, m, n, k, r, float(scaling),
                              gy.stride(0), weight.stride(0), lora_B.stride(0), lora_A.stride(0),
                              dx.stride(0), du.stride(0), PRECISION=_precision(gy.dtype),
                              BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=_rank_block(r))
    return dx, du
