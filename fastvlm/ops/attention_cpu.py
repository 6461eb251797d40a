"""The ``sdpa_cpu`` backend of multimodal_attention: torch's CPU flash kernel per segment.

The layout's ``query_blocks`` cuts every segment into calls of the CPU flash
kernel (``aten::_scaled_dot_product_flash_attention_for_cpu``, the kernel
behind F.scaled_dot_product_attention on CPU):
- a segment whose mask is plain causal is one call with ``is_causal`` (the
  kernel skips the tiles above the diagonal; no mask exists);
- any other segment runs in blocks of at most ``CPU_QUERY_BLOCK`` queries, each
  against the one key range its rows may reach, with an additive mask of only
  [block, range] evaluated from the kind's definition (mask_kinds.tile);
  ``split_softmax`` makes two calls per block, the text-key and image-key
  branches, summed.
Nothing crosses segments and padding is in no call: its rows stay 0 and get
zero gradient, and no [N, N] tensor is ever built. Backward recomputes each
block's mask from the per-token metadata instead of saving it, so the tensors
kept for backward are q, k, v, the outputs and the log-sum-exp: O(N) per head.
A query row with no allowed key in a branch (only under ``split_softmax``: a
text query before any image) gets an all -inf mask row, for which the kernel
writes 0 and contributes no gradient.
"""
from __future__ import annotations

import torch

from fastvlm.ops import mask_kinds

CPU_QUERY_BLOCK = 256  # queries per call in a non-causal segment: the mask is [256, keys in reach]
_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def serves(device: torch.device):
    """The backend's availability: CPU tensors (any float dtype the CPU flash kernel takes)."""
    return True if device.type == "cpu" else f"it runs on CPU tensors only, not {device.type!r}"


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _branch_masks(call, lo, hi, is_image, kind: int, split: bool, dtype):
    """Additive masks [q1 - q0, k1 - k0] per branch for one non-causal call."""
    b, q0, q1, k0, k1, _ = call
    rows = torch.arange(q0, q1, device=lo.device)
    cols = torch.arange(k0, k1, device=lo.device)
    ok = mask_kinds.tile(mask_kinds.kind_by_code(kind), rows, cols, lo[b], hi[b], is_image[b])
    oks = mask_kinds.branches(ok, is_image[b, cols][None, :], split)
    return [torch.zeros(ok.shape, dtype=dtype, device=lo.device).masked_fill_(~m, float("-inf")) for m in oks]


def _calls(schedule: torch.Tensor, lo, hi, is_image, kind: int, split: bool, dtype):
    """(call, [(is_causal, mask or None) per branch]) for every call of the schedule."""
    for call in schedule.tolist():
        if call[5]:  # plain causal: one branch (split has no image keys here: the text one)
            yield call, [(True, None)]
        else:
            yield call, [(False, m) for m in _branch_masks(call, lo, hi, is_image, kind, split, dtype)]


def _bnhd(like: torch.Tensor, heads: int, dtype=None, lead: tuple = ()) -> torch.Tensor:
    """An uninitialised [*lead, B, H, N, D] tensor stored as [*lead, B, N, H, D]: the kernel's
    own output layout, so each call's result lands with a contiguous copy."""
    b, _, n, d = like.shape
    t = like.new_empty(lead + (b, n, heads, d), dtype=dtype or like.dtype)
    return t.transpose(-3, -2)


def _zero_padding(t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Rows no call writes (padding: empty interval) set to 0, in place."""
    return t.masked_fill_((hi < lo)[:, None, :, None], 0)


@torch.library.custom_op("fastvlm::sdpa_cpu_attention_fwd", mutates_args=())
def sdpa_cpu_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor,
                           hi: torch.Tensor, is_image: torch.Tensor, schedule: torch.Tensor, kind: int,
                           split: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [B, H, N, D], branch outputs [2 or 0, B, H, N, D], lse [branches, B, H, N])."""
    heads = q.shape[1]
    obr = _bnhd(q, heads, lead=(2 if split else 0,))
    out = _bnhd(q, heads)
    targets = obr if split else out[None]  # where each branch's output goes
    lse = torch.zeros((targets.shape[0],) + tuple(q.shape[:3]), dtype=_lse_dtype(q.dtype), device=q.device)
    for (b, q0, q1, k0, k1, _), branches in _calls(schedule, lo, hi, is_image, kind, split, q.dtype):
        qs, ks, vs = q[b:b + 1, :, q0:q1], k[b:b + 1, :, k0:k1], v[b:b + 1, :, k0:k1]
        for br, (causal, mask) in enumerate(branches):
            o, l = _flash_fwd(qs, ks, vs, 0.0, causal, attn_mask=mask, scale=scale)
            targets[br, b, :, q0:q1] = o[0]
            lse[br, b, :, q0:q1] = l[0]
        targets[len(branches):, b, :, q0:q1] = 0  # split over a causal segment: no image keys
    if split:
        out.copy_(obr[0]).add_(obr[1])
        for branch in obr:
            _zero_padding(branch, lo, hi)
    return _zero_padding(out, lo, hi), obr, lse


@sdpa_cpu_attention_fwd.register_fake
def _(q, k, v, lo, hi, is_image, schedule, kind, split, scale):
    return (_bnhd(q, q.shape[1]), _bnhd(q, q.shape[1], lead=(2 if split else 0,)),
            q.new_empty((2 if split else 1,) + tuple(q.shape[:3]), dtype=_lse_dtype(q.dtype)))


def _grad_buffer(t: torch.Tensor, accumulate: bool) -> torch.Tensor:
    """Zeros of t's shape in the kernel's layout; fp32 where several calls add low-precision terms."""
    dtype = _lse_dtype(t.dtype) if accumulate and t.element_size() < 4 else t.dtype
    return _bnhd(t, t.shape[1], dtype).zero_()


@torch.library.custom_op("fastvlm::sdpa_cpu_attention_bwd", mutates_args=())
def sdpa_cpu_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, obr: torch.Tensor, lse: torch.Tensor, lo: torch.Tensor,
                           hi: torch.Tensor, is_image: torch.Tensor, schedule: torch.Tensor, kind: int,
                           split: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # dQ sums the branches; dK/dV sum over every call that reaches a key (the blocks of a
    # non-causal segment overlap in keys)
    several = split or not bool(schedule[:, 5].all())
    dq, dk, dv = _grad_buffer(q, split), _grad_buffer(k, several), _grad_buffer(v, several)
    outs = obr if split else out[None]
    for (b, q0, q1, k0, k1, _), branches in _calls(schedule, lo, hi, is_image, kind, split, q.dtype):
        qs, ks, vs = q[b:b + 1, :, q0:q1], k[b:b + 1, :, k0:k1], v[b:b + 1, :, k0:k1]
        g = dout[b:b + 1, :, q0:q1]
        for br, (causal, mask) in enumerate(branches):
            dqs, dks, dvs = _flash_bwd(g, qs, ks, vs, outs[br, b:b + 1, :, q0:q1], lse[br, b:b + 1, :, q0:q1],
                                       0.0, causal, attn_mask=mask, scale=scale)
            dq[b, :, q0:q1] += dqs[0]
            dk[b, :, k0:k1] += dks[0]
            dv[b, :, k0:k1] += dvs[0]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@sdpa_cpu_attention_bwd.register_fake
def _(dout, q, k, v, *rest):
    return _bnhd(q, q.shape[1]), _bnhd(k, k.shape[1]), _bnhd(v, v.shape[1])


def _setup_context(ctx, inputs, output):
    q, k, v, lo, hi, is_image, schedule = inputs[:7]
    out, obr, lse = output
    ctx.save_for_backward(q, k, v, out, obr, lse, lo, hi, is_image, schedule)
    ctx.params = inputs[7:]


def _backward(ctx, dout, _dobr, _dlse):
    dq, dk, dv = torch.ops.fastvlm.sdpa_cpu_attention_bwd(dout.contiguous(), *ctx.saved_tensors, *ctx.params)
    return (dq, dk, dv) + (None,) * 7


sdpa_cpu_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def sdpa_cpu_attention(q, k, v, layout, scale: float) -> torch.Tensor:
    """multimodal_attention on CPU tensors through the CPU flash kernel (see the module docstring)."""
    schedule = layout.query_blocks(CPU_QUERY_BLOCK)
    out, _, _ = torch.ops.fastvlm.sdpa_cpu_attention_fwd(q, k, v, layout.lo, layout.hi, layout.is_image,
                                                         schedule, layout.kind_code, layout.split_softmax, scale)
    return out
