"""Triton kernels for multimodal_attention: forward, backward, launchers.

Every kernel walks the layout's block map instead of the N x N grid: the
forward and dQ kernels take, per query block, the kv blocks listed as
*partial* (mask predicate evaluated from lo/hi/is_image loaded for the tile)
and as *full* (no predicate, only the bounds check of a tail tile); the dK/dV
kernel walks the transposed lists. Tiles in neither list are never touched.

Scores are kept in log2 units (scaled by log2(e)) so the softmax uses exp2;
the saved LSE is in the same units and stays internal to this module.

Shared-prompt layouts (HAS_CUT): a query also drops the keys of its cut
[cut_lo, cut_hi] (an answer skips the answers before it); only partial tiles
load and evaluate it, the block map keeps full tiles exact. Without cuts the
kernels compile as before (HAS_CUT is a constexpr; the cut pointers go unused).

split_softmax (mmca): two online softmaxes per row, over text keys (branch 0)
and image keys (branch 1); both LSEs are saved, the branch outputs are kept
for backward, where each branch has its own delta = rowsum(dO * O_branch).

GQA: the dK/dV program of a kv head loops over the q heads of its group, so
every dK/dV element is written by exactly one program.

Work order (TileConfig.grid, causal-like layouts, where persistent_grid's rule takes it):
the work items, (row block, batch*head) pairs, run longest-first: the block map's row
blocks sorted by their tile counts (dK/dV: its key blocks by theirs), each repeated over
the heads, so the short rows fill the grid's tail. "longest_first": one program per item
as a 1-D grid in that order (the hardware hands out blocks in index order);
"persistent": a few programs per SM, program p taking items p, 2P-1-p, 2P+p, ... (snake
order: the programs' loads differ by about one item). benchmarks/attention_schedule.py
models the makespans. Each item is the plain grid's program body unchanged: results are
bitwise those of the plain grid; the deterministic backward stays deterministic.

Backward: dK/dV computes S^T = K Q^T directly, so P^T and dS^T come out of the
tensor cores in the layout the dV and dK products take. Fast mode: that pass also
adds dQ = dS K to an fp32 buffer with atomics (5 products per tile; formed as
dQ^T = K^T dS^T where the backward tile says transposed_dq). Deterministic mode: a
separate dQ kernel (3 products) at the forward's tiles, no atomics.
tests/test_attention_backward_aot.py checks both in the compiled code.

Tile loads and stores (TileConfig.tma): through TMA tensor descriptors, one per (batch,
head) slice, made on the device (tl.make_tensor_descriptor: Triton 3.6 and 3.8, the
interpreter too), whose bounds stand in for the row and head_dim masks; else through
pointers with masks (sm80, unaligned tensors). Triton's warp specialisation
(tl.range(..., warp_specialize=True)) is not used: on sm90 neither 3.6 nor 3.8 applies
it to these loops (ignored at 8 warps, the compiler's pass fails at 4).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from fastvlm.kernels import INTERPRETED

LOG2E = 1.4426950408889634
# Codes of the mask kinds whose image queries drop every image key but their own (mmca):
# the kernels' one per-kind rule. tests/test_mask_kinds.py checks it against
# fastvlm.ops.mask_kinds, where the kinds are defined.
IMAGE_ISOLATING_KINDS = frozenset({3})


# ---- shared device helpers -------------------------------------------------------------------
@triton.jit
def _allowed(qm, kn, lo, hi, cut_lo, cut_hi, img_q, img_k, N, IS_FULL: tl.constexpr,
             ISOLATE_IMAGES: tl.constexpr, HAS_CUT: tl.constexpr):
    """Allowed (query, key) pairs of one tile: the only mask logic of all kernels. The
    query-side operands (positions qm, lo, hi, cut_lo, cut_hi, img_q) and the key-side
    ones (kn, img_k) come broadcastable, as [rows, 1] and [1, cols] for a [query, key]
    tile or the other way round for a transposed [key, query] tile (dK/dV)."""
    if IS_FULL:
        # every real pair of a full tile is allowed; only a tail tile's padding keys are not
        ok = (kn < N) & (qm >= 0)
    else:
        ok = (kn >= lo) & (kn <= hi)
        if HAS_CUT:
            ok = ok & ((kn < cut_lo) | (kn > cut_hi))
        if ISOLATE_IMAGES:
            both_image = (img_q != 0) & (img_k != 0)
            ok = ok & (~both_image | (kn == qm))
    return ok


@triton.jit
def _online_softmax_step(m, l, acc, s, ok, v, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One kv tile of a flash-style online softmax (log2 units); masked-out
    rows stay at m = -inf, l = 0 without producing NaN."""
    if MASKED:
        s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l, acc


@triton.jit
def _row_offsets(offs, offs_d, stride_n):
    """Element offsets of a [rows, D] tile. Row * stride in int64: a row stride of a
    packed or varlen view ([T, H, D] seen as [1, H, T, D] has stride H*D) times a
    position past 2^31 / stride wraps in int32 on a GPU (e.g. T = 512k, H = 32, D = 128)."""
    return offs.to(tl.int64)[:, None] * stride_n + offs_d[None, :]


@triton.jit
def _load_rows(base, offs, offs_d, stride_n, N, D):
    mask = (offs[:, None] < N) & (offs_d[None, :] < D)
    return tl.load(base + _row_offsets(offs, offs_d, stride_n), mask=mask, other=0.0)


@triton.jit
def _rows_src(base, stride_n, N, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """Where [BLOCK_R, BLOCK_D] tiles of the [N, D] rows at base come from. USE_TMA: a
    tensor descriptor (sm90's TMA copies a whole tile to shared memory asynchronously; its
    bounds zero-fill rows >= N and columns >= D on loads and clip them on stores, so no
    per-element mask is formed). Else the pointer itself, for _load_rows' masked loads."""
    src = base
    if USE_TMA:
        src = tl.make_tensor_descriptor(base, shape=[N, D], strides=[stride_n, 1], block_shape=[BLOCK_R, BLOCK_D])
    return src


@triton.jit
def _load_tile(src, row0, stride_n, N, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows row0 .. row0 + BLOCK_R of a _rows_src source, zero past N and past D."""
    if USE_TMA:
        tile = src.load([row0, 0])
    else:
        tile = _load_rows(src, row0 + tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_D), stride_n, N, D)
    return tile


@triton.jit
def _store_tile(dst, row0, tile, stride_n, N, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                USE_TMA: tl.constexpr):
    """Stores the rows < N and columns < D of a tile at row0 of a _rows_src destination."""
    if USE_TMA:
        dst.store([row0, 0], tile)
    else:
        offs = row0 + tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        tl.store(dst + _row_offsets(offs, offs_d, stride_n), tile, mask=(offs[:, None] < N) & (offs_d[None, :] < D))


@triton.jit
def _load_kv_tile(kb, k_src, v_src, img_base, stride_kn, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  USE_TMA: tl.constexpr):
    """Key block kb: its positions, k and v rows (zero past N), and its image flags."""
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _load_tile(k_src, kb * BLOCK_N, stride_kn, N, D, BLOCK_N, BLOCK_D, USE_TMA)
    v = _load_tile(v_src, kb * BLOCK_N, stride_kn, N, D, BLOCK_N, BLOCK_D, USE_TMA)
    img_k = tl.load(img_base + offs_n, mask=offs_n < N, other=0)
    return offs_n, k, v, img_k


@triton.jit
def _load_row_meta(LO, HI, IMG, CUT_LO, CUT_HI, b, offs_m, N, HAS_CUT: tl.constexpr):
    """Allowed-key interval, cut (lo, hi without HAS_CUT: never read) and image flag of
    query rows; rows past N allow nothing."""
    lo = tl.load(LO + b * N + offs_m, mask=offs_m < N, other=0)
    hi = tl.load(HI + b * N + offs_m, mask=offs_m < N, other=-1)
    img_q = tl.load(IMG + b * N + offs_m, mask=offs_m < N, other=0)
    cut_lo, cut_hi = lo, hi
    if HAS_CUT:
        cut_lo = tl.load(CUT_LO + b * N + offs_m, mask=offs_m < N, other=0)
        cut_hi = tl.load(CUT_HI + b * N + offs_m, mask=offs_m < N, other=-1)
    return lo, hi, cut_lo, cut_hi, img_q


@triton.jit
def _load_lse(lse_base, offs_m, N):
    """LSE of rows; rows with nothing allowed (-inf) or past N read +inf, so exp2(s - lse) = 0."""
    lse = tl.load(lse_base + offs_m, mask=offs_m < N, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse)


@triton.jit
def _item_rounds(ITEMS):
    """How many work items this persistent program takes: one per round of P = num_programs
    items, the last round partial (see _work_item for which program takes which)."""
    p = tl.program_id(0)
    P = tl.num_programs(0)
    full = ITEMS // P
    last = tl.where(full % 2 == 0, p, P - 1 - p)  # this program's place in the last round
    return full + (last < ITEMS % P).to(tl.int32)


@triton.jit
def _grid_item(HEADS):
    """(block, batch row, head) of a plain-grid program, grid (blocks, B * HEADS). Row and head
    in int64 (offsets: see _attn_fwd), divided in int32."""
    bh = tl.program_id(1)
    return tl.program_id(0), (bh // HEADS).to(tl.int64), (bh % HEADS).to(tl.int64)


@triton.jit
def _work_item(ORDER, r, HEADS, BLOCKS):
    """(block, batch row, head) of this program's item in round r. Items run in snake
    order over the longest-first list (program p takes r*P + p in even rounds, r*P + P-1-p in
    odd ones); item w is entry w // HEADS of ORDER (b * BLOCKS + block, by descending tile
    count) at head w % HEADS, so the heads of one block are neighbours."""
    p = tl.program_id(0)
    P = tl.num_programs(0)
    w = r * P + tl.where(r % 2 == 0, p, P - 1 - p)
    j = tl.load(ORDER + w // HEADS)
    return j % BLOCKS, (j // BLOCKS).to(tl.int64), (w % HEADS).to(tl.int64)


# ---- forward ---------------------------------------------------------------------------------
@triton.jit
def _fwd_tile(q, kb, k_base, v_base, stride_kn, offs_m, lo, hi, cut_lo, cut_hi, img_q, img_base, N, D,
              qk_scale, m0, l0, acc0, m1, l1, acc1,
              IS_FULL: tl.constexpr, ISOLATE_IMAGES: tl.constexpr, SPLIT: tl.constexpr, EVEN_N: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, HAS_CUT: tl.constexpr,
              USE_TMA: tl.constexpr):
    offs_n, k, v, img_k = _load_kv_tile(kb, k_base, v_base, img_base, stride_kn, N, D, BLOCK_N, BLOCK_D, USE_TMA)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    ok = _allowed(offs_m[:, None], offs_n[None, :], lo[:, None], hi[:, None], cut_lo[:, None], cut_hi[:, None],
                  img_q[:, None], img_k[None, :], N, IS_FULL, ISOLATE_IMAGES, HAS_CUT)
    if SPLIT:
        key_is_image = img_k[None, :] != 0
        m0, l0, acc0 = _online_softmax_step(m0, l0, acc0, s, ok & ~key_is_image, v, True, PRECISION)
        m1, l1, acc1 = _online_softmax_step(m1, l1, acc1, s, ok & key_is_image, v, True, PRECISION)
    else:
        # a full tile of an N that fills its kv blocks needs no mask at all
        m0, l0, acc0 = _online_softmax_step(m0, l0, acc0, s, ok, v, not (IS_FULL and EVEN_N), PRECISION)
    return m0, l0, acc0, m1, l1, acc1


@triton.jit
def _finish_branch(m, l, acc):
    has = l > 0
    out = tl.where(has[:, None], acc / tl.where(has, l, 1.0)[:, None], 0.0)
    lse = tl.where(has, m + tl.math.log2(tl.where(has, l, 1.0)), float("-inf"))
    return out, lse


@triton.jit
def _fwd_row_block(qb, b, h, Q, K, V, O, OBR, LSE, LO, HI, IMG, CUT_LO, CUT_HI,
                   KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                   stride_ob, stride_oh, stride_on, stride_rbr, stride_rb, stride_rh, stride_rn, stride_lse,
                   H, GROUP, N, D, TQ, TK, qk_scale,
                   ISOLATE_IMAGES: tl.constexpr, SPLIT: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, HAS_CUT: tl.constexpr,
                   USE_TMA: tl.constexpr):
    bh = b * H + h
    hk = h // GROUP
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    q_src = _rows_src(Q + b * stride_qb + h * stride_qh, stride_qn, N, D, BLOCK_M, BLOCK_D, USE_TMA)
    q = _load_tile(q_src, qb * BLOCK_M, stride_qn, N, D, BLOCK_M, BLOCK_D, USE_TMA)
    lo, hi, cut_lo, cut_hi, img_q = _load_row_meta(LO, HI, IMG, CUT_LO, CUT_HI, b, offs_m, N, HAS_CUT)
    k_base = _rows_src(K + b * stride_kb + hk * stride_kh, stride_kn, N, D, BLOCK_N, BLOCK_D, USE_TMA)
    v_base = _rows_src(V + b * stride_kb + hk * stride_kh, stride_kn, N, D, BLOCK_N, BLOCK_D, USE_TMA)
    img_base = IMG + b * N

    m0 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l0 = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m1, l1, acc1 = m0, l0, acc0
    lists = b * TQ + qb
    for i in range(tl.load(KV_NUM + lists)):
        kb = tl.load(KV_IDX + lists * TK + i)
        m0, l0, acc0, m1, l1, acc1 = _fwd_tile(
            q, kb, k_base, v_base, stride_kn, offs_m, lo, hi, cut_lo, cut_hi, img_q, img_base, N, D,
            qk_scale, m0, l0, acc0, m1, l1, acc1, False, ISOLATE_IMAGES, SPLIT, EVEN_N, BLOCK_N, BLOCK_D, PRECISION,
            HAS_CUT, USE_TMA)
    for i in range(tl.load(FULL_KV_NUM + lists)):
        kb = tl.load(FULL_KV_IDX + lists * TK + i)
        m0, l0, acc0, m1, l1, acc1 = _fwd_tile(
            q, kb, k_base, v_base, stride_kn, offs_m, lo, hi, cut_lo, cut_hi, img_q, img_base, N, D,
            qk_scale, m0, l0, acc0, m1, l1, acc1, True, ISOLATE_IMAGES, SPLIT, EVEN_N, BLOCK_N, BLOCK_D, PRECISION,
            HAS_CUT, USE_TMA)

    lse_ptrs = LSE + bh * N + offs_m
    out0, lse0 = _finish_branch(m0, l0, acc0)
    tl.store(lse_ptrs, lse0, mask=offs_m < N)
    if SPLIT:
        out1, lse1 = _finish_branch(m1, l1, acc1)
        tl.store(lse_ptrs + stride_lse, lse1, mask=offs_m < N)
        obr = OBR + b * stride_rb + h * stride_rh
        for br in tl.static_range(2):
            dst = _rows_src(obr + br * stride_rbr, stride_rn, N, D, BLOCK_M, BLOCK_D, USE_TMA)
            _store_tile(dst, qb * BLOCK_M, (out1 if br else out0).to(OBR.dtype.element_ty), stride_rn, N, D,
                        BLOCK_M, BLOCK_D, USE_TMA)
        out0 = out0 + out1
    o_dst = _rows_src(O + b * stride_ob + h * stride_oh, stride_on, N, D, BLOCK_M, BLOCK_D, USE_TMA)
    _store_tile(o_dst, qb * BLOCK_M, out0.to(O.dtype.element_ty), stride_on, N, D, BLOCK_M, BLOCK_D, USE_TMA)


@triton.jit
def _attn_fwd(Q, K, V, O, OBR, LSE, LO, HI, IMG, CUT_LO, CUT_HI,
              KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX,
              stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
              stride_ob, stride_oh, stride_on, stride_rbr, stride_rb, stride_rh, stride_rn, stride_lse,
              H, GROUP, N, D, TQ, TK, qk_scale, ORDER, ITEMS,
              ISOLATE_IMAGES: tl.constexpr, SPLIT: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, HAS_CUT: tl.constexpr,
              GRID: tl.constexpr, USE_TMA: tl.constexpr):
    """GRID 0: grid (query blocks, B*H), one query block each; 1: the same items as a 1-D grid
    in the longest-first work order; 2: a few persistent programs walking that order."""
    if GRID == 2:  # persistent programs, several items each
        for r in range(_item_rounds(ITEMS)):
            qb, b, h = _work_item(ORDER, r, H, TQ)
            _fwd_row_block(qb, b, h, Q, K, V, O, OBR, LSE, LO, HI, IMG, CUT_LO, CUT_HI, KV_NUM, KV_IDX, FULL_KV_NUM,
                           FULL_KV_IDX, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                           stride_ob, stride_oh, stride_on, stride_rbr, stride_rb, stride_rh, stride_rn,
                           stride_lse, H, GROUP, N, D, TQ, TK, qk_scale, ISOLATE_IMAGES, SPLIT, EVEN_N, BLOCK_M,
                           BLOCK_N, BLOCK_D, PRECISION, HAS_CUT, USE_TMA)
    else:
        # int64 from here on: b * stride_qb (and bh * N * branches) exceeds 2^31 once a tensor
        # holds more than 2^31 elements (B=16, H=32, N=32k, D=128), and int32 wraps on a GPU
        if GRID == 1:  # one program per item, launched longest-first
            qb, b, h = _work_item(ORDER, 0, H, TQ)
        else:
            qb, b, h = _grid_item(H)
        _fwd_row_block(qb, b, h, Q, K, V, O, OBR, LSE, LO, HI, IMG,
                       CUT_LO, CUT_HI, KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX, stride_qb, stride_qh, stride_qn,
                       stride_kb, stride_kh, stride_kn, stride_ob, stride_oh, stride_on, stride_rbr, stride_rb,
                       stride_rh, stride_rn, stride_lse, H, GROUP, N, D, TQ, TK, qk_scale, ISOLATE_IMAGES, SPLIT,
                       EVEN_N, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, HAS_CUT, USE_TMA)


# ---- backward --------------------------------------------------------------------------------
@triton.jit
def _bwd_delta(O, DO, DELTA, stride_ob, stride_oh, stride_on, stride_obr,
               stride_dob, stride_doh, stride_don, H, N, D,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[br, b, h, n] = rowsum(dO * O_branch), in fp32."""
    mb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64 offsets: see _attn_fwd
    br = tl.program_id(2)
    b = bh // H
    h = bh % H
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + br * stride_obr + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_on, N, D)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_don, N, D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (br * tl.num_programs(1) + bh) * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _ds_tile(s, dp, ok, key_is_image, lse0, delta0, lse1, delta1, SPLIT: tl.constexpr, MASKED: tl.constexpr):
    """P and dS of one tile (dS without the softmax scale), summed over the branches. The
    row statistics (lse, delta) and key_is_image come broadcastable to the tile, which is
    [query, key] (dQ) or [key, query] (dK/dV)."""
    if SPLIT:
        p0 = tl.where(ok & ~key_is_image, tl.math.exp2(s - lse0), 0.0)
        p1 = tl.where(ok & key_is_image, tl.math.exp2(s - lse1), 0.0)
        ds = p0 * (dp - delta0) + p1 * (dp - delta1)
        p = p0 + p1
    else:
        p = tl.math.exp2(s - lse0)
        if MASKED:
            p = tl.where(ok, p, 0.0)
        ds = p * (dp - delta0)
    return p, ds


@triton.jit
def _dq_tile(q, do, dq, kb, k_base, v_base, stride_kn, offs_m, lo, hi, cut_lo, cut_hi, img_q, img_base,
             N, D, qk_scale, lse0, delta0, lse1, delta1,
             IS_FULL: tl.constexpr, ISOLATE_IMAGES: tl.constexpr, SPLIT: tl.constexpr, EVEN_N: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, HAS_CUT: tl.constexpr,
             USE_TMA: tl.constexpr):
    offs_n, k, v, img_k = _load_kv_tile(kb, k_base, v_base, img_base, stride_kn, N, D, BLOCK_N, BLOCK_D, USE_TMA)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ok = _allowed(offs_m[:, None], offs_n[None, :], lo[:, None], hi[:, None], cut_lo[:, None], cut_hi[:, None],
                  img_q[:, None], img_k[None, :], N, IS_FULL, ISOLATE_IMAGES, HAS_CUT)
    p, ds = _ds_tile(s, dp, ok, img_k[None, :] != 0, lse0[:, None], delta0[:, None], lse1[:, None],
                     delta1[:, None], SPLIT, not (IS_FULL and EVEN_N))
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _row_stats(lse_base, delta_base, stride_lse, offs_m, N, SPLIT: tl.constexpr):
    """LSE and delta of query rows, per branch (branch 1 repeats branch 0 unless SPLIT)."""
    lse0 = _load_lse(lse_base, offs_m, N)
    delta0 = tl.load(delta_base + offs_m, mask=offs_m < N, other=0.0)
    lse1, delta1 = lse0, delta0
    if SPLIT:
        lse1 = _load_lse(lse_base + stride_lse, offs_m, N)
        delta1 = tl.load(delta_base + stride_lse + offs_m, mask=offs_m < N, other=0.0)
    return lse0, delta0, lse1, delta1


@triton.jit
def _dq_row_block(qb, b, h, Q, K, V, DO, DQ, LSE, DELTA, LO, HI, IMG, CUT_LO, CUT_HI,
                  KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX,
                  stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                  stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn, stride_lse,
                  H, GROUP, N, D, TQ, TK, qk_scale, sm_scale,
                  ISOLATE_IMAGES: tl.constexpr, SPLIT: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, HAS_CUT: tl.constexpr,
                  USE_TMA: tl.constexpr):
    bh = b * H + h
    hk = h // GROUP
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    q_src = _rows_src(Q + b * stride_qb + h * stride_qh, stride_qn, N, D, BLOCK_M, BLOCK_D, USE_TMA)
    do_src = _rows_src(DO + b * stride_dob + h * stride_doh, stride_don, N, D, BLOCK_M, BLOCK_D, USE_TMA)
    q = _load_tile(q_src, qb * BLOCK_M, stride_qn, N, D, BLOCK_M, BLOCK_D, USE_TMA)
    do = _load_tile(do_src, qb * BLOCK_M, stride_don, N, D, BLOCK_M, BLOCK_D, USE_TMA)
    lo, hi, cut_lo, cut_hi, img_q = _load_row_meta(LO, HI, IMG, CUT_LO, CUT_HI, b, offs_m, N, HAS_CUT)
    lse0, delta0, lse1, delta1 = _row_stats(LSE + bh * N, DELTA + bh * N, stride_lse, offs_m, N, SPLIT)
    k_base = _rows_src(K + b * stride_kb + hk * stride_kh, stride_kn, N, D, BLOCK_N, BLOCK_D, USE_TMA)
    v_base = _rows_src(V + b * stride_kb + hk * stride_kh, stride_kn, N, D, BLOCK_N, BLOCK_D, USE_TMA)
    img_base = IMG + b * N
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lists = b * TQ + qb
    for i in range(tl.load(KV_NUM + lists)):
        kb = tl.load(KV_IDX + lists * TK + i)
        dq = _dq_tile(q, do, dq, kb, k_base, v_base, stride_kn, offs_m, lo, hi, cut_lo, cut_hi, img_q,
                      img_base, N, D, qk_scale, lse0, delta0, lse1, delta1,
                      False, ISOLATE_IMAGES, SPLIT, EVEN_N, BLOCK_N, BLOCK_D, PRECISION, HAS_CUT, USE_TMA)
    for i in range(tl.load(FULL_KV_NUM + lists)):
        kb = tl.load(FULL_KV_IDX + lists * TK + i)
        dq = _dq_tile(q, do, dq, kb, k_base, v_base, stride_kn, offs_m, lo, hi, cut_lo, cut_hi, img_q,
                      img_base, N, D, qk_scale, lse0, delta0, lse1, delta1,
                      True, ISOLATE_IMAGES, SPLIT, EVEN_N, BLOCK_N, BLOCK_D, PRECISION, HAS_CUT, USE_TMA)
    dq_dst = _rows_src(DQ + b * stride_dqb + h * stride_dqh, stride_dqn, N, D, BLOCK_M, BLOCK_D, USE_TMA)
    _store_tile(dq_dst, qb * BLOCK_M, (dq * sm_scale).to(DQ.dtype.element_ty), stride_dqn, N, D, BLOCK_M, BLOCK_D,
                USE_TMA)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, LO, HI, IMG, CUT_LO, CUT_HI,
                 KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX,
                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                 stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn, stride_lse,
                 H, GROUP, N, D, TQ, TK, qk_scale, sm_scale, ORDER, ITEMS,
                 ISOLATE_IMAGES: tl.constexpr, SPLIT: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, HAS_CUT: tl.constexpr,
                 GRID: tl.constexpr, USE_TMA: tl.constexpr):
    """Grids as _attn_fwd's, over the forward's work order (its block map's)."""
    if GRID == 2:
        for r in range(_item_rounds(ITEMS)):
            qb, b, h = _work_item(ORDER, r, H, TQ)
            _dq_row_block(qb, b, h, Q, K, V, DO, DQ, LSE, DELTA, LO, HI, IMG, CUT_LO, CUT_HI, KV_NUM, KV_IDX,
                          FULL_KV_NUM, FULL_KV_IDX, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                          stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn, stride_lse, H,
                          GROUP, N, D, TQ, TK, qk_scale, sm_scale, ISOLATE_IMAGES, SPLIT, EVEN_N, BLOCK_M, BLOCK_N,
                          BLOCK_D, PRECISION, HAS_CUT, USE_TMA)
    else:
        if GRID == 1:  # one program per item, launched longest-first
            qb, b, h = _work_item(ORDER, 0, H, TQ)
        else:
            qb, b, h = _grid_item(H)
        _dq_row_block(qb, b, h, Q, K, V, DO, DQ, LSE, DELTA, LO, HI, IMG,
                      CUT_LO, CUT_HI, KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX, stride_qb, stride_qh, stride_qn,
                      stride_kb, stride_kh, stride_kn, stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh,
                      stride_dqn, stride_lse, H, GROUP, N, D, TQ, TK, qk_scale, sm_scale, ISOLATE_IMAGES, SPLIT,
                      EVEN_N, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, HAS_CUT, USE_TMA)


@triton.jit
def _dkdv_tile(k, v, dk, dv, qb, q_base, do_base, dq_base, stride_qn, stride_don, stride_dqn, lse_base,
               delta_base, stride_lse, lo_base, hi_base, img_base, cut_lo_base, cut_hi_base, offs_n, offs_d, img_k,
               N, D, qk_scale, sm_scale,
               IS_FULL: tl.constexpr, ISOLATE_IMAGES: tl.constexpr, SPLIT: tl.constexpr, EVEN_N: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, FUSED_DQ: tl.constexpr,
               HAS_CUT: tl.constexpr, TRANSPOSED_DQ: tl.constexpr, USE_TMA: tl.constexpr):
    """One query block against this program's key block, in transposed form: S^T = K Q^T
    is computed directly, so P^T and dS^T come out of the tensor cores in the layout the
    dV += P^T dO and dK += dS^T Q products take (no transposes through shared memory).
    FUSED_DQ: also dQ += dS K for these query rows, added to fp32 dQ with atomics."""
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_tile(q_base, qb * BLOCK_M, stride_qn, N, D, BLOCK_M, BLOCK_D, USE_TMA)
    do = _load_tile(do_base, qb * BLOCK_M, stride_don, N, D, BLOCK_M, BLOCK_D, USE_TMA)
    lo, hi, cut_lo, cut_hi, img_q = _load_row_meta(lo_base, hi_base, img_base, cut_lo_base, cut_hi_base, 0, offs_m,
                                                   N, HAS_CUT)  # bases are per row b
    lse0, delta0, lse1, delta1 = _row_stats(lse_base, delta_base, stride_lse, offs_m, N, SPLIT)
    st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [keys, queries]
    dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    okt = _allowed(offs_m[None, :], offs_n[:, None], lo[None, :], hi[None, :], cut_lo[None, :], cut_hi[None, :],
                   img_q[None, :], img_k[:, None], N, IS_FULL, ISOLATE_IMAGES, HAS_CUT)
    pt, dst = _ds_tile(st, dpt, okt, img_k[:, None] != 0, lse0[None, :], delta0[None, :], lse1[None, :],
                       delta1[None, :], SPLIT, not (IS_FULL and EVEN_N))
    dv = dv + tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
    dk = dk + tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    if FUSED_DQ:
        if TRANSPOSED_DQ:
            # dQ^T = K^T dS^T: its M is head_dim, not the query block (see TileConfig)
            dqt = tl.dot(tl.trans(k), dst.to(k.dtype), input_precision=PRECISION) * sm_scale  # [D, queries]
            mask = (offs_d[:, None] < D) & (offs_m[None, :] < N)
            ptrs = dq_base + offs_m.to(tl.int64)[None, :] * stride_dqn + offs_d[:, None]  # int64: _row_offsets
            tl.atomic_add(ptrs, dqt, mask=mask, sem="relaxed")
        else:
            dq = tl.dot(tl.trans(dst.to(k.dtype)), k, input_precision=PRECISION) * sm_scale
            mask = (offs_m[:, None] < N) & (offs_d[None, :] < D)
            tl.atomic_add(dq_base + _row_offsets(offs_m, offs_d, stride_dqn), dq, mask=mask, sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_column_block(kb, b, hk, Q, K, V, DO, DK, DV, DQ, LSE, DELTA, LO, HI, IMG, CUT_LO, CUT_HI,
                       Q_NUM, Q_IDX, FULL_Q_NUM, FULL_Q_IDX,
                       stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                       stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn,
                       stride_dqb, stride_dqh, stride_dqn, stride_lse,
                       H, HKV, GROUP, N, D, TQ, TK, qk_scale, sm_scale,
                       ISOLATE_IMAGES: tl.constexpr, SPLIT: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, FUSED_DQ: tl.constexpr,
                       HAS_CUT: tl.constexpr, TRANSPOSED_DQ: tl.constexpr,
                       USE_TMA: tl.constexpr):
    """dK, dV of key block kb of batch row b, kv head hk (int64: see _attn_fwd), and with
    FUSED_DQ its share of every dQ, in fp32 DQ."""
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(_rows_src(K + b * stride_kb + hk * stride_kh, stride_kn, N, D, BLOCK_N, BLOCK_D, USE_TMA),
                   kb * BLOCK_N, stride_kn, N, D, BLOCK_N, BLOCK_D, USE_TMA)
    v = _load_tile(_rows_src(V + b * stride_kb + hk * stride_kh, stride_kn, N, D, BLOCK_N, BLOCK_D, USE_TMA),
                   kb * BLOCK_N, stride_kn, N, D, BLOCK_N, BLOCK_D, USE_TMA)
    img_k = tl.load(IMG + b * N + offs_n, mask=offs_n < N, other=0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lists = b * TK + kb
    n_part = tl.load(Q_NUM + lists)
    n_full = tl.load(FULL_Q_NUM + lists)
    for g in range(GROUP):  # the q heads sharing this kv head: sums stay in registers
        h = hk * GROUP + g
        q_base = _rows_src(Q + b * stride_qb + h * stride_qh, stride_qn, N, D, BLOCK_M, BLOCK_D, USE_TMA)
        do_base = _rows_src(DO + b * stride_dob + h * stride_doh, stride_don, N, D, BLOCK_M, BLOCK_D, USE_TMA)
        dq_base = DQ + b * stride_dqb + h * stride_dqh
        lse_base = LSE + (b * H + h) * N
        delta_base = DELTA + (b * H + h) * N
        for i in range(n_part):
            qb = tl.load(Q_IDX + lists * TQ + i)
            dk, dv = _dkdv_tile(k, v, dk, dv, qb, q_base, do_base, dq_base, stride_qn, stride_don, stride_dqn,
                                lse_base, delta_base, stride_lse, LO + b * N, HI + b * N, IMG + b * N,
                                CUT_LO + b * N, CUT_HI + b * N, offs_n, offs_d, img_k, N, D, qk_scale, sm_scale,
                                False, ISOLATE_IMAGES, SPLIT, EVEN_N, BLOCK_M, BLOCK_D, PRECISION, FUSED_DQ,
                                HAS_CUT, TRANSPOSED_DQ, USE_TMA)
        for i in range(n_full):
            qb = tl.load(FULL_Q_IDX + lists * TQ + i)
            dk, dv = _dkdv_tile(k, v, dk, dv, qb, q_base, do_base, dq_base, stride_qn, stride_don, stride_dqn,
                                lse_base, delta_base, stride_lse, LO + b * N, HI + b * N, IMG + b * N,
                                CUT_LO + b * N, CUT_HI + b * N, offs_n, offs_d, img_k, N, D, qk_scale, sm_scale,
                                True, ISOLATE_IMAGES, SPLIT, EVEN_N, BLOCK_M, BLOCK_D, PRECISION, FUSED_DQ,
                                HAS_CUT, TRANSPOSED_DQ, USE_TMA)
    dk_dst = _rows_src(DK + b * stride_dkb + hk * stride_dkh, stride_dkn, N, D, BLOCK_N, BLOCK_D, USE_TMA)
    dv_dst = _rows_src(DV + b * stride_dkb + hk * stride_dkh, stride_dkn, N, D, BLOCK_N, BLOCK_D, USE_TMA)
    _store_tile(dk_dst, kb * BLOCK_N, (dk * sm_scale).to(DK.dtype.element_ty), stride_dkn, N, D, BLOCK_N, BLOCK_D,
                USE_TMA)
    _store_tile(dv_dst, kb * BLOCK_N, dv.to(DV.dtype.element_ty), stride_dkn, N, D, BLOCK_N, BLOCK_D, USE_TMA)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, DQ, LSE, DELTA, LO, HI, IMG, CUT_LO, CUT_HI,
                   Q_NUM, Q_IDX, FULL_Q_NUM, FULL_Q_IDX,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                   stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn,
                   stride_dqb, stride_dqh, stride_dqn, stride_lse,
                   H, HKV, GROUP, N, D, TQ, TK, qk_scale, sm_scale, ORDER, ITEMS,
                   ISOLATE_IMAGES: tl.constexpr, SPLIT: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, FUSED_DQ: tl.constexpr,
                   HAS_CUT: tl.constexpr, TRANSPOSED_DQ: tl.constexpr, GRID: tl.constexpr,
                   USE_TMA: tl.constexpr):
    """Grids as _attn_fwd's over (key block, B*Hkv), longest-first by the key blocks' own counts."""
    if GRID == 2:
        for r in range(_item_rounds(ITEMS)):
            kb, b, hk = _work_item(ORDER, r, HKV, TK)
            _dkdv_column_block(kb, b, hk, Q, K, V, DO, DK, DV, DQ, LSE, DELTA, LO, HI, IMG, CUT_LO, CUT_HI, Q_NUM,
                               Q_IDX, FULL_Q_NUM, FULL_Q_IDX, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
                               stride_kn, stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn,
                               stride_dqb, stride_dqh, stride_dqn, stride_lse, H, HKV, GROUP, N, D, TQ, TK, qk_scale,
                               sm_scale, ISOLATE_IMAGES, SPLIT, EVEN_N, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION,
                               FUSED_DQ, HAS_CUT, TRANSPOSED_DQ, USE_TMA)
    else:
        if GRID == 1:  # one program per item, launched longest-first
            kb, b, hk = _work_item(ORDER, 0, HKV, TK)
        else:
            kb, b, hk = _grid_item(HKV)
        _dkdv_column_block(kb, b, hk, Q, K, V, DO, DK, DV, DQ, LSE, DELTA,
                           LO, HI, IMG, CUT_LO, CUT_HI, Q_NUM, Q_IDX, FULL_Q_NUM, FULL_Q_IDX, stride_qb, stride_qh,
                           stride_qn, stride_kb, stride_kh, stride_kn, stride_dob, stride_doh, stride_don,
                           stride_dkb, stride_dkh, stride_dkn, stride_dqb, stride_dqh, stride_dqn, stride_lse, H,
                           HKV, GROUP, N, D, TQ, TK, qk_scale, sm_scale, ISOLATE_IMAGES, SPLIT, EVEN_N, BLOCK_M,
                           BLOCK_N, BLOCK_D, PRECISION, FUSED_DQ, HAS_CUT, TRANSPOSED_DQ, USE_TMA)


# ---- tile configs ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # backward tiles, fast mode: the dK/dV pass forms its dQ share as dQ^T = K^T dS^T (M =
    # head_dim; dS^T is the B operand as it stands) instead of dQ = dS K (M = the query
    # block). A wgmma needs 64 rows per warp group: below that, dS K runs as mma.sync with
    # K reloaded from shared memory into registers every tile. mma.sync parts want dS K.
    transposed_dq: bool = False
    # Q/K/V/dO tile loads and O/dQ/dK/dV stores through TMA tensor descriptors (sm90+):
    # whole tiles copied asynchronously, the tensor's bounds instead of per-element masks.
    # The launchers fall back to pointers where a tensor is not 16-byte aligned (TMA's rule).
    tma: bool = False
    # the work order of the grid (see the module docstring and persistent_grid): "plain",
    # "longest_first" (one program per item, launched longest-first) or "persistent"
    grid: str = "plain"


GRIDS = {"plain": 0, "longest_first": 1, "persistent": 2}
# persistent programs per SM. Over-subscribing is safe (a program waiting for a slot takes
# half a share: the snake order keeps both halves balanced), under-subscribing idles SMs: 2
# covers the table's kernels, 1 resident per SM at D128 (8 warps, 139-255 registers), 2 at
# D64 / D256.
PERSISTENT_PER_SM = 2
# the interpreter's "SMs": a persistent grid of a few programs, fewer than most tests' items
INTERPRETER_SMS = 3
INTERPRETER_CONFIG = TileConfig(16, 32, 4, 1, grid="persistent")
# compute capability -> ((head_dim <= bound, forward config, backward config), ...), first
# match wins. The forward (and the deterministic dQ kernel) walk the forward's block map,
# dK/dV the backward's, each at its own tiles (the backward's block_m query rows x block_n
# key rows). Chosen without a GPU from the report of the real launch (GQA 4:1, N=8192),
# `python benchmarks/attention_resources.py --matrix --candidates --fp16-bounds 128`, kept as
# benchmarks/results/attention_resources_triton3.8_2026-12-06.txt (tests/test_attention_aot.py
# asserts it) and ..._triton3.6_2026-12-06.txt (the GPU image's Triton): tensor-core
# redundancy 1.0 everywhere (64 rows per warp group: 8 warps only on 128-row products); no
# forward spill but at head_dim 256 split on sm90 (3.9 KB; Triton 3.6 adds 32 B in sm80's
# split forward); dK/dV spills <= 1 KiB up to head_dim 128 (sm90 D128: 24/16 B plain,
# 168/164 B split in the fused pass on the plain grid; 80/72 and 228 B on sm90's longest-first
# grid, the table's: the reports list both), ~3 KB at 256; within A100's 164 KiB and H100's
# 227 KiB of shared memory. Not yet tuned by timing. Other parts (sm86/89, sm120: ~100 KiB)
# get the small fallback. transposed_dq on sm90's 32- and 16-row backward tiles: every
# backward product a wgmma; at D128 the fused pass went from 84/72 B (split 172/240 B)
# of spills and 140 KB of shared memory to 24/16 B (168/164 B) and 115 KB
# (tests/test_attention_backward_aot.py); on sm80/89 dQ^T costs spills and replication.
# TMA (tma=True) on sm90's forward tiles, which the forward and the deterministic dQ kernel
# take. Against the pointer kernels (the reports before it; `--tma off` compiles them),
# Triton 3.8 / 3.6: fewer registers at every head_dim (plain forward D64 117 -> 113 /
# 125 -> 122, D128 139 -> 122 / 145 -> 122, D256 240 -> 200 / 239 -> 199; dQ D128
# 154 -> 140 / 154 -> 141), dQ spills at D256 40/40 B -> 0 (split 132/136 -> 36/60 /
# 176/192 -> 44/76), the split forward at D256 level (3.9 KB), 16-24 B more shared memory
# (the copies' mbarriers; split forward +1 KiB). Not on the dK/dV tiles: there k, v, dk,
# dv fill the 255 registers and TMA's staging raised the fused pass's spills at D128 from
# 24/16 to 276/396 B (split 168/164 -> 464/692); mixed at D64, level at D256.
_SM90 = ((64, TileConfig(128, 64, 8, 3, tma=True), TileConfig(64, 128, 8, 2)),
         (128, TileConfig(128, 32, 8, 3, tma=True), TileConfig(32, 128, 8, 2, transposed_dq=True)),
         (256, TileConfig(64, 32, 4, 2, tma=True), TileConfig(16, 64, 4, 2, transposed_dq=True)))
# sm80's mma.sync splits a dQ product of 32 or 64 query rows over 8 warps with replication
# (redundancy 1.4 / 1.2 in the report), and 16 rows over 4: its backward tiles differ
# (its forward tiles are sm90's, through pointers: no TMA before sm90)
_SM80 = ((64, TileConfig(128, 64, 8, 3), TileConfig(64, 64, 4, 2)),
         (128, TileConfig(128, 32, 8, 3), TileConfig(64, 128, 8, 2)),
         (256, TileConfig(32, 32, 4, 2), TileConfig(32, 32, 4, 2)))
_GPU_CONFIGS = {(8, 0): _SM80, (9, 0): _SM90, (10, 0): _SM90}
_FALLBACK_CONFIGS = ((64, TileConfig(64, 64, 4, 2), TileConfig(64, 64, 4, 2)),
                     (128, TileConfig(64, 32, 4, 2), TileConfig(64, 32, 4, 2)),
                     (256, TileConfig(32, 32, 4, 1), TileConfig(32, 32, 4, 1)))


def pick_config(device: torch.device, head_dim: int, backward: bool = False) -> TileConfig:
    """Tile sizes for this GPU generation and head_dim (the block map is built at them)."""
    if device.type != "cuda" or INTERPRETED:
        return INTERPRETER_CONFIG
    return gpu_config(torch.cuda.get_device_capability(device), head_dim, backward)


# The tables' grid: the work items longest-first, one program each. Not "persistent": its
# outer loop keeps every kernel argument live across the items; at sm90 D128 (Triton 3.8,
# benchmarks/results/attention_grids_sm90_triton3.8_2026-12-06.txt) forward and dQ take
# +17..45 registers and dK/dV 2-4x the spill bytes of the plain grid. The longest-first
# 1-D grid compiles like the plain one (registers equal or fewer, no forward / dQ spill;
# dK/dV spills more bytes, outside its tile loops: tests/test_attention_aot.py), and the
# makespan model (benchmarks/attention_schedule.py) gives it the persistent grid's gain
# where the hardware hands out blocks in index order (what it does; no CUDA guarantee).
# `auto` times the table's tiles on the plain grid too (candidate_configs). sm90 and newer
# only: on sm80 the split forward at D64 / D128 spilled 16-28 B with it where the plain grid
# spills none (the aot matrix run of 2026-12-06), so sm80 and the fallback parts keep the plain grid.
TABLE_GRID = "longest_first"
TABLE_GRID_FROM = (9, 0)


def gpu_config(capability: tuple[int, int], head_dim: int, backward: bool = False) -> TileConfig:
    table = _GPU_CONFIGS.get(tuple(capability), _FALLBACK_CONFIGS)
    cfg = next(bwd if backward else fwd for bound, fwd, bwd in table if head_dim <= bound)
    return replace(cfg, grid=TABLE_GRID) if tuple(capability) >= TABLE_GRID_FROM else cfg


# Alternatives (forward, backward) that `auto` times against the table's pair on the first
# call of each shape (fastvlm.ops.attention): taller query tiles amortise the k/v loads on
# long rows, shorter ones waste less on partial tiles. Kept from the same report run with
# --candidates (tests/test_attention_aot.py asserts them too): tensor-core redundancy 1.0,
# within shared memory, forward and dQ spills <= 128 B (sm90 split forward, through TMA:
# 36 / 100 B at D64 128x128 on Triton 3.8 / 3.6, 8-44 B at D128; the timing judges those),
# dK/dV <= 2 KiB. Dropped by that report: on
# sm80, D64 128x128 / 64x128 (split forward 1 KB of spills, fused dK/dV+dQ redundancy 1.2)
# and both D128 pairs (split forward 0.8-1 KB of spills); at D256 64x64 everywhere
# (forward 4-30 KB, dK/dV 4-55 KB of spills).
_SM90_ALTERNATIVES = (  # forward tiles through TMA, as the table's
    (64, ((TileConfig(128, 128, 8, 2, tma=True), TileConfig(64, 128, 8, 2)),
          (TileConfig(64, 64, 4, 3, tma=True), TileConfig(64, 64, 4, 2)))),
    (128, ((TileConfig(128, 64, 8, 3, tma=True), TileConfig(64, 128, 8, 2)),
           (TileConfig(64, 64, 4, 3, tma=True), TileConfig(64, 64, 4, 2)))))
_SM80_ALTERNATIVES = ((64, ((TileConfig(64, 64, 4, 3), TileConfig(64, 64, 4, 2)),)),)
_ALTERNATIVES = {(8, 0): _SM80_ALTERNATIVES, (9, 0): _SM90_ALTERNATIVES, (10, 0): _SM90_ALTERNATIVES}


def candidate_configs(capability: tuple[int, int], head_dim: int) -> tuple[tuple[TileConfig, TileConfig], ...]:
    """(forward, backward) pairs: the table's first, then the alternatives worth timing on this part."""
    table = _ALTERNATIVES.get(tuple(capability), ())
    extra = next((pairs for bound, pairs in table if head_dim <= bound), ())
    first = (gpu_config(capability, head_dim), gpu_config(capability, head_dim, backward=True))
    # the table's tiles on the plain grid too: the longest-first order's gain is a model's
    # (benchmarks/attention_schedule.py) until timed; the kernels are the same code per item
    plain = tuple(replace(c, grid="plain") for c in first)
    return (first,) + tuple(c for c in (*extra, plain) if c != first)


def persistent_grid(cfg: TileConfig, device: torch.device, items: int, uniform) -> int:
    """The launchers' `programs` for `items` work items: 0 the plain grid, -1 one program per
    item in the longest-first order, P > 0 that many persistent programs. uniform: a callable
    giving whether every item has the same tile count (True), not (False) or unknown (None);
    called only when the rest of the rule passes, since it may wait on the device. The rule:
    the config's grid where the items fill more than one round of PERSISTENT_PER_SM programs
    per SM (within one round every item starts at once and the order changes nothing) and
    the work is not uniform: with equal items (full bidirectional rows, a window) the
    hardware's own block scheduler already balances them, and the plain grid saves the
    order lookups (and the persistent loop's registers). Else the plain grid."""
    if cfg.grid not in GRIDS:
        raise ValueError(f"cfg.grid: expected one of {sorted(GRIDS)}, got {cfg.grid!r}")
    if cfg.grid == "plain":
        return 0
    programs = PERSISTENT_PER_SM * multiprocessors(device)
    if items <= programs or uniform() is True:
        return 0
    return programs if cfg.grid == "persistent" else -1


def multiprocessors(device: torch.device) -> int:
    if device.type != "cuda" or INTERPRETED:
        return INTERPRETER_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# ---- launchers -------------------------------------------------------------------------------
def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Kernels need a unit stride along head_dim; anything else is copied once."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_block_map(n: int, cfg: TileConfig, num: torch.Tensor, idx: torch.Tensor, transposed=False):
    """The kernels take their grid and list widths from the map's shapes: a map built at
    other tile sizes than cfg would silently skip or misplace rows and columns."""
    want = (triton.cdiv(n, cfg.block_m), triton.cdiv(n, cfg.block_n))
    got = (num.shape[1], idx.shape[2])
    if transposed:
        want = want[::-1]
    if got != want:
        raise ValueError(f"block map: {got[0]} x {got[1]} tiles, expected {want[0]} x {want[1]} for "
                         f"N={n} at block_m={cfg.block_m}, block_n={cfg.block_n}; build it with "
                         f"layout.block_map(cfg.block_m, cfg.block_n)")


def kernel_inputs(q, k, v):
    """k and v share one set of strides in the kernels (true for views of one packed qkv too)."""
    q, k, v = _rows(q), _rows(k), _rows(v)
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    return q, k, v


@dataclass(frozen=True)
class Launch:
    """One kernel launch exactly as a launcher makes it (grid, arguments, constexprs and
    options): run it, or hand it to benchmarks/attention_resources.py, which compiles the
    kernel with the specialisation this launch gets, without a GPU."""
    kernel: object  # a triton.jit function
    grid: tuple
    args: tuple
    kwargs: dict

    def __call__(self):
        if self.kwargs.get("USE_TMA") and not INTERPRETED:
            with _tma_scratch():
                self.kernel[self.grid](*self.args, **self.kwargs)
        else:
            self.kernel[self.grid](*self.args, **self.kwargs)


@contextlib.contextmanager
def _tma_scratch():
    """Descriptors made on the device (tl.make_tensor_descriptor) are written to a global
    scratch buffer that Triton asks an allocator for at launch; without one set
    (triton.set_allocator) the launch raises. A caller's own allocator is kept, else a
    torch one serves this launch only (the allocator is a context variable)."""
    from triton.runtime import _allocation
    if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        yield
        return
    token = _allocation._allocator.set(_torch_scratch)
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _tma_ready(cfg: TileConfig, *tensors: torch.Tensor) -> bool:
    """Whether the kernels may take these [B, H, N, D] tensors through TMA descriptors: each
    (batch, head) slice is one descriptor, and TMA wants its base address and row stride
    in 16-byte multiples (the unit stride on D the launchers already ensure)."""
    if not cfg.tma or (tensors[0].is_cuda and torch.cuda.get_device_capability(tensors[0].device) < (9, 0)):
        return False  # TMA is sm90's; a tma config on an older part takes the pointer path
    for t in tensors:
        if t.numel() == 0:
            continue
        size = t.element_size()
        if t.data_ptr() % 16 or any(st * size % 16 for st in t.stride()[:-1]):
            return False
    return True


def attention_forward(q, k, v, lo, hi, is_image, kv_num, kv_idx, full_kv_num, full_kv_idx, *,
                      kind: int, split: bool, scale: float, cfg: TileConfig, out=None, cut=None,
                      order=None, programs: int = 0):
    """Returns (out, branch_outs or empty, lse [branches, B, H, N] in log2 units).

    q [B, H, N, D], k/v [B, Hkv, N, D], any strides with unit stride on D; out
    is allocated like q (same strides) unless given. cut: the layout's (int32 [2, B, N]) or None.
    programs (persistent_grid's): 0 one program per row block and head; -1 the same in the
    longest-first `order` (the block map's row_order(): every (batch, row block) once); P > 0
    P persistent programs walking it.
    """
    *outputs, launches = forward_launches(q, k, v, lo, hi, is_image, kv_num, kv_idx, full_kv_num, full_kv_idx,
                                          kind=kind, split=split, scale=scale, cfg=cfg, out=out, cut=cut,
                                          order=order, programs=programs)
    for launch in launches:
        launch()
    return tuple(outputs)


def _cut_rows(cut, lo, hi):
    """(cut_lo, cut_hi) pointers of the kernels: the cut's rows, or lo / hi (never read)."""
    return (lo, hi) if cut is None else (cut[0], cut[1])


def _grid(programs: int, order, blocks: int, batch: int, heads: int, what: str):
    """The launch grid and the kernels' (ORDER, ITEMS, GRID) for `programs` (persistent_grid's):
    plain (blocks, batch * heads); or the blocks * batch * heads items in `order`, one program
    each (-1) or over `programs` persistent programs."""
    if programs == 0:
        return (blocks, batch * heads), (None, 0, GRIDS["plain"])
    if order is None or order.dtype != torch.int32 or tuple(order.shape) != (batch * blocks,):
        raise ValueError(f"{what}: a longest-first grid needs the block map's int32 order of its {batch} x "
                         f"{blocks} (batch, block) entries, got "
                         f"{None if order is None else (tuple(order.shape), order.dtype)}")
    items = blocks * batch * heads
    if programs < 0:
        return (items,), (order, items, GRIDS["longest_first"])
    return (programs,), (order, items, GRIDS["persistent"])


def forward_launches(q, k, v, lo, hi, is_image, kv_num, kv_idx, full_kv_num, full_kv_idx, *,
                     kind: int, split: bool, scale: float, cfg: TileConfig, out=None, cut=None,
                     order=None, programs: int = 0):
    """attention_forward's outputs (allocated, not yet written) and its launches."""
    q, k, v = kernel_inputs(q, k, v)
    b, h, n, d = q.shape
    hkv = k.shape[1]
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(2 if split else 1, b, h, n, dtype=torch.float32, device=q.device)
    # branch outputs, kept for the per-branch delta of backward
    obr = torch.empty((2 if split else 0, b, h, n, d), dtype=q.dtype, device=q.device)
    _check_block_map(n, cfg, kv_num, kv_idx)
    tq, tk = kv_num.shape[1], kv_idx.shape[2]
    img = is_image.view(torch.uint8)
    # the flat (b, row block) lists of the map: b * tq entries (tq per batch row)
    grid, (order, items, grid_code) = _grid(programs, order, tq, b, h, "order")
    order = kv_num if order is None else order  # a pointer the plain grid never reads
    launch = Launch(_attn_fwd, grid, (
        q, k, v, out, obr, lse, lo, hi, img, *_cut_rows(cut, lo, hi), kv_num, kv_idx, full_kv_num, full_kv_idx,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2), obr.stride(0), obr.stride(1), obr.stride(2),
        obr.stride(3), b * h * n,
        h, h // hkv, n, d, tq, tk, scale * LOG2E, order, items), dict(
        ISOLATE_IMAGES=kind in IMAGE_ISOLATING_KINDS, SPLIT=split, EVEN_N=n % cfg.block_n == 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=_block_d(d), PRECISION=_precision(q.dtype),
        HAS_CUT=cut is not None, USE_TMA=_tma_ready(cfg, q, k, v, out, obr), GRID=grid_code,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return out, obr, lse, [launch]


def attention_backward(dout, q, k, v, out, obr, lse, lo, hi, is_image, kv_num, kv_idx, full_kv_num,
                       full_kv_idx, q_num, q_idx, full_q_num, full_q_idx, *, kind: int, split: bool,
                       scale: float, cfg: TileConfig, dkdv_cfg: TileConfig | None = None, grads=None,
                       deterministic: bool = False, cut=None, row_order=None, col_order=None,
                       programs: int = 0, dkdv_programs: int = 0):
    """Returns (dq, dk, dv); grads, if given, are the preallocated output tensors. The kv
    lists are the forward's block map (cfg's tiles: the dQ kernel runs at them), the q lists
    the backward's (dkdv_cfg's tiles, default cfg: the dK/dV kernel's). programs /
    dkdv_programs (as attention_forward's): the dQ kernel walks the forward map's row_order (the
    forward's order, reused), the dK/dV kernel the backward map's column_order.

    deterministic=False: one dK/dV pass that also adds each tile's dQ share to an fp32
    buffer with atomics (5 matrix products per tile; the order of those fp32 additions
    varies run to run). deterministic=True: a dQ kernel (3 products per tile) and a dK/dV
    kernel (4), every gradient element written by one program: bitwise-reproducible."""
    *grads, steps = backward_launches(
        dout, q, k, v, out, obr, lse, lo, hi, is_image, kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx,
        full_q_num, full_q_idx, kind=kind, split=split, scale=scale, cfg=cfg, dkdv_cfg=dkdv_cfg, grads=grads,
        deterministic=deterministic, cut=cut, row_order=row_order, col_order=col_order, programs=programs,
        dkdv_programs=dkdv_programs)
    for step in steps:
        step()
    return tuple(grads)


def backward_launches(dout, q, k, v, out, obr, lse, lo, hi, is_image, kv_num, kv_idx, full_kv_num,
                      full_kv_idx, q_num, q_idx, full_q_num, full_q_idx, *, kind: int, split: bool,
                      scale: float, cfg: TileConfig, dkdv_cfg: TileConfig | None = None, grads=None,
                      deterministic: bool = False, cut=None, row_order=None, col_order=None,
                      programs: int = 0, dkdv_programs: int = 0):
    """attention_backward's gradients (allocated, not yet written) and its steps, in order:
    kernel launches (Launch) and, in the fused mode, the final copy of fp32 dQ."""
    q, k, v = kernel_inputs(q, k, v)
    dout = _rows(dout)
    b, h, n, d = q.shape
    hkv = k.shape[1]
    branches = 2 if split else 1
    block_d = _block_d(d)
    dq, dk, dv = grads if grads is not None else (torch.empty_like(q), torch.empty_like(k),
                                                  torch.empty_like(v))
    if dk.stride() != dv.stride():
        raise ValueError("dk, dv: expected equal strides")
    dkdv_cfg = cfg if dkdv_cfg is None else dkdv_cfg
    _check_block_map(n, cfg, kv_num, kv_idx)  # before any launch
    _check_block_map(n, dkdv_cfg, q_num, q_idx, transposed=True)
    delta = torch.empty(branches, b, h, n, dtype=torch.float32, device=q.device)
    src = obr if split else out[None]
    steps = [Launch(_bwd_delta, (triton.cdiv(n, 64), b * h, branches), (
        src, dout, delta, src.stride(1), src.stride(2), src.stride(3), src.stride(0),
        dout.stride(0), dout.stride(1), dout.stride(2), h, n, d), dict(BLOCK_M=64, BLOCK_D=block_d))]
    img = is_image.view(torch.uint8)

    def constexprs(c: TileConfig, grid_code: int):
        return dict(ISOLATE_IMAGES=kind in IMAGE_ISOLATING_KINDS, SPLIT=split, EVEN_N=n % c.block_n == 0,
                    BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=block_d, PRECISION=_precision(q.dtype),
                    HAS_CUT=cut is not None, USE_TMA=_tma_ready(c, q, k, v, dout, dq, dk, dv), GRID=grid_code,
                    # backward loops stage q and dO tiles (twice the forward's bytes): at most 2 stages
                    num_warps=c.num_warps, num_stages=min(c.num_stages, 2))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               dout.stride(0), dout.stride(1), dout.stride(2))
    if deterministic:
        dq_sum = dq
        tq, tk = kv_num.shape[1], kv_idx.shape[2]
        grid, (order, items, grid_code) = _grid(programs, row_order, tq, b, h, "row_order")
        steps.append(Launch(_attn_bwd_dq, grid, (
            q, k, v, dout, dq, lse, delta, lo, hi, img, *_cut_rows(cut, lo, hi), kv_num, kv_idx, full_kv_num,
            full_kv_idx,
            *strides, dq.stride(0), dq.stride(1), dq.stride(2), b * h * n,
            h, h // hkv, n, d, tq, tk, scale * LOG2E, scale, kv_num if order is None else order, items),
            constexprs(cfg, grid_code)))
    else:  # dQ summed over key blocks by atomics, in fp32, then rounded once
        dq_sum = torch.zeros(b, h, n, d, dtype=torch.float32, device=q.device)
    tk, tq = q_num.shape[1], q_idx.shape[2]
    grid, (order, items, grid_code) = _grid(dkdv_programs, col_order, tk, b, hkv, "col_order")
    steps.append(Launch(_attn_bwd_dkdv, grid, (
        q, k, v, dout, dk, dv, dq_sum, lse, delta, lo, hi, img, *_cut_rows(cut, lo, hi), q_num, q_idx, full_q_num,
        full_q_idx,
        *strides, dk.stride(0), dk.stride(1), dk.stride(2), dq_sum.stride(0), dq_sum.stride(1), dq_sum.stride(2),
        b * h * n, h, hkv, h // hkv, n, d, tq, tk, scale * LOG2E, scale, q_num if order is None else order, items),
        dict(constexprs(dkdv_cfg, grid_code), FUSED_DQ=not deterministic,
             TRANSPOSED_DQ=dkdv_cfg.transposed_dq and not deterministic)))
    if not deterministic:
        steps.append(lambda: dq.copy_(dq_sum))
    return dq, dk, dv, steps
