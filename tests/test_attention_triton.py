"""Triton multimodal attention vs the float64 dense reference.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest) at tiny
sizes, fp32 and fp16 only (the interpreter's bf16 tl.dot is wrong); the
bf16 matrix at realistic sizes is marked `gpu`.
"""
import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from fastvlm.kernels import attention as kernels
from fastvlm.ops import AttentionLayout, multimodal_attention, multimodal_attention_varlen
from fastvlm.ops import attention as attention_ops
from fastvlm.ops.attention import attention_reference
from fastvlm.ops.backend import resolve_backend
from tests.layouts import attention_grads, attention_grads_in_dtype, random_layout, random_metadata
from tests.utils import assert_close, poisoned

ROOT = Path(__file__).resolve().parents[1]

KIND_CASES = [("causal", False), ("prefix_lm", False), ("image_bidirectional", False),
              ("mmca", False), ("mmca", True)]
KIND_IDS = ["causal", "prefix_lm", "image_bidirectional", "mmca", "mmca_split"]


def layout_for(seed: int, kind: str, split: bool, batch: int, n: int, device="cpu") -> AttentionLayout:
    return random_layout(random.Random(seed), batch, n, kind, split, device=device)


def reference_grads(q, k, v, dout, layout, scale):
    dense = lambda *a: attention_reference(*a[:4], scale=a[4], impl="dense")  # noqa: E731
    return attention_grads(dense, q, k, v, dout, layout, scale, torch.float64)


# the interpreter's backward tiles: other than the forward's, so the two block maps differ;
# the fast pass forms dQ = dS K, or dQ^T = K^T dS^T with transposed_dq (sm90's small tiles)
INTERPRETER_BWD_CONFIG = kernels.TileConfig(32, 16, 4, 1)
INTERPRETER_BWD_TRANSPOSED_DQ = kernels.TileConfig(32, 16, 4, 1, transposed_dq=True)


def run_kernels(q, k, v, dout, layout, scale, cfg=kernels.INTERPRETER_CONFIG, bwd_cfg=None, deterministic=False):
    """Forward + backward through the launchers, every output buffer NaN-poisoned first.
    The forward (and the deterministic dQ kernel) walk cfg's block map, dK/dV bwd_cfg's."""
    bwd_cfg = cfg if bwd_cfg is None else bwd_cfg
    bm, bwd_bm = layout.block_map(cfg.block_m, cfg.block_n), layout.block_map(bwd_cfg.block_m, bwd_cfg.block_n)
    meta = (layout.lo, layout.hi, layout.is_image)
    kw = dict(kind=layout.kind_code, split=layout.split_softmax, scale=scale, cfg=cfg, cut=layout.cut)
    out, obr, lse = kernels.attention_forward(q, k, v, *meta, *bm.tensors[:4], out=poisoned(like=q), **kw)
    grads = tuple(poisoned(like=t) for t in (q, k, v))
    grads = kernels.attention_backward(dout, q, k, v, out, obr, lse, *meta, *bm.tensors[:4], *bwd_bm.tensors[4:],
                                       grads=grads, dkdv_cfg=bwd_cfg, deterministic=deterministic, **kw)
    return out, *grads


def make_inputs(batch, hq, hkv, n, d, dtype, device="cpu"):
    q = torch.randn(batch, hq, n, d, device=device).to(dtype)
    k = torch.randn(batch, hkv, n, d, device=device).to(dtype)
    v = torch.randn(batch, hkv, n, d, device=device).to(dtype)
    return q, k, v, torch.randn(batch, hq, n, d, device=device).to(dtype)


def check_against_reference(layout, q, k, v, dout, results, scale=None):
    """out, dq, dk, dv vs float64, each bound by plain PyTorch attention in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    want = reference_grads(q, k, v, dout, layout, scale)
    base = attention_grads_in_dtype(q, k, v, dout, layout, scale)
    for name, got, ref, b in zip(("out", "dq", "dk", "dv"), results, want, base):
        assert got.dtype == q.dtype, name
        assert_close(got, ref, b, name=name)
    dead = layout.hi < layout.lo  # rows that attend to nothing: exactly 0 out and dq
    out, dq = results[0], results[1]
    assert (out.transpose(1, 2)[dead] == 0).all() and (dq.transpose(1, 2)[dead] == 0).all()


# (batch, q heads, kv heads, N, head_dim, dtype): GQA, odd N and N filling its blocks (96),
# non-power-of-two head_dim
SHAPES = [(2, 4, 2, 77, 64, torch.float32), (1, 2, 1, 96, 80, torch.float16),
          (1, 2, 2, 45, 128, torch.float32), (2, 3, 1, 129, 32, torch.float16),
          (1, 2, 1, 40, 256, torch.float16)]


def shape_id(s):
    return f"B{s[0]}H{s[1]}/{s[2]}N{s[3]}D{s[4]}-{s[5]}".replace("torch.", "")


# the fused backward (the default) at every shape, its dQ^T form (transposed_dq) at two of
# them (fp32 GQA at an odd N, fp16 at head_dim 256); the deterministic one (its dQ kernel
# is the only code it does not share) at the two GQA shapes, fp32 and fp16
MODES = ([(s, "fused_dq", INTERPRETER_BWD_CONFIG) for s in SHAPES]
         + [(s, "fused_dqT", INTERPRETER_BWD_TRANSPOSED_DQ) for s in (SHAPES[0], SHAPES[4])]
         + [(s, "deterministic", INTERPRETER_BWD_CONFIG) for s in (SHAPES[0], SHAPES[3])])


@pytest.mark.parametrize("shape,mode,bwd_cfg", MODES, ids=[f"{shape_id(s)}-{mode}" for s, mode, _ in MODES])
@pytest.mark.parametrize("kind,split", KIND_CASES, ids=KIND_IDS)
def test_kernels_match_reference(kind, split, shape, mode, bwd_cfg, seed):
    """Both backward modes: the single dK/dV pass that adds dQ with fp32 atomics (5 products;
    dQ = dS K or dQ^T = K^T dS^T) and the deterministic dQ + dK/dV kernels, at backward
    tiles other than the forward's."""
    batch, hq, hkv, n, d, dtype = shape
    layout = layout_for(seed, kind, split, batch, n)
    q, k, v, dout = make_inputs(batch, hq, hkv, n, d, dtype)
    results = run_kernels(q, k, v, dout, layout, d ** -0.5, bwd_cfg=bwd_cfg, deterministic=mode == "deterministic")
    check_against_reference(layout, q, k, v, dout, results)


@pytest.mark.parametrize("deterministic", [False, True])
def test_public_op_autograd_matches_launchers(deterministic, seed):
    layout = layout_for(seed, "mmca", True, 2, 70)
    q, k, v, dout = make_inputs(2, 4, 2, 70, 64, torch.float32)
    k = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # head_dim not unit-stride: copied once
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = multimodal_attention(*leaves, layout, backend="triton", scale=0.1, deterministic=deterministic)
    assert out.stride() == q.stride()
    out.backward(dout)
    check_against_reference(layout, q, k, v, dout, (out.detach(), *(t.grad for t in leaves)), scale=0.1)


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the poisoned rows themselves, in the interpreter
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_empty_tiles_are_never_visited(device, seed):
    """NaN in every k/v row that only empty tiles of a query block touch (and in every q/dO
    row that only empty tiles of a kv block touch) must not reach that block's results."""
    d = 32
    cfg = kernels.pick_config(torch.device(device), d)
    x = cfg.block_m // 16  # the same geometry in tiles at the GPU's tile size
    n = 150 * x
    layout = AttentionLayout.from_lengths([[70 * x, 80 * x]], n, kind="mmca", device=device,
                                          image_spans=[[(10 * x, 30 * x), (90 * x, 40 * x)]])
    classes = layout.block_map(cfg.block_m, cfg.block_n).tile_classes()[0].cpu()
    q, k, v, dout = make_inputs(1, 1, 1, n, d, torch.float32, device)
    clean = run_kernels(q, k, v, dout, layout, d ** -0.5, cfg)
    mixed_q = [qb for qb in range(classes.shape[0]) if (classes[qb] == 0).any() and (classes[qb] > 0).any()]
    mixed_k = [kb for kb in range(classes.shape[1])
               if (classes[:, kb] == 0).any() and (classes[:, kb] > 0).any()]
    assert len(mixed_q) >= 2 and len(mixed_k) >= 2
    block_rows = lambda blk, size: torch.arange(blk * size, min(n, (blk + 1) * size))  # noqa: E731
    for qb in (mixed_q[0], mixed_q[-1]):
        keys = torch.cat([block_rows(kb, cfg.block_n) for kb in range(classes.shape[1]) if classes[qb, kb] == 0])
        k2, v2 = k.clone(), v.clone()
        k2[:, :, keys.to(device)] = float("nan")
        v2[:, :, keys.to(device)] = float("nan")
        out, dq, _, _ = run_kernels(q, k2, v2, dout, layout, d ** -0.5, cfg)
        rows = slice(qb * cfg.block_m, (qb + 1) * cfg.block_m)
        assert torch.equal(out[:, :, rows], clean[0][:, :, rows])
        assert torch.equal(dq[:, :, rows], clean[1][:, :, rows])
    for kb in (mixed_k[0], mixed_k[-1]):
        queries = torch.cat([block_rows(qb, cfg.block_m) for qb in range(classes.shape[0]) if classes[qb, kb] == 0])
        q2, do2 = q.clone(), dout.clone()
        q2[:, :, queries.to(device)] = float("nan")
        do2[:, :, queries.to(device)] = float("nan")
        _, _, dk, dv = run_kernels(q2, k, v, do2, layout, d ** -0.5, cfg)
        cols = slice(kb * cfg.block_n, (kb + 1) * cfg.block_n)
        assert torch.equal(dk[:, :, cols], clean[2][:, :, cols])
        assert torch.equal(dv[:, :, cols], clean[3][:, :, cols])


# ---- TMA tensor descriptors ------------------------------------------------------------------
# TileConfig.tma (sm90's table): the Q/K/V/dO tiles come through tl.make_tensor_descriptor,
# whose bounds zero-fill rows past N and columns past D and clip the O/dQ/dK/dV stores. The
# interpreter runs descriptors with their bounds, so that path is checked here like the
# pointer one: GQA at an odd N (D64), head_dim 80 in a 128-wide block, D128 at N=45.
def with_tma(cfg):
    return dataclasses.replace(cfg, tma=True)


TMA_MODES = ([(s, "fused_dq", with_tma(INTERPRETER_BWD_CONFIG)) for s in SHAPES[:3]]
             + [(SHAPES[0], "fused_dqT", with_tma(INTERPRETER_BWD_TRANSPOSED_DQ)),
                (SHAPES[1], "deterministic", with_tma(INTERPRETER_BWD_CONFIG))])


def record_tma(monkeypatch) -> list:
    """(kernel, USE_TMA) of every launch from now on: which path the launchers chose."""
    seen = []
    call = kernels.Launch.__call__

    def recording(self):
        seen.append((self.kernel.__name__, self.kwargs.get("USE_TMA")))
        call(self)
    monkeypatch.setattr(kernels.Launch, "__call__", recording)
    return seen


@pytest.mark.parametrize("shape,mode,bwd_cfg", TMA_MODES, ids=[f"{shape_id(s)}-{mode}" for s, mode, _ in TMA_MODES])
@pytest.mark.parametrize("kind,split", KIND_CASES, ids=KIND_IDS)
def test_tma_kernels_match_reference(kind, split, shape, mode, bwd_cfg, seed, monkeypatch):
    batch, hq, hkv, n, d, dtype = shape
    layout = layout_for(seed, kind, split, batch, n)
    q, k, v, dout = make_inputs(batch, hq, hkv, n, d, dtype)
    seen = record_tma(monkeypatch)
    results = run_kernels(q, k, v, dout, layout, d ** -0.5, cfg=with_tma(kernels.INTERPRETER_CONFIG),
                          bwd_cfg=bwd_cfg, deterministic=mode == "deterministic")
    check_against_reference(layout, q, k, v, dout, results)
    tiled = [use for name, use in seen if name != "_bwd_delta"]
    # the forward, dK/dV (+dQ) and the deterministic mode's dQ kernel: all through descriptors
    assert len(tiled) == (3 if mode == "deterministic" else 2) and all(tiled), seen


def test_tma_falls_back_to_pointers_where_unaligned(seed, monkeypatch):
    """TMA wants 16-byte row strides: head_dim 36 in fp16 (72-byte rows) takes the pointer path."""
    layout = layout_for(seed, "mmca", True, 1, 45)
    q, k, v, dout = make_inputs(1, 2, 1, 45, 36, torch.float16)
    seen = record_tma(monkeypatch)
    results = run_kernels(q, k, v, dout, layout, 36 ** -0.5, cfg=with_tma(kernels.INTERPRETER_CONFIG),
                          bwd_cfg=with_tma(INTERPRETER_BWD_CONFIG))
    check_against_reference(layout, q, k, v, dout, results)
    assert seen and not any(use for _, use in seen), seen


def test_tma_flags_reach_the_kernels_through_the_custom_ops(seed, monkeypatch):
    """The autograd path rebuilds the tile configs from the custom ops' arguments: the
    forward's and the backward's tma flags must survive that, each for its own kernels."""
    layout = layout_for(seed, "image_bidirectional", False, 2, 50)
    q, k, v, dout = make_inputs(2, 4, 2, 50, 64, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    seen = record_tma(monkeypatch)
    cfgs = (with_tma(kernels.INTERPRETER_CONFIG), INTERPRETER_BWD_CONFIG)  # forward through TMA, dK/dV not
    out = attention_ops._triton_attention(*leaves, layout, 64 ** -0.5, cfgs, False)
    out.backward(dout)
    check_against_reference(layout, q, k, v, dout, (out.detach(), *(t.grad for t in leaves)))
    assert [use for name, use in seen if name != "_bwd_delta"] == [True, False], seen


# ---- persistent, longest-first grid -----------------------------------------------------------
def run_persistent(q, k, v, dout, layout, scale, programs, dkdv_programs, deterministic, bwd_cfg=None):
    """run_kernels on the longest-first grids (programs -1) or on persistent grids of `programs`
    (forward, dQ) and `dkdv_programs` (dK/dV) programs."""
    cfg = kernels.INTERPRETER_CONFIG
    bwd_cfg = INTERPRETER_BWD_CONFIG if bwd_cfg is None else bwd_cfg
    bm, bwd_bm = layout.block_map(cfg.block_m, cfg.block_n), layout.block_map(bwd_cfg.block_m, bwd_cfg.block_n)
    meta = (layout.lo, layout.hi, layout.is_image)
    kw = dict(kind=layout.kind_code, split=layout.split_softmax, scale=scale, cfg=cfg, cut=layout.cut)
    out, obr, lse = kernels.attention_forward(q, k, v, *meta, *bm.tensors[:4], out=poisoned(like=q),
                                              order=bm.row_order(), programs=programs, **kw)
    grads = kernels.attention_backward(dout, q, k, v, out, obr, lse, *meta, *bm.tensors[:4], *bwd_bm.tensors[4:],
                                       grads=tuple(poisoned(like=t) for t in (q, k, v)), dkdv_cfg=bwd_cfg,
                                       deterministic=deterministic, row_order=bm.row_order(),
                                       col_order=bwd_bm.column_order(), programs=programs,
                                       dkdv_programs=dkdv_programs, **kw)
    return out, *grads


# GQA, N = 77 (fp32) and 129 (fp16): neither a multiple of a block; packed rows with padding.
# Longest-first one program per item; persistent with fewer programs than items (each takes
# several, in snake order) and with more (some take none)
GRID_CASES = [("causal", False, SHAPES[0], "fewer"), ("causal", False, SHAPES[3], "more"),
              ("causal", False, SHAPES[3], "longest_first"), ("mmca", True, SHAPES[3], "fewer"),
              ("mmca", True, SHAPES[0], "more"), ("mmca", True, SHAPES[0], "longest_first"),
              ("image_bidirectional", False, SHAPES[0], "fewer")]


@pytest.mark.parametrize("kind,split,shape,programs", GRID_CASES,
                         ids=[f"{k}{'_split' * s}-{shape_id(sh)}-{p}" for k, s, sh, p in GRID_CASES])
def test_longest_first_grids_match_reference(kind, split, shape, programs, seed):
    """Forward, fast and deterministic backward on the longest-first and persistent grids:
    float64-reference close, and the deterministic backward (and the forward) bitwise those
    of the plain grid: each item is the plain grid's program, unchanged."""
    batch, hq, hkv, n, d, dtype = shape
    layout = layout_for(seed, kind, split, batch, n)
    q, k, v, dout = make_inputs(batch, hq, hkv, n, d, dtype)
    cfg = kernels.INTERPRETER_CONFIG
    items = batch * hq * -(-n // cfg.block_m), batch * hkv * -(-n // INTERPRETER_BWD_CONFIG.block_n)
    progs = {"fewer": (3, 2), "more": (items[0] + 5, items[1] + 3), "longest_first": (-1, -1)}[programs]
    if programs != "longest_first":
        assert (progs[0] < items[0] and progs[1] < items[1]) == (programs == "fewer")
    plain = run_kernels(q, k, v, dout, layout, d ** -0.5, bwd_cfg=INTERPRETER_BWD_CONFIG, deterministic=True)
    for deterministic in (True, False):
        got = run_persistent(q, k, v, dout, layout, d ** -0.5, *progs, deterministic)
        check_against_reference(layout, q, k, v, dout, got)
        same = got if deterministic else got[:1]
        assert all(torch.equal(a, b) for a, b in zip(same, plain)), f"deterministic={deterministic}"


def test_persistent_grid_fused_dq_transposed(seed):
    """The fast backward's dQ^T form (sm90's small tiles) on a persistent dK/dV grid, head_dim 256."""
    batch, hq, hkv, n, d, dtype = SHAPES[4]
    layout = layout_for(seed, "mmca", True, batch, n)
    q, k, v, dout = make_inputs(batch, hq, hkv, n, d, dtype)
    got = run_persistent(q, k, v, dout, layout, d ** -0.5, 2, 2, False, bwd_cfg=INTERPRETER_BWD_TRANSPOSED_DQ)
    check_against_reference(layout, q, k, v, dout, got)


@triton.jit
def _count_items(ORDER, COUNT, ITEMS, HEADS, BLOCKS):
    """What a persistent program of the kernels visits: +1 per (block, batch*head) item."""
    for r in range(kernels._item_rounds(ITEMS)):
        blk, b, h = kernels._work_item(ORDER, r, HEADS, BLOCKS)
        tl.atomic_add(COUNT + (b * HEADS + h) * BLOCKS + blk, 1)
        tl.store(COUNT + ITEMS + tl.program_id(0), r + 1)  # how many items this program took


@pytest.mark.parametrize("kind", ["causal", "mmca", "prefix_lm"])
def test_work_order_is_longest_first_and_covers_every_item_once(kind, seed):
    """row_order / column_order: each (batch, block) once, by non-increasing tile count; the
    kernels' persistent programs (their own _item_rounds / _work_item) visit every (batch,
    head, block) item exactly once for program counts below, at and above the items, and a
    program's count of items differs from another's by at most one."""
    rng = random.Random(seed)
    layout = layout_for(seed, kind, False, 3, rng.randint(40, 200))
    bm = layout.block_map(16, 32)
    for order, num, full in ((bm.row_order(), bm.kv_num_blocks, bm.full_kv_num_blocks),
                             (bm.column_order(), bm.q_num_blocks, bm.full_q_num_blocks)):
        counts = (num + full).flatten()
        assert order.dtype == torch.int32 and torch.equal(order.sort().values, torch.arange(counts.numel(),
                                                                                            dtype=torch.int32))
        assert (counts[order.long()].diff() <= 0).all()
        assert order is (bm.row_order() if num is bm.kv_num_blocks else bm.column_order())  # cached
        blocks = num.shape[1]
        heads = rng.randint(1, 4)
        items = order.numel() * heads
        for programs in (1, 2, rng.randint(3, items), items, items + rng.randint(1, 9)):
            count = torch.zeros(items + programs, dtype=torch.int32)
            _count_items[(programs,)](order, count, items, heads, blocks)
            assert torch.equal(count[:items], torch.ones(items, dtype=torch.int32)), programs
            taken = count[items:]
            assert int(taken.max()) - int(taken.min()) <= 1 and int(taken.sum()) == items, programs


def test_persistent_grid_rule(seed):
    """persistent_grid: the plain grid where the config asks for none, where the items fit one
    round of programs, or where every item has the same work (asked only then)."""
    cpu = torch.device("cpu")
    programs = kernels.INTERPRETER_SMS * kernels.PERSISTENT_PER_SM
    cfg = kernels.TileConfig(16, 32, 4, 1, grid="persistent")
    ordered = kernels.TileConfig(16, 32, 4, 1, grid="longest_first")
    asked = []

    def uniform(answer):
        return lambda: asked.append(answer) or answer
    assert kernels.persistent_grid(cfg, cpu, programs + 1, uniform(False)) == programs
    assert kernels.persistent_grid(cfg, cpu, programs + 1, uniform(None)) == programs  # unknown: persistent
    assert kernels.persistent_grid(ordered, cpu, programs + 1, uniform(False)) == -1
    assert kernels.persistent_grid(cfg, cpu, programs + 1, uniform(True)) == 0
    assert asked == [False, None, False, True]
    assert kernels.persistent_grid(cfg, cpu, programs, uniform(False)) == 0
    assert kernels.persistent_grid(ordered, cpu, programs, uniform(False)) == 0
    assert kernels.persistent_grid(kernels.TileConfig(16, 32, 4, 1), cpu, 10 ** 6, uniform(False)) == 0
    assert len(asked) == 4
    with pytest.raises(ValueError, match="cfg.grid"):
        kernels.persistent_grid(kernels.TileConfig(16, 32, 4, 1, grid="snake"), cpu, 10, uniform(False))
    # a row of one bidirectional prefix: every query block sees every key block
    n = 100
    full = AttentionLayout(torch.zeros(1, n, dtype=torch.int32), torch.full((1, n), -1, dtype=torch.int32),
                           torch.ones(1, n, dtype=torch.bool), "prefix_lm")
    assert full.block_map(16, 32).uniform_work() == (True, True)
    assert AttentionLayout.from_lengths([[n]], n).block_map(16, 32).uniform_work() == (False, False)


def test_persistent_grid_refuses_a_missing_order(seed):
    layout = layout_for(seed, "causal", False, 1, 40)
    q, k, v, _ = make_inputs(1, 1, 1, 40, 16, torch.float32)
    cfg = kernels.INTERPRETER_CONFIG
    bm = layout.block_map(cfg.block_m, cfg.block_n)
    meta = (layout.lo, layout.hi, layout.is_image)
    kw = dict(kind=layout.kind_code, split=False, scale=0.25, cfg=cfg)
    for order in (None, bm.column_order(), bm.row_order().long()):
        for programs in (-1, 2):
            with pytest.raises(ValueError, match="order"):
                kernels.attention_forward(q, k, v, *meta, *bm.tensors[:4], order=order, programs=programs, **kw)


# ---- int32 offsets ---------------------------------------------------------------------------
def _huge_view(buf: torch.Tensor, like: torch.Tensor, strides, offset: int) -> torch.Tensor:
    view = buf.as_strided(like.shape, strides, offset)
    view.copy_(like)  # touches only the view's elements: the rest of the buffer is never committed
    return view


def int64_offsets_check(seed: int):
    """Runs in a subprocess (see the test below); returns the names of wrong outputs.

    The kernels read and write tensors whose batch stride S (or row stride) fits int32
    but b * S (or row * stride) does not: what a tensor of more than 2^31 elements gives
    on a GPU (B=16, H=32, N=32k, D=128; or a varlen [T, H, D] view with T*H*D > 2^31).
    The interpreter computes int32 offsets with numpy's wrapping int32 like the GPU, so
    unwidened offsets read and write ~4 GiB away from the tensors (garbage or SIGSEGV).
    Buffers are torch.empty of ~4.3 GiB: the OS commits only the pages the views touch."""
    torch.manual_seed(seed)
    n, d, bad = 40, 32, []
    layout_args = ("mmca", True)  # split: the branch outputs (obr) and both LSE rows are written too
    for case in ("batch_stride", "row_stride"):
        batch = 3 if case == "batch_stride" else 1
        layout = layout_for(seed, *layout_args, batch, n)
        q, k, v, dout = make_inputs(batch, 2, 1, n, d, torch.float16)
        want = run_kernels(q, k, v, dout, layout, d ** -0.5)
        if case == "batch_stride":  # [B, H, N, D] slabs 2^30 + 64 elements apart: b = 2 -> 2^31 + 128
            big = 2 ** 30 + 64
            size = 2 * big + 8 * n * d
            strides = lambda t: (big, n * d, d, 1)  # noqa: E731
            slots = (0, 2 * n * d, 4 * n * d, 5 * n * d)  # q, dout (2 heads), k, v (1 head)
        else:  # varlen-like [1, H, N, D] with a row stride of ~2^31 / (N - 1): the last row wraps
            big = 2 ** 31 // (n - 1) + 64
            size = n * big
            strides = lambda t: (t.shape[1] * d, d, big, 1)  # noqa: E731
            slots = (0, 2 * d, 4 * d, 5 * d)
        src = torch.empty(size, dtype=torch.float16)
        dst = torch.empty(size, dtype=torch.float16)
        q2, dout2, k2, v2 = (_huge_view(src, t, strides(t), o) for t, o in zip((q, dout, k, v), slots))
        # out, dq, dk, dv: NaN-poisoned, at the same places in a second buffer
        out2, dq2, dk2, dv2 = (_huge_view(dst, poisoned(like=t), strides(t), o)
                               for t, o in zip((q, q, k, v), slots))
        cfg = kernels.INTERPRETER_CONFIG
        bm = layout.block_map(cfg.block_m, cfg.block_n)
        meta = (layout.lo, layout.hi, layout.is_image)
        kw = dict(kind=layout.kind_code, split=layout.split_softmax, scale=d ** -0.5, cfg=cfg)
        out2, obr, lse = kernels.attention_forward(q2, k2, v2, *meta, *bm.tensors[:4], out=out2, **kw)
        got = (out2, *kernels.attention_backward(dout2, q2, k2, v2, out2, obr, lse, *meta, *bm.tensors,
                                                  grads=(dq2, dk2, dv2), **kw))
        bad += [f"{case}: {name}" for name, g, w in zip(("out", "dq", "dk", "dv"), got, want)
                if not torch.equal(g, w)]
        del src, dst, q2, dout2, k2, v2, out2, dq2, dk2, dv2, got
    return bad


def test_offsets_past_int32_range(seed):
    """Pointer offsets are int64 where batch/head/row products can pass 2^31 (a GPU-only
    wrap the small interpreter tests cannot see). In a subprocess: an unwidened offset may
    SIGSEGV, which must fail this test, not kill the session."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = f"from tests.test_attention_triton import int64_offsets_check as f; print(json.dumps(f({seed})))"
    proc = subprocess.run([sys.executable, "-c", "import json; " + code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_launchers_reject_a_block_map_at_other_tiles(seed):
    """The grid and list widths come from the map's shapes: a map built at other tiles
    than the config would silently leave rows unwritten or mis-masked, so it is refused."""
    layout = layout_for(seed, "causal", False, 1, 70)
    q, k, v, dout = make_inputs(1, 1, 1, 70, 16, torch.float32)
    cfg = kernels.INTERPRETER_CONFIG
    wrong = layout.block_map(cfg.block_m * 2, cfg.block_n)
    meta = (layout.lo, layout.hi, layout.is_image)
    kw = dict(kind=layout.kind_code, split=False, scale=0.25, cfg=cfg)
    with pytest.raises(ValueError, match="block map"):
        kernels.attention_forward(q, k, v, *meta, *wrong.tensors[:4], **kw)
    right = layout.block_map(cfg.block_m, cfg.block_n)
    out, obr, lse = kernels.attention_forward(q, k, v, *meta, *right.tensors[:4], **kw)
    mixed = right.tensors[:4] + wrong.tensors[4:]  # dK/dV lists of the other tiling
    with pytest.raises(ValueError, match="block map"):
        kernels.attention_backward(dout, q, k, v, out, obr, lse, *meta, *mixed, **kw)


# ---- dispatch --------------------------------------------------------------------------------
def test_auto_is_the_cpu_path_on_cpu_and_triton_runs_in_interpreter():
    assert resolve_backend("multimodal_attention", "auto", "cpu") == "sdpa_cpu"
    assert resolve_backend("multimodal_attention", "triton", "cpu") == "triton"


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    layout = AttentionLayout.from_lengths([8])
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        multimodal_attention(q, q, q, layout, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        multimodal_attention(q, q, q, layout, backend="flash")


# ---- varlen ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,split", [("causal", False), ("image_bidirectional", False), ("mmca", True)],
                         ids=["causal", "image_bidirectional", "mmca_split"])
def test_varlen_matches_reference(kind, split, seed):
    seg, image_ids, _ = random_metadata(random.Random(seed), 1, 90, kind, padding=False)
    seg, image_ids = seg[0], image_ids[0]  # one row of samples end to end: [T] tokens
    total = seg.numel()
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), torch.unique_consecutive(seg, return_counts=True)[1]])
    cu = cu.cumsum(0).to(torch.int32)
    q = torch.randn(total, 4, 48)
    k, v = torch.randn(total, 2, 48), torch.randn(total, 2, 48)
    dout = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = multimodal_attention_varlen(*leaves, cu, image_ids=image_ids, kind=kind,
                                      split_softmax=split, backend="triton")
    assert out.shape == q.shape and out.is_contiguous()
    out.backward(dout)
    layout = AttentionLayout.from_cu_seqlens(cu, total, image_ids=image_ids, kind=kind,
                                             split_softmax=split)
    as4 = lambda t: t.unsqueeze(0).transpose(1, 2)  # noqa: E731
    got = [as4(t) for t in (out.detach(), *(t.grad for t in leaves))]
    check_against_reference(layout, as4(q), as4(k), as4(v), as4(dout), got)


def test_varlen_rejects_bad_input():
    q = torch.randn(10, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens"):
        multimodal_attention_varlen(q, q, q, torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        multimodal_attention_varlen(q, q, q, torch.tensor([0.0, 10.0]))
    with pytest.raises(ValueError, match="q: expected a tensor of shape"):
        multimodal_attention_varlen(q[None], q, q, torch.tensor([0, 10]))


# ---- torch.library custom op -----------------------------------------------------------------
@pytest.mark.parametrize("tma", [False, True])
def test_custom_op_passes_opcheck(tma, seed):
    layout = layout_for(seed, "mmca", True, 1, 40)
    cfg = kernels.INTERPRETER_CONFIG
    bm = layout.block_map(cfg.block_m, cfg.block_n)
    q, k, v, _ = make_inputs(1, 2, 1, 40, 32, torch.float32)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), layout.lo, layout.hi,
            layout.is_image, *bm.tensors, layout.kind_code, True, 0.2, cfg.block_m, cfg.block_n,
            cfg.num_warps, cfg.num_stages, cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, False, False,
            None, tma, tma)
    torch.library.opcheck(torch.ops.fastvlm.mm_attention_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


def test_compiles_without_graph_break(seed):
    """Traced with the block map built before (its work order is not: computed in the graph,
    not cached on the map) on the interpreter's persistent grid: 2 heads x 5 query blocks
    are more items than its 6 programs."""
    layout = layout_for(seed, "image_bidirectional", False, 1, 70)
    bm = layout.block_map(kernels.INTERPRETER_CONFIG.block_m, kernels.INTERPRETER_CONFIG.block_n)
    assert 2 * bm.num_q_blocks > kernels.INTERPRETER_SMS * kernels.PERSISTENT_PER_SM
    q, k, v, dout = make_inputs(1, 2, 1, 70, 32, torch.float32)

    def step(q, k, v):
        return multimodal_attention(q, k, v, layout, backend="triton") * 2

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v)
    assert torch.equal(got, step(q, k, v))  # the same kernel on the same inputs: bit-identical


# ---- GPU: bf16 at realistic sizes ------------------------------------------------------------
GPU_SHAPES = [(1, 4, 2, 1000, 128), (2, 4, 4, 4096, 64), (1, 2, 1, 8192, 96), (1, 2, 1, 16384, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"N{s[3]}D{s[4]}")
@pytest.mark.parametrize("kind,split", KIND_CASES, ids=KIND_IDS)
def test_gpu_bf16_matches_reference(kind, split, shape, seed):
    batch, hq, hkv, n, d = shape
    layout = layout_for(seed, kind, split, batch, n, device="cuda")
    q, k, v, dout = make_inputs(batch, hq, hkv, n, d, torch.bfloat16, device="cuda")
    cfg, bwd_cfg = kernels.pick_config(q.device, d), kernels.pick_config(q.device, d, backward=True)
    results = run_kernels(q, k, v, dout, layout, d ** -0.5, cfg, bwd_cfg)
    # the float64 dense reference at N = 16k, 2 heads needs ~40 GiB: sized for an 80 GiB GPU
    check_against_reference(layout, q, k, v, dout, results)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_every_candidate_config_matches_reference(d, seed):
    """`auto` may pick any of the configs it times: each must be correct on this GPU."""
    layout = layout_for(seed, "mmca", True, 2, 1500, device="cuda")
    q, k, v, dout = make_inputs(2, 4, 2, 1500, d, torch.bfloat16, device="cuda")
    for cfg, bwd_cfg in kernels.candidate_configs(torch.cuda.get_device_capability(), d):
        for deterministic in (False, True):
            results = run_kernels(q, k, v, dout, layout, d ** -0.5, cfg, bwd_cfg, deterministic)
            check_against_reference(layout, q, k, v, dout, results)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic(seed):
    """deterministic=True: no atomics, GQA gradients summed inside one program: bitwise-equal reruns."""
    layout = layout_for(seed, "image_bidirectional", False, 2, 3000, device="cuda")
    q, k, v, dout = make_inputs(2, 8, 2, 3000, 128, torch.bfloat16, device="cuda")
    cfgs = kernels.pick_config(q.device, 128), kernels.pick_config(q.device, 128, backward=True)
    first, second = (run_kernels(q, k, v, dout, layout, 128 ** -0.5, *cfgs, deterministic=True) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.gpu
def test_gpu_compile_fullgraph_inductor(seed):
    layout = layout_for(seed, "mmca", True, 1, 2048, device="cuda")
    q, k, v, dout = make_inputs(1, 4, 2, 2048, 128, torch.bfloat16, device="cuda")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    for backward in (False, True):  # both block maps built before tracing
        cfg = kernels.pick_config(q.device, 128, backward)
        layout.block_map(cfg.block_m, cfg.block_n)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: multimodal_attention(q, k, v, layout), fullgraph=True)
    out = compiled(*leaves)
    out.backward(dout)
    check_against_reference(layout, q, k, v, dout, (out.detach(), *(t.grad for t in leaves)))
