"""The ``sdpa_cpu`` backend of multimodal_attention: torch's CPU flash kernel per segment.

The layout's ``query_blocks`` turns each row into calls of the CPU flash kernel
(``aten::_scaled_dot_product_flash_attention_for_cpu``, the kernel behind
F.scaled_dot_product_attention on CPU):
- a segment longer than ``CPU_QUERY_BLOCK`` whose mask is plain causal is one
  call with ``is_causal`` (the kernel skips the tiles above the diagonal; no
  mask exists);
- a longer non-causal segment runs in blocks of ``CPU_QUERY_BLOCK`` queries,
  each against the one key range its rows may reach;
- a segment of at most ``CPU_QUERY_BLOCK`` tokens is one call (``is_causal`` where
  it is plain causal), except that segments of at most ``CPU_MERGE_TOKENS`` share
  calls of that many tokens (on a CPU each call costs fixed time; packed rows hold
  many short samples).
A masked call's additive mask covers only its [queries, keys in reach],
evaluated from the kind's definition (mask_kinds.tile); ``split_softmax`` makes
two calls, the text-key and image-key branches, summed. Nothing crosses
segments: padding rows are in no call or allow no key, so they output 0 with
zero gradient, and no [N, N] tensor is ever built. The masks of calls that are
whole (merged) segments (together at most N * block per row) are built once per
layout and dtype and reused by every layer, forward and backward; a long
segment's block masks are rebuilt per call, in backward too. So what is kept
for backward is q, k, v, the outputs, the log-sum-exp and those cached masks:
O(N * block). A row with no allowed key in a call (padding, or under
``split_softmax`` a text query before any image) gets an all -inf mask row,
for which the kernel writes 0 and adds no gradient.
"""
from __future__ import annotations

import weakref

import torch

from fastvlm.ops import mask_kinds

CPU_QUERY_BLOCK = 1024  # queries per call in a non-causal segment: its mask is [<= 1024, keys in reach]
# Segments up to this many tokens share calls. The kernel visits every tile of a masked call,
# so merging trades the per-call cost against the masked square: on 2 cores, a row of 8
# samples of 132-419 tokens (8 heads of 64) took 1.6x as long (fwd + bwd, best of 7) merged
# into calls of <= 1024 tokens as in one causal call per sample; short samples still share.
CPU_MERGE_TOKENS = 256
_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def serves(device: torch.device):
    """The backend's availability: CPU tensors (any float dtype the CPU flash kernel takes)."""
    return True if device.type == "cpu" else f"it runs on CPU tensors only, not {device.type!r}"


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _branch_masks(call, lo, hi, is_image, kind: int, split: bool, dtype, cut=None):
    """Additive masks [q1 - q0, k1 - k0] per branch for one non-causal call."""
    b, q0, q1, k0, k1 = call[:5]
    rows = torch.arange(q0, q1, device=lo.device)
    cols = torch.arange(k0, k1, device=lo.device)
    ok = mask_kinds.tile(mask_kinds.kind_by_code(kind), rows, cols, lo[b], hi[b], is_image[b],
                         None if cut is None else cut[:, b])
    oks = mask_kinds.branches(ok, is_image[b, cols][None, :], split)
    return [torch.zeros(ok.shape, dtype=dtype, device=lo.device).masked_fill_(~m, float("-inf")) for m in oks]


def _calls(schedule: torch.Tensor, lo, hi, is_image, kind: int, split: bool, dtype, masks, mask_at, cut=None):
    """(call, [(is_causal, mask or None) per branch]) for every call of the schedule; a call's
    masks come from the flat `masks` at `mask_at[call]` (one offset per branch) if >= 0."""
    for call, at in zip(schedule.tolist(), mask_at.tolist()):
        if call[5]:  # plain causal: one branch (split has no image keys here: the text one)
            yield call, [(True, None)]
        elif at[0] >= 0:
            shape = (call[2] - call[1], call[4] - call[3])
            size = shape[0] * shape[1]
            yield call, [(False, masks[o:o + size].view(shape)) for o in at[:len(at) if split else 1]]
        else:
            yield call, [(False, m) for m in _branch_masks(call, lo, hi, is_image, kind, split, dtype, cut)]


_MASKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layout -> {(block, dtype): masks}


def layout_masks(layout, schedule: torch.Tensor, dtype: torch.dtype, block: int):
    """(flat masks, offsets [calls, 2]) of the calls that are a whole non-causal segment, built
    once per layout and dtype (every layer, forward and backward, reuses them; they total at
    most N * block per row, since such a segment has at most `block` tokens); blocked segments'
    calls get offset -1 and build their masks per call."""
    cache = _MASKS.setdefault(layout, {})
    key = (block, dtype)
    if key not in cache:
        kind, split = layout.kind_code, layout.split_softmax
        pieces, offsets, used = [], [], 0
        for b, _, _, causal, members in _key_groups(schedule):
            for i in members:
                if causal or len(members) > 1:
                    offsets.append((-1, -1))
                    continue
                masks = _branch_masks(schedule[i].tolist(), layout.lo, layout.hi, layout.is_image, kind, split, dtype,
                                      layout.cut)
                offsets.append(tuple(used + j * masks[0].numel() for j in range(len(masks))) + (-1,) * (2 - len(masks)))
                pieces += [m.flatten() for m in masks]
                used += sum(m.numel() for m in masks)
        flat = torch.cat(pieces) if pieces else torch.empty(0, dtype=dtype, device=layout.device)
        cache[key] = flat, torch.tensor(offsets, dtype=torch.int64).view(-1, 2)
    return cache[key]


class _Rows:
    """Per-call results [1, H, len, ...] assembled along N into [B, H, N, ...] by one cat per
    row: the calls of a row come in order, and whatever they leave out (padding) is 0.
    (One cat instead of a copy per call: on a busy CPU every parallel op costs a time slice.)"""

    def __init__(self, like: torch.Tensor, heads: int, dtype=None, trailing=True):
        self.like, self.heads, self.dtype, self.trailing = like, heads, dtype or like.dtype, trailing
        self.rows: list[list[torch.Tensor]] = [[] for _ in range(like.shape[0])]
        self.ends = [0] * like.shape[0]

    def _zeros(self, length: int) -> torch.Tensor:
        shape = (1, self.heads, length) + ((self.like.shape[-1],) if self.trailing else ())
        return torch.zeros(shape, dtype=self.dtype, device=self.like.device)

    def put(self, b: int, start: int, piece: torch.Tensor):
        if start > self.ends[b]:
            self.rows[b].append(self._zeros(start - self.ends[b]))
        self.rows[b].append(piece.to(self.dtype))
        self.ends[b] = start + piece.shape[2]

    def result(self, dtype=None) -> torch.Tensor:
        n = self.like.shape[2]
        for b, pieces in enumerate(self.rows):
            if self.ends[b] < n:
                pieces.append(self._zeros(n - self.ends[b]))
        rows = [p[0] if len(p) == 1 else torch.cat(p, 2) for p in self.rows]
        out = rows[0] if len(rows) == 1 else torch.cat(rows, 0)
        return out if dtype is None else out.to(dtype)


def _whole_rows(q, schedule, masks, mask_at, split: bool):
    """When every row is one call over all of it (N <= CPU_QUERY_BLOCK, the same causal flag),
    the whole batch is one kernel call: [(is_causal, mask [B, 1, N, N] or None)] per branch
    (views of the cached masks, rows in order); else None."""
    b, _, n, _ = q.shape
    rows = schedule[:, :6].tolist()
    if len(rows) != b or any(r[:5] != [i, 0, n, 0, n] or r[5] != rows[0][5] for i, r in enumerate(rows)):
        return None
    if rows[0][5]:
        return [(True, None)]
    if bool((mask_at[:, 0] < 0).any()) or masks.numel() != b * (2 if split else 1) * n * n:
        return None
    per_row = masks.view(b, 2 if split else 1, n, n)
    return [(False, per_row[:, br:br + 1]) for br in range(per_row.shape[1])]


@torch.library.custom_op("fastvlm::sdpa_cpu_attention_fwd", mutates_args=())
def sdpa_cpu_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor,
                           hi: torch.Tensor, is_image: torch.Tensor, schedule: torch.Tensor, masks: torch.Tensor,
                           mask_at: torch.Tensor, kind: int, split: bool, scale: float,
                           cut: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [B, H, N, D], branch outputs [2 or 0, B, H, N, D], lse [branches, B, H, N]); cut:
    the layout's (shared prompt) or None."""
    heads, nbr = q.shape[1], 2 if split else 1
    whole = _whole_rows(q, schedule, masks, mask_at, split)
    if whole is not None:
        results = [_flash_fwd(q, k, v, 0.0, causal, attn_mask=mask, scale=scale) for causal, mask in whole]
        if split and len(results) == 1:  # causal rows: no image keys, the image branch is 0
            results.append((torch.zeros_like(q), torch.zeros_like(results[0][1])))
        lse = torch.stack([r[1] for r in results])
        if not split:
            return results[0][0], q.new_empty((0,) + tuple(q.shape)), lse
        obr = torch.stack([r[0] for r in results])
        return obr[0] + obr[1], obr, lse
    outs = [_Rows(q, heads) for _ in range(nbr)]
    lses = [_Rows(q, heads, _lse_dtype(q.dtype), trailing=False) for _ in range(nbr)]
    for (b, q0, q1, k0, k1, *_), branches in _calls(schedule, lo, hi, is_image, kind, split, q.dtype, masks, mask_at,
                                                    cut):
        qs, ks, vs = q[b:b + 1, :, q0:q1], k[b:b + 1, :, k0:k1], v[b:b + 1, :, k0:k1]
        for br, (causal, mask) in enumerate(branches):
            o, lse = _flash_fwd(qs, ks, vs, 0.0, causal, attn_mask=mask, scale=scale)
            outs[br].put(b, q0, o)
            lses[br].put(b, q0, lse)
        # split over a causal segment (no image keys): the image branch is 0
        for br in range(len(branches), nbr):
            outs[br].put(b, q0, torch.zeros_like(qs))
            lses[br].put(b, q0, torch.zeros(qs.shape[:3], dtype=_lse_dtype(q.dtype), device=q.device))
    lse = torch.stack([r.result() for r in lses])
    if not split:
        return outs[0].result(), q.new_empty((0,) + tuple(q.shape)), lse
    obr = torch.stack([r.result() for r in outs])
    return obr[0] + obr[1], obr, lse


@sdpa_cpu_attention_fwd.register_fake
def _(q, k, v, lo, hi, is_image, schedule, masks, mask_at, kind, split, scale, cut=None):
    return (torch.empty_like(q), q.new_empty((2 if split else 0,) + tuple(q.shape)),
            q.new_empty((2 if split else 1,) + tuple(q.shape[:3]), dtype=_lse_dtype(q.dtype)))


def _key_groups(schedule: torch.Tensor):
    """The calls of each segment, whose dK/dV overlap: [b, first token, last token + 1,
    causal, call indices] per segment, in order."""
    groups = []
    for i, (b, q0, q1, _, _, causal, s) in enumerate(schedule.tolist()):
        last = groups[-1] if groups else None
        if last and last[0] == b and last[1] == s:
            last[2] = q1
            last[4].append(i)
        else:
            groups.append([b, s, q1, causal, [i]])
    return groups


@torch.library.custom_op("fastvlm::sdpa_cpu_attention_bwd", mutates_args=())
def sdpa_cpu_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, obr: torch.Tensor, lse: torch.Tensor, lo: torch.Tensor,
                           hi: torch.Tensor, is_image: torch.Tensor, schedule: torch.Tensor, masks: torch.Tensor,
                           mask_at: torch.Tensor, kind: int, split: bool, scale: float,
                           cut: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    outs = obr if split else out[None]
    whole = _whole_rows(q, schedule, masks, mask_at, split)
    if whole is not None:
        grads = [_flash_bwd(dout, q, k, v, outs[br], lse[br], 0.0, causal, attn_mask=mask, scale=scale)
                 for br, (causal, mask) in enumerate(whole)]
        if len(grads) == 1:
            return grads[0]
        return tuple(a + b for a, b in zip(*grads))
    calls = list(_calls(schedule, lo, hi, is_image, kind, split, q.dtype, masks, mask_at, cut))
    acc = _lse_dtype(q.dtype)  # dK/dV of a blocked segment sum over its blocks: fp32 for bf16/fp16
    dq, dk, dv = _Rows(q, q.shape[1]), _Rows(k, k.shape[1]), _Rows(v, v.shape[1])
    for b, g0, g1, _, members in _key_groups(schedule):
        dk_g = dv_g = None
        for i in members:
            (_, q0, q1, k0, k1, *_), branches = calls[i]
            qs, ks, vs = q[b:b + 1, :, q0:q1], k[b:b + 1, :, k0:k1], v[b:b + 1, :, k0:k1]
            dq_c = None
            for br, (causal, mask) in enumerate(branches):
                dqs, dks, dvs = _flash_bwd(dout[b:b + 1, :, q0:q1], qs, ks, vs, outs[br, b:b + 1, :, q0:q1],
                                           lse[br, b:b + 1, :, q0:q1], 0.0, causal, attn_mask=mask, scale=scale)
                dq_c = dqs if dq_c is None else dq_c.to(acc) + dqs  # the two branches of split
                if len(members) == 1 and len(branches) == 1:  # its own keys only: no sum
                    dk_g, dv_g = dks, dvs
                    continue
                if dk_g is None:
                    dk_g = torch.zeros((1, k.shape[1], g1 - g0, k.shape[3]), dtype=acc, device=k.device)
                    dv_g = torch.zeros_like(dk_g)
                dk_g[:, :, k0 - g0:k1 - g0] += dks
                dv_g[:, :, k0 - g0:k1 - g0] += dvs
            dq.put(b, q0, dq_c)
        dk.put(b, g0, dk_g)
        dv.put(b, g0, dv_g)
    return dq.result(), dk.result(k.dtype), dv.result(v.dtype)


@sdpa_cpu_attention_bwd.register_fake
def _(dout, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, lo, hi, is_image, schedule, masks, mask_at = inputs[:9]
    out, obr, lse = output
    ctx.save_for_backward(q, k, v, out, obr, lse, lo, hi, is_image, schedule, masks, mask_at)
    ctx.params = inputs[9:]


def _backward(ctx, dout, _dobr, _dlse):
    dq, dk, dv = torch.ops.fastvlm.sdpa_cpu_attention_bwd(dout.contiguous(), *ctx.saved_tensors, *ctx.params)
    return (dq, dk, dv) + (None,) * (len(ctx.params) + 6)


sdpa_cpu_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def sdpa_cpu_attention(q, k, v, layout, scale: float) -> torch.Tensor:
    """multimodal_attention on CPU tensors through the CPU flash kernel (see the module docstring)."""
    block = CPU_QUERY_BLOCK
    schedule = layout.query_blocks(block, CPU_MERGE_TOKENS)
    masks, mask_at = layout_masks(layout, schedule, q.dtype, block)
    out, _, _ = torch.ops.fastvlm.sdpa_cpu_attention_fwd(q, k, v, layout.lo, layout.hi, layout.is_image, schedule,
                                                         masks, mask_at, layout.kind_code, layout.split_softmax,
                                                         scale, layout.cut)
    return out
