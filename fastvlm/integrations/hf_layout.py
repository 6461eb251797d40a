"""The AttentionLayout of one transformers forward, derived from its inputs.

transformers never hands the attention function where samples, images or
the PaliGemma prefix are (Gemma 3 and PaliGemma consume ``token_type_ids``
before the decoder; LLaVA never tells the decoder where images are), so the
patched top-level forward derives the layout once from its own arguments and
passes it down as the ``fastvlm_layout`` keyword, which transformers forwards
to every attention call (and through HF gradient checkpointing's replay).

Segments (packed samples) come from, in this order: explicit ``segment_ids``;
restarts of ``position_ids`` among live tokens (a position that is not the
previous one + 1, the convention transformers uses, checked whatever
``use_cache`` says); one segment per row otherwise. Padding is where
``attention_mask`` is 0. Qwen's M-RoPE position ids: with 4 rows, row 0 holds
the text positions (transformers' own packing convention) and is used; with 3
rows (temporal, height, width) a segment starts where all three are 0, since
inside an image the rows move independently and "previous + 1" means nothing.
"""
from __future__ import annotations

import torch

from fastvlm.ops import AttentionLayout


def _fail(arg: str, msg: str):
    raise ValueError(f"{arg}: {msg}")


def _shift_right(x: torch.Tensor, fill) -> torch.Tensor:
    return torch.cat([torch.full_like(x[:, :1], fill), x[:, :-1]], 1)


def segment_starts_from_positions(position_ids: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """bool [B, N]: tokens where a packed sample begins, from 2-D or M-RoPE position ids."""
    pos = position_ids
    if pos.dim() == 3:
        if pos.shape[0] == 4:  # transformers' packed Qwen convention: text positions first
            pos = pos[0]
        elif pos.shape[0] == 3:
            rows = pos.expand(3, batch, length)
            return (rows == 0).all(0)
        else:
            _fail("position_ids", f"3-D position ids need 3 (M-RoPE) or 4 rows, got {tuple(pos.shape)}")
    if pos.dim() != 2 or pos.shape[-1] != length:
        _fail("position_ids", f"expected [B, N={length}] (or Qwen's [3|4, B, N]), got {tuple(pos.shape)}")
    pos = pos.expand(batch, length)
    return pos != _shift_right(pos, 0) + 1


def segment_ids_from_inputs(batch: int, length: int, device, attention_mask=None, position_ids=None,
                            segment_ids=None) -> torch.Tensor:
    """int32 [B, N]: the sample of each token, -1 at padding."""
    live = torch.ones(batch, length, dtype=torch.bool, device=device)
    if attention_mask is not None:
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, length):
            _fail("attention_mask", f"the fastvlm path takes a 2-D padding mask [B={batch}, N={length}], "
                                    f"got {tuple(attention_mask.shape)}")
        live = attention_mask.to(device).bool()
    if segment_ids is not None:
        if not isinstance(segment_ids, torch.Tensor) or tuple(segment_ids.shape) != (batch, length):
            _fail("segment_ids", f"expected an int tensor [B={batch}, N={length}]")
        seg = segment_ids.to(device)
        return torch.where(live & (seg >= 0), seg, -1).to(torch.int32)
    starts = torch.zeros_like(live)
    if position_ids is not None:
        starts = segment_starts_from_positions(position_ids.to(device), batch, length)
    starts = live & (starts | ~_shift_right(live, False))
    seg = starts.long().cumsum(1) - 1
    return torch.where(live, seg, -1).to(torch.int32)


def image_runs(is_image: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """int32 [B, N]: each contiguous run of image tokens numbered 0, 1, ... per row; -1 elsewhere."""
    member = is_image & live
    start = member & ~_shift_right(member, False)
    ids = start.long().cumsum(1) - 1
    return torch.where(member, ids, -1).to(torch.int32)


class ForwardLayouts:
    """The layout of one forward, and its sliding-window variants (one per window size,
    built on first use by a sliding layer and shared by every layer of that window)."""

    def __init__(self, layout: AttentionLayout):
        self.full = layout

    @property
    def shape(self) -> tuple[int, int]:
        return self.full.shape

    def get(self, window: int | None = None) -> AttentionLayout:
        return self.full.with_window(window)


def build_layout(kind: str, batch: int, length: int, device, *, attention_mask=None, position_ids=None,
                 segment_ids=None, token_type_ids=None) -> AttentionLayout:
    """The layout of one forward. ``kind``: causal (LLaVA, Qwen), image_bidirectional
    (Gemma 3: image runs from token_type_ids == 1), prefix_lm (PaliGemma: prefix where
    token_type_ids == 0). Without token_type_ids the Gemma 3 / PaliGemma layouts are
    causal, exactly as transformers does then."""
    seg = segment_ids_from_inputs(batch, length, device, attention_mask, position_ids, segment_ids)
    live = seg >= 0
    if token_type_ids is None or kind == "causal":
        return AttentionLayout(seg, kind="causal")
    tti = token_type_ids.to(device)
    if tuple(tti.shape) != (batch, length):
        _fail("token_type_ids", f"expected [B={batch}, N={length}], got {tuple(tti.shape)}")
    if kind == "image_bidirectional":
        return AttentionLayout(seg, image_runs(tti == 1, live), kind=kind)
    if kind == "prefix_lm":
        return AttentionLayout(seg, prefix_mask=(tti == 0) & live, kind=kind)
    _fail("kind", f"no HF layout rule for kind {kind!r}")
