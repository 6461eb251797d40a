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

A segment boundary inside a run of image tokens is refused (an image belongs to one
sample). PaliGemma token_type_ids whose prefix (type 0) is not one run within a
sample have no interval rule (a prefix query then also sees later prefix runs):
such a forward carries no AttentionLayout, and its attention runs on transformers'
own dense mask with packed samples kept apart (fastvlm.integrations.hf_attention).
"""
from __future__ import annotations

import torch

from fastvlm.ops import AttentionLayout
from fastvlm.ops.mask_kinds import segment_starts, shift


def _fail(arg: str, msg: str):
    raise ValueError(f"{arg}: {msg}")


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
    return pos != shift(pos, 0) + 1


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
        if segment_ids.dtype == torch.bool or segment_ids.is_floating_point() or segment_ids.is_complex():
            _fail("segment_ids", f"expected an integer tensor, got dtype {segment_ids.dtype}")
        if segment_ids.numel() and int(segment_ids.min()) < -1:
            _fail("segment_ids", f"ids must be >= -1 (-1 marks padding), got {int(segment_ids.min())}")
        seg = segment_ids.to(device)
        return torch.where(live & (seg >= 0), seg, -1).to(torch.int32)
    starts = torch.zeros_like(live)
    if position_ids is not None:
        starts = segment_starts_from_positions(position_ids.to(device), batch, length)
    starts = live & (starts | ~shift(live, False))
    seg = starts.long().cumsum(1) - 1
    return torch.where(live, seg, -1).to(torch.int32)


def image_runs(is_image: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """int32 [B, N]: each contiguous run of image tokens numbered 0, 1, ... per row; -1 elsewhere."""
    member = is_image & live
    start = member & ~shift(member, False)
    ids = start.long().cumsum(1) - 1
    return torch.where(member, ids, -1).to(torch.int32)


def check_images_within_segments(seg: torch.Tensor, is_image: torch.Tensor, source: str) -> None:
    """Refuse a segment boundary between two image tokens (one image split across samples)."""
    crossing = segment_starts(seg) & is_image & shift(is_image, False) & shift(seg >= 0, False)
    if bool(crossing.any()):
        row, col = (int(i) for i in crossing.nonzero()[0])
        _fail(source, f"a segment boundary inside a run of image tokens (row {row}, token {col}): each "
                      f"image's tokens must lie within one sample")


def prefix_is_one_run(seg: torch.Tensor, prefix: torch.Tensor) -> bool:
    """Whether the prefix tokens of every segment form one contiguous run."""
    pos = torch.arange(seg.shape[1], device=seg.device).expand_as(seg)
    start = torch.where(segment_starts(seg), pos, 0).cummax(1).values
    run_start = prefix & (~shift(prefix, False) | segment_starts(seg))
    last_prefix_before = shift(torch.where(prefix, pos, -1).cummax(1).values, -1)
    return not bool((run_start & (last_prefix_before >= start)).any())


class ForwardLayouts:
    """The segments of one forward and its layout (None where the family's rule has no
    interval form for these inputs), and the layout's sliding-window variants (one per
    window size, built on first use by a sliding layer and shared by every layer of it)."""

    def __init__(self, segment_ids: torch.Tensor, layout: AttentionLayout | None):
        self.segment_ids, self.full = segment_ids, layout

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.segment_ids.shape)

    def get(self, window: int | None = None) -> AttentionLayout:
        return self.full.with_window(window)

    def across_samples(self, device) -> torch.Tensor:
        """bool [B, 1, N, N]: (live query, key) pairs of different segments (or a padding key),
        which no mask of this forward may allow."""
        seg = self.segment_ids.to(device)
        return ((seg[:, :, None] >= 0) & (seg[:, :, None] != seg[:, None, :]))[:, None]


def build_layout(kind: str, batch: int, length: int, device, *, attention_mask=None, position_ids=None,
                 segment_ids=None, token_type_ids=None, is_image=None) -> ForwardLayouts:
    """The layout of one forward. ``kind``: causal (LLaVA, Qwen), image_bidirectional
    (Gemma 3: image runs from token_type_ids == 1), prefix_lm (PaliGemma: prefix where
    token_type_ids == 0). Without token_type_ids the Gemma 3 / PaliGemma layouts are
    causal, exactly as transformers does then. ``is_image``: bool [B, N], the image
    placeholder tokens, which no segment boundary may split."""
    seg = segment_ids_from_inputs(batch, length, device, attention_mask, position_ids, segment_ids)
    live = seg >= 0
    if is_image is not None:
        check_images_within_segments(seg, is_image.to(device), "segment_ids" if segment_ids is not None
                                     else "position_ids")
    if token_type_ids is None or kind == "causal":
        return ForwardLayouts(seg, AttentionLayout(seg, kind="causal"))
    tti = token_type_ids.to(device)
    if tuple(tti.shape) != (batch, length):
        _fail("token_type_ids", f"expected [B={batch}, N={length}], got {tuple(tti.shape)}")
    if kind == "image_bidirectional":
        return ForwardLayouts(seg, AttentionLayout(seg, image_runs(tti == 1, live), kind=kind))
    if kind == "prefix_lm":
        prefix = (tti == 0) & live
        if not prefix_is_one_run(seg, prefix):
            return ForwardLayouts(seg, None)
        return ForwardLayouts(seg, AttentionLayout(seg, prefix_mask=prefix, kind=kind))
    _fail("kind", f"no HF layout rule for kind {kind!r}")
