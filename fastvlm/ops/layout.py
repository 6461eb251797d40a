"""Attention layouts described by compact per-token metadata.

A packed batch carries, per token, the sample it belongs to (``segment_ids``,
-1 for padding), the image it came from (``image_ids``, -1 for text) and,
for prefix-LM, whether it is in the bidirectional prefix. Every mask kind is
a predicate over that metadata, and always stays within one segment: tokens
never see another segment, padding sees nothing and is seen by nothing.

Pictures below: one segment ``t t i i t`` (t = text, i = image tokens of one
image, p = prefix token), rows are queries, columns keys, ``x`` = allowed.

``causal``: key position <= query position::

    t  x . . . .
    t  x x . . .
    i  x x x . .
    i  x x x x .
    t  x x x x x

``prefix_lm`` (PaliGemma): prefix tokens see the whole prefix, the rest is
causal. With prefix ``p p p t t``::

    p  x x x . .
    p  x x x . .
    p  x x x . .
    t  x x x x .
    t  x x x x x

``image_bidirectional`` (Gemma 3 / PaliGemma images): causal, plus every
token of an image sees every token of the same image::

    t  x . . . .
    t  x x . . .
    i  x x x x .
    i  x x x x .
    t  x x x x x

``mmca`` (DeepSpeed-VisualChat's multimodal causal attention): causal; a
text query sees every earlier-or-same token; an image query sees earlier
text tokens and itself, no other image token::

    t  x . . . .
    t  x x . . .
    i  x x x . .
    i  x x . x .
    t  x x x x x

With ``split_softmax=True`` (their definition proper) the attention over
text keys and the attention over image keys are two softmaxes whose outputs
are summed: the text branch for every query (earlier-or-same text keys); the
image branch over earlier image keys for a text query, over itself alone for
an image query. A branch with no allowed key contributes 0. Their dense-mask
code gives a near-uniform row there instead (the additive mask only lowers
scores by a large constant); we differ on purpose, since attending uniformly
to forbidden keys is never what the mask means.

Internally every kind reduces to an interval of allowed keys per query row,
``[lo[q], hi[q]]`` (mmca also drops other image keys for image queries).
That makes the block map O(N + (N/B)^2) and gives the kernels a predicate of
two loads per row. It requires the runs the kinds rely on to be contiguous
(each segment, each image within a segment, the prefix within a segment),
which the constructor checks.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Sequence

import torch

from fastvlm import _ext
from fastvlm.ops.backend import register_op, resolve_backend
from fastvlm.utils.checks import as_int

KINDS = ("causal", "prefix_lm", "image_bidirectional", "mmca")
KIND_CODES = {name: code for code, name in enumerate(KINDS)}  # matches csrc MaskKind
_INT32_MAX = torch.iinfo(torch.int32).max


@dataclass(frozen=True)
class BlockMap:
    """Tiles of a layout at (block_q, block_k), as count + index lists.

    ``kv_indices[b, i, :kv_num_blocks[b, i]]`` are the *partial* kv blocks of
    query block i (ascending): the mask predicate must be evaluated there.
    ``full_kv_indices`` likewise lists the *full* tiles (every pair allowed,
    no predicate). A tile in neither list is empty and is never visited. The
    ``q_*`` tensors are the same tiles transposed (per kv block, its query
    blocks), as a dK/dV kernel walks them. Unused index slots hold 0.
    A tail tile (N not a multiple of the block) is classified on its real
    tokens only; kernels still bound-check it.
    """

    block_q: int
    block_k: int
    seq_len: int
    kv_num_blocks: torch.Tensor       # int32 [B, Tq]
    kv_indices: torch.Tensor          # int32 [B, Tq, Tk]
    full_kv_num_blocks: torch.Tensor  # int32 [B, Tq]
    full_kv_indices: torch.Tensor     # int32 [B, Tq, Tk]
    q_num_blocks: torch.Tensor        # int32 [B, Tk]
    q_indices: torch.Tensor           # int32 [B, Tk, Tq]
    full_q_num_blocks: torch.Tensor   # int32 [B, Tk]
    full_q_indices: torch.Tensor      # int32 [B, Tk, Tq]

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self)[3:])

    @property
    def num_q_blocks(self) -> int:
        return self.kv_num_blocks.shape[1]

    @property
    def num_kv_blocks(self) -> int:
        return self.q_num_blocks.shape[1]

    def tile_classes(self) -> torch.Tensor:
        """uint8 [B, Tq, Tk]: 0 empty, 1 partial, 2 full (rebuilt from the lists)."""
        b, tq = self.kv_num_blocks.shape
        cls = torch.zeros(b, tq, self.num_kv_blocks + 1, dtype=torch.uint8,
                          device=self.kv_indices.device)
        slot = torch.arange(self.num_kv_blocks, device=cls.device)
        for num, idx, value in ((self.kv_num_blocks, self.kv_indices, 1),
                                (self.full_kv_num_blocks, self.full_kv_indices, 2)):
            used = slot < num[..., None].long()
            target = torch.where(used, idx.long(), self.num_kv_blocks)  # spill into a dummy column
            cls.scatter_(2, target, torch.full_like(target, value, dtype=torch.uint8))
        return cls[..., :-1]

    def visited_tiles(self) -> int:
        """Tiles a kernel walking this map visits (partial + full), over the batch."""
        return int(self.kv_num_blocks.sum() + self.full_kv_num_blocks.sum())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def equal(self, other: "BlockMap") -> bool:
        return (self.block_q, self.block_k, self.seq_len) == (other.block_q, other.block_k, other.seq_len) \
            and all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(self.tensors, other.tensors))

    def to(self, device) -> "BlockMap":
        return BlockMap(self.block_q, self.block_k, self.seq_len, *(t.to(device) for t in self.tensors))


def _fail(arg: str, msg: str):
    raise ValueError(f"{arg}: {msg}")


def _as_ids(x, arg: str, shape=None, device=None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        _fail(arg, f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        _fail(arg, f"expected an integer tensor, got dtype {x.dtype}")
    if x.dim() != 2:
        _fail(arg, f"expected shape [B, N], got {tuple(x.shape)}")
    if shape is not None and tuple(x.shape) != shape:
        _fail(arg, f"expected shape {shape} (that of segment_ids), got {tuple(x.shape)}")
    if device is not None and x.device != device:
        _fail(arg, f"expected device {device} (that of segment_ids), got {x.device}")
    if x.numel() and int(x.min()) < -1:
        _fail(arg, f"ids must be >= -1 (-1 marks {'padding' if arg == 'segment_ids' else 'text'}), "
                   f"got {int(x.min())}")
    if x.numel() and int(x.max()) >= _INT32_MAX:
        _fail(arg, "ids must fit in int32")
    return x.to(torch.int32).contiguous()


def _shift(x: torch.Tensor, fill, right: bool = True) -> torch.Tensor:
    """x moved one step along dim 1 (right: x[i-1] at i), `fill` entering."""
    edge = torch.full_like(x[:, :1], fill)
    return torch.cat([edge, x[:, :-1]], 1) if right else torch.cat([x[:, 1:], edge], 1)


def _segment_starts(seg: torch.Tensor) -> torch.Tensor:
    """bool [B, N]: the first token of each segment (a row's first live token always is)."""
    return (seg >= 0) & (seg != _shift(seg, -2))


def _runs_contiguous(key: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """Per row: does every key value among `member` tokens form one run? -> bool [B]."""
    prev_key, prev_member = _shift(key, -1), _shift(member, False)
    starts = (member & (~prev_member | (key != prev_key))).sum(1)
    sentinel = torch.iinfo(torch.int64).max
    ordered = torch.where(member, key, sentinel).sort(dim=1).values
    prev_sorted = _shift(ordered, sentinel)
    distinct = ((ordered != prev_sorted) & (ordered != sentinel)).sum(1)
    return starts == distinct


def _image_run_key(seg: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """One int64 key per (segment, image) pair, so an image is local to its segment."""
    stride = int(img.max()) + 2 if img.numel() else 1
    return seg.long() * stride + img.long()


def _run_end(key: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """Index of the last token of each member token's run (any value elsewhere)."""
    n = key.shape[1]
    idx = torch.arange(n, device=key.device).expand_as(key)
    next_key, next_member = _shift(key, -1, right=False), _shift(member, False, right=False)
    is_end = member & (~next_member | (next_key != key))
    marker = torch.where(is_end, idx, n)
    return marker.flip(1).cummin(1).values.flip(1)


class AttentionLayout:
    """Which keys each query may attend to, from per-token metadata (O(N)).

    Args:
        segment_ids: int [B, N]; the sample of each token, -1 for padding.
        image_ids: int [B, N] or None; the image of each token, -1 for text.
            Within a segment, each image id must form one contiguous run.
        prefix_mask: bool [B, N] or None; for ``kind="prefix_lm"`` only, True
            for the bidirectional prefix (one contiguous run per segment).
        kind: one of ``causal``, ``prefix_lm``, ``image_bidirectional``, ``mmca``.
        split_softmax: ``mmca`` only: separate softmaxes over image and text keys.

    See the module docstring for a picture of each kind.
    """

    def __init__(self, segment_ids, image_ids=None, prefix_mask=None, kind: str = "causal", *,
                 split_softmax: bool = False):
        if kind not in KIND_CODES:
            _fail("kind", f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        if split_softmax and kind != "mmca":
            _fail("split_softmax", f"only defined for kind='mmca', got kind={kind!r}")
        seg = _as_ids(segment_ids, "segment_ids")
        shape, device = tuple(seg.shape), seg.device
        if seg.numel() == 0:
            _fail("segment_ids", f"empty batch or sequence, shape {shape}")
        img = (_as_ids(image_ids, "image_ids", shape, device) if image_ids is not None
               else torch.full_like(seg, -1))
        live = seg >= 0
        if bool((img[~live] >= 0).any()):
            _fail("image_ids", "image tokens (id >= 0) at padding positions (segment_ids == -1)")
        if not bool(_runs_contiguous(seg.long(), live).all()):
            _fail("segment_ids", "each segment must be one contiguous run of tokens in its row")
        if not bool(_runs_contiguous(_image_run_key(seg, img), img >= 0).all()):
            _fail("image_ids", "each image id must form one contiguous run within its segment "
                               "(give separate images separate ids)")
        if prefix_mask is not None:
            if kind != "prefix_lm":
                _fail("prefix_mask", f"only used by kind='prefix_lm', got kind={kind!r}")
            if not isinstance(prefix_mask, torch.Tensor) or prefix_mask.dtype != torch.bool:
                _fail("prefix_mask", "expected a bool tensor")
            if tuple(prefix_mask.shape) != shape:
                _fail("prefix_mask", f"expected shape {shape} (that of segment_ids), got "
                                     f"{tuple(prefix_mask.shape)}")
            if prefix_mask.device != device:
                _fail("prefix_mask", f"expected device {device}, got {prefix_mask.device}")
            prefix_mask = prefix_mask.contiguous()
            if bool((prefix_mask & ~live).any()):
                _fail("prefix_mask", "True at padding positions (segment_ids == -1)")
            if not bool(_runs_contiguous(seg.long(), prefix_mask).all()):
                _fail("prefix_mask", "the prefix must be one contiguous run within each segment")
        elif kind == "prefix_lm":
            _fail("prefix_mask", "required for kind='prefix_lm'")

        self.segment_ids, self.image_ids, self.prefix_mask = seg, img, prefix_mask
        self.kind, self.split_softmax = kind, bool(split_softmax)
        self.lo, self.hi, self.is_image = self._intervals()
        self._block_maps: dict[tuple[int, int], BlockMap] = {}

    # ---- derived metadata ------------------------------------------------------------
    def _intervals(self):
        seg, img = self.segment_ids, self.image_ids
        n = seg.shape[1]
        idx = torch.arange(n, device=seg.device, dtype=torch.int32).expand_as(seg)
        live = seg >= 0
        lo = torch.where(_segment_starts(seg), idx, 0).cummax(1).values
        hi = idx
        if self.kind == "prefix_lm":
            hi = torch.where(self.prefix_mask, _run_end(seg.long(), self.prefix_mask), idx)
        elif self.kind == "image_bidirectional":
            in_image = img >= 0
            hi = torch.where(in_image, _run_end(_image_run_key(seg, img), in_image), idx)
        lo = torch.where(live, lo, 0).to(torch.int32).contiguous()
        hi = torch.where(live, hi, -1).to(torch.int32).contiguous()
        return lo, hi, (img >= 0).contiguous()

    @property
    def kind_code(self) -> int:
        return KIND_CODES[self.kind]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.segment_ids.shape)

    @property
    def batch_size(self) -> int:
        return self.segment_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.segment_ids.shape[1]

    @property
    def device(self) -> torch.device:
        return self.segment_ids.device

    def nbytes(self) -> int:
        """Bytes held by the metadata (the kernels' view: lo, hi, is_image)."""
        return sum(t.numel() * t.element_size() for t in (self.lo, self.hi, self.is_image))

    def to(self, device) -> "AttentionLayout":
        return AttentionLayout(self.segment_ids.to(device), self.image_ids.to(device),
                               None if self.prefix_mask is None else self.prefix_mask.to(device),
                               self.kind, split_softmax=self.split_softmax)

    def __repr__(self):
        return (f"AttentionLayout(kind={self.kind!r}, split_softmax={self.split_softmax}, "
                f"shape={self.shape}, device={self.device})")

    # ---- as flash-attn's varlen arguments ----------------------------------------------
    @functools.cached_property
    def is_packed_causal(self) -> bool:
        """True if every live token sees exactly the earlier tokens of its own segment:
        plain or packed causal attention, whatever ``kind`` says (e.g. mmca of text only).
        Conservative for mmca: any image token makes it False. False without live tokens."""
        idx = torch.arange(self.seq_len, device=self.device, dtype=torch.int32)
        live = self.segment_ids >= 0
        causal_rows = bool(((self.hi == idx) | ~live).all()) and bool(live.any())
        # mmca also removes image keys from image queries' rows: only without images is it causal
        return causal_rows and not (self.kind == "mmca" and bool(self.is_image.any()))

    def varlen_segments(self) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(cu_seqlens int32 [S + 1], index of the live tokens in the flattened [B * N]
        rows or None if there is no padding, longest segment): every segment of every
        row, in order, as one packed sequence (flash-attn / xformers varlen). Cached:
        computing it syncs with the host, and every layer of a model asks again."""
        return self._varlen_segments

    @functools.cached_property
    def _varlen_segments(self):
        seg = self.segment_ids
        live = (seg >= 0).flatten()
        # number the segments by their first tokens, so equal ids in different rows, or
        # any id values, never merge two segments
        key = _segment_starts(seg).flatten().long().cumsum(0)[live]
        lengths = torch.unique_consecutive(key, return_counts=True)[1]
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        index = None if bool(live.all()) else live.nonzero().squeeze(1)
        return cu, index, int(lengths.max()) if lengths.numel() else 0

    # ---- dense masks (tests / small N) ----------------------------------------------
    def dense(self) -> torch.Tensor:
        """bool [B, N, N], mask[b, q, k] = q may attend to k (union of branches)."""
        text, image = self._dense_branches()
        return text | image

    def dense_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(text-key mask, image-key mask), each bool [B, N, N]; their union is dense()."""
        return self._dense_branches()

    def _dense_branches(self):
        # Written from the definitions, not from lo/hi, so that tests compare two
        # independent derivations.
        seg, img = self.segment_ids, self.image_ids
        n = seg.shape[1]
        pos = torch.arange(n, device=seg.device)
        same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
        causal = (pos[None, None, :] <= pos[None, :, None])
        text_q, text_k = (img < 0)[:, :, None], (img < 0)[:, None, :]
        if self.kind == "causal":
            allowed = same & causal
        elif self.kind == "prefix_lm":
            pre = self.prefix_mask
            allowed = same & (causal | (pre[:, :, None] & pre[:, None, :]))
        elif self.kind == "image_bidirectional":
            same_image = (img[:, :, None] == img[:, None, :]) & ~text_q
            allowed = same & (causal | same_image)
        else:  # mmca
            diag = torch.eye(n, dtype=torch.bool, device=seg.device)[None]
            allowed = same & causal & (text_q | text_k | diag)
        return allowed & text_k, allowed & ~text_k

    def flex_mask_mod(self):
        """The same mask as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``, for
        interoperability and as the baseline in tests and benchmarks."""
        seg, img, pre, kind = self.segment_ids, self.image_ids, self.prefix_mask, self.kind

        def mask_mod(b, h, q, k):
            same = (seg[b, q] == seg[b, k]) & (seg[b, q] >= 0)
            causal = k <= q
            if kind == "causal":
                return same & causal
            if kind == "prefix_lm":
                return same & (causal | (pre[b, q] & pre[b, k]))
            if kind == "image_bidirectional":
                return same & (causal | ((img[b, q] == img[b, k]) & (img[b, q] >= 0)))
            return same & causal & ((img[b, q] < 0) | (img[b, k] < 0) | (q == k))

        return mask_mod

    # ---- block map ------------------------------------------------------------------
    def block_map(self, block_q: int = 128, block_k: int | None = None, *,
                  backend: str = "auto") -> BlockMap:
        """Tile classes at (block_q, block_k); see BlockMap. Cached per block size.

        backend: ``auto`` (the compiled op for this device if built, else the
        reference), ``reference`` (torch), ``cpp`` (C++ CPU op), ``cuda``
        (CUDA kernel). All agree exactly.
        """
        block_k = block_q if block_k is None else block_k
        for name, val in (("block_q", block_q), ("block_k", block_k)):
            if not isinstance(val, int) or val <= 0:
                _fail(name, f"expected a positive int, got {val!r}")
        cached = backend == "auto"
        if cached and (block_q, block_k) in self._block_maps:
            return self._block_maps[(block_q, block_k)]
        backend = resolve_backend("block_map", backend, self.device)
        if backend == "reference":
            lists = block_map_reference(self.lo, self.hi, self.is_image, self.kind_code, block_q, block_k)
        else:
            lists = _ext.block_map(self.lo, self.hi, self.is_image, self.kind_code, block_q, block_k)
        bm = BlockMap(block_q, block_k, self.seq_len, *lists)
        if cached:
            self._block_maps[(block_q, block_k)] = bm
        return bm

    # ---- constructors ---------------------------------------------------------------
    @classmethod
    def from_cu_seqlens(cls, cu_seqlens, seq_len: int | None = None, *, image_ids=None,
                        prefix_mask=None, kind: str = "causal", split_softmax: bool = False):
        """One packed row from flash-attn style cumulative lengths [0, l0, l0+l1, ...].

        Tokens past cu_seqlens[-1] (up to seq_len) are padding. image_ids and
        prefix_mask, if given, are [N] or [1, N].
        """
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 \
                or cu_seqlens.is_floating_point() or cu_seqlens.numel() < 1:
            _fail("cu_seqlens", "expected a 1-D integer tensor [num_samples + 1]")
        cu = cu_seqlens.long()
        if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
            _fail("cu_seqlens", "must start at 0 and be non-decreasing")
        total = int(cu[-1])
        n = total if seq_len is None else as_int(seq_len, "seq_len", minimum=1)
        if n < total:
            _fail("seq_len", f"{n} is shorter than cu_seqlens[-1] = {total}")
        seg = torch.full((1, n), -1, dtype=torch.int32, device=cu.device)
        lengths = cu[1:] - cu[:-1]
        seg[0, :total] = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device,
                                                              dtype=torch.int32), lengths)

        def row(x):
            return None if x is None else (x[None] if x.dim() == 1 else x)

        return cls(seg, row(image_ids), row(prefix_mask), kind, split_softmax=split_softmax)

    @classmethod
    def from_input_ids(cls, input_ids, image_token_id: int, *, attention_mask=None,
                       segment_ids=None, prefix_mask=None, kind: str = "causal",
                       split_softmax: bool = False, tokens_per_image: int | None = None):
        """From token ids: each consecutive run of ``image_token_id`` is one image,
        or, with ``tokens_per_image``, that many images back to back.

        Segments come from ``segment_ids`` if given, else from
        ``attention_mask`` (0 = padding), else the whole row is one sample.
        Images are numbered 0, 1, ... per row in order of appearance.
        """
        ids = _as_ids(input_ids, "input_ids") if isinstance(input_ids, torch.Tensor) and \
            input_ids.dim() == 2 and not input_ids.is_floating_point() else None
        if ids is None:
            _fail("input_ids", "expected an integer tensor of shape [B, N]")
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                           or tuple(attention_mask.shape) != tuple(ids.shape)):
            _fail("attention_mask", f"expected a tensor of shape {tuple(ids.shape)}")
        if segment_ids is None:
            seg = (torch.zeros_like(ids) if attention_mask is None
                   else torch.where(attention_mask.bool(), 0, -1).to(torch.int32))
        else:
            seg = _as_ids(segment_ids, "segment_ids", tuple(ids.shape), ids.device)
            if attention_mask is not None and not torch.equal(seg >= 0, attention_mask.bool()):
                _fail("attention_mask", "disagrees with segment_ids about padding (segment_ids == -1)")
        is_img = ids == image_token_id
        starts = is_img & ~_shift(is_img, False)
        if tokens_per_image is not None:  # a run of k * T tokens is k images
            tokens_per_image = as_int(tokens_per_image, "tokens_per_image", minimum=1)
            idx = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            run_start = torch.where(starts, idx, 0).cummax(1).values
            starts = is_img & ((idx - run_start) % tokens_per_image == 0)
        run_index = starts.cumsum(1) - 1
        image_ids = torch.where(is_img, run_index, -1).to(torch.int32)
        if bool(((image_ids >= 0) & (image_ids == _shift(image_ids, -1)) & _segment_starts(seg)).any()):
            _fail("input_ids", "an image's placeholder run crosses a segment boundary (segment_ids / "
                               "attention_mask): each image must lie within one sample")
        return cls(seg, image_ids, prefix_mask, kind, split_softmax=split_softmax)

    @classmethod
    def from_lengths(cls, lengths: Sequence[int] | Sequence[Sequence[int]], seq_len: int | None = None,
                     *, image_spans=None, prefix_lengths=None, kind: str = "causal",
                     split_softmax: bool = False, device="cpu"):
        """From per-sample lengths, packed left to right; the rest of a row is padding.

        lengths: one row ``[l0, l1, ...]`` or a batch ``[[...], [...]]``.
        image_spans: per row, a list of ``(start, length)`` in row coordinates.
        prefix_lengths: per row, one prefix length per sample (prefix_lm).
        """
        rows = _int_rows(lengths, "lengths")
        n = max(sum(r) for r in rows) if seq_len is None else as_int(seq_len, "seq_len", minimum=1)
        if any(sum(r) > n for r in rows):
            _fail("seq_len", f"{n} is shorter than a row's total length")
        batch = len(rows)
        if prefix_lengths is not None:
            prefix_lengths = _int_rows(prefix_lengths, "prefix_lengths", [len(r) for r in rows])
        seg = torch.full((batch, n), -1, dtype=torch.int32)
        img = torch.full((batch, n), -1, dtype=torch.int32)
        pre = torch.zeros((batch, n), dtype=torch.bool) if prefix_lengths is not None else None
        for b, r in enumerate(rows):
            start = 0
            for s, length in enumerate(r):
                seg[b, start:start + length] = s
                if pre is not None:
                    p = prefix_lengths[b][s]
                    if not 0 <= p <= length:
                        _fail("prefix_lengths", f"row {b} sample {s}: {p} not in [0, {length}]")
                    pre[b, start:start + p] = True
                start += length
        if image_spans is not None:
            if len(image_spans) != batch:
                _fail("image_spans", f"expected one list per row ({batch}), got {len(image_spans)}")
            for b, spans in enumerate(image_spans):
                for i, span in enumerate(spans):
                    start, length = _span(span, f"image_spans: row {b} span {i}")
                    if start < 0 or length <= 0 or start + length > n:
                        _fail("image_spans", f"row {b} span {i} = ({start}, {length}) is outside [0, {n})")
                    if bool((img[b, start:start + length] >= 0).any()):
                        _fail("image_spans", f"row {b} span {i} = ({start}, {length}) overlaps an earlier span")
                    if bool((seg[b, start:start + length] != seg[b, start]).any()) or int(seg[b, start]) < 0:
                        _fail("image_spans", f"row {b} span {i} = ({start}, {length}) is not inside one sample "
                                             f"(samples of lengths {rows[b]} packed from 0)")
                    img[b, start:start + length] = i
        return cls(seg.to(device), img.to(device), None if pre is None else pre.to(device), kind,
                   split_softmax=split_softmax)


def _int_rows(values, arg: str, row_lengths: list[int] | None = None) -> list[list[int]]:
    """One row ``[a, b, ...]`` or a batch of rows, as lists of ints >= 0 (numpy and 0-d
    integer tensor entries are ints; see as_int); with `row_lengths`, the batch's shape."""
    if isinstance(values, torch.Tensor):
        if values.dim() not in (1, 2):
            _fail(arg, f"expected one row or a batch of rows, got a tensor of shape {tuple(values.shape)}")
        values = values.unbind(0)
    try:
        values = list(values)
        nested = bool(values) and (isinstance(values[0], (list, tuple)) or getattr(values[0], "ndim", 0) == 1)
        rows = [list(r) for r in values] if nested else [values]
    except TypeError:
        _fail(arg, f"expected a list of ints or of lists of ints, got {values!r}")
    rows = [[as_int(x, arg, minimum=0) for x in r] for r in rows]
    if row_lengths is None and (not rows or not any(rows)):
        _fail(arg, f"expected at least one sample, got {rows}")
    if row_lengths is not None and [len(r) for r in rows] != row_lengths:
        _fail(arg, f"expected one entry per sample (rows of {row_lengths}), got rows of {[len(r) for r in rows]}")
    return rows


def _span(span, where: str) -> tuple[int, int]:
    try:
        start, length = span
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a (start, length) pair, got {span!r}") from None
    return as_int(start, "image_spans"), as_int(length, "image_spans")


def _compiled_block_map(device_type: str):
    def check(device: torch.device):
        if device.type != device_type:
            return f"it runs on {device_type} tensors only"
        if not _ext.supports_device(device):
            return f"fastvlm._C has no {device_type} block_map kernel ({_ext.load_error or 'built without CUDA'})"
        return True
    return check


register_op("block_map", {"reference": lambda device: True, "cpp": _compiled_block_map("cpu"),
                          "cuda": _compiled_block_map("cuda")},
            {"cpu": ("cpp", "reference"), "cuda": ("cuda", "reference")})


def block_map_reference(lo, hi, is_image, kind: int, block_q: int, block_k: int):
    """Torch block map from per-token intervals: the same O(N + Tq*Tk) summaries
    and exact tile rules as csrc/block_map/block_map.h, vectorised."""
    b, n = lo.shape
    dev = lo.device
    tq, tk = -(-n // block_q), -(-n // block_k)
    big = _INT32_MAX
    live = hi >= lo
    image = live & is_image.bool()
    cum = lambda x: torch.nn.functional.pad(x.long().cumsum(1), (1, 0))  # noqa: E731
    nonpad_cum, image_cum = cum(live), cum(image)

    def blocks(x, size, count, fill):
        return torch.nn.functional.pad(x, (0, size * count - n), value=fill).view(b, count, size)

    lq, lo_b, hi_b, im_b = (blocks(live, block_q, tq, False), blocks(lo, block_q, tq, 0),
                            blocks(hi, block_q, tq, 0), blocks(image, block_q, tq, False))
    rows = lq.sum(-1)
    min_lo = torch.where(lq, lo_b, big).amin(-1)
    max_lo = torch.where(lq, lo_b, -1).amax(-1)
    min_hi = torch.where(lq, hi_b, big).amin(-1)
    max_hi = torch.where(lq, hi_b, -1).amax(-1)
    min_lo_text = torch.where(lq & ~im_b, lo_b, big).amin(-1)
    min_lo_image = torch.where(im_b, lo_b, big).amin(-1)
    image_rows = im_b.sum(-1)
    pos = torch.arange(n, device=dev).expand(b, n)
    last_text = blocks(torch.where(live & ~image, pos, -1), block_k, tk, -1).amax(-1)

    q0 = torch.arange(tq, device=dev) * block_q
    q1 = torch.clamp(q0 + block_q, max=n) - 1
    k0 = torch.arange(tk, device=dev) * block_k
    k1 = torch.clamp(k0 + block_k, max=n) - 1
    q0, q1, k0, k1 = q0[:, None], q1[:, None], k0[None, :], k1[None, :]
    col = lambda x: x[:, :, None]  # noqa: E731  per-q-block summary against kv blocks
    m0, m1 = torch.maximum(q0, k0), torch.minimum(q1, k1)
    overlap = m0 <= m1
    in_overlap = nonpad_cum[:, (m1 + 1).clamp(0, n)] - nonpad_cum[:, m0.clamp(0, n)]
    before = k1 < q0  # keys strictly before the queries
    mmca = kind == KIND_CODES["mmca"]
    if mmca:
        any_before = (col(min_lo_text) <= k1) | ((col(min_lo_image) != big) &
                                                 (last_text[:, None, :] >= col(min_lo_image)))
        any_after = torch.zeros_like(any_before)
    else:
        any_before = col(min_lo) <= k1
        any_after = col(max_hi) >= k0
    any_ = torch.where(overlap, in_overlap > 0, torch.where(before, any_before, any_after))
    any_ &= col(rows) > 0
    all_ = (col(rows) == (q1 - q0 + 1)) & (col(max_lo) <= k0) & (col(min_hi) >= k1)
    if mmca:
        image_keys = image_cum[:, k1 + 1] - image_cum[:, k0]
        diag_only = (col(image_rows) == 1) & (image_keys == 1) & (k1 == q0) & image[:, q0.clamp(max=n - 1)]
        all_ &= ~((col(image_rows) > 0) & (image_keys > 0) & ~diag_only)
    cls = torch.where(any_, torch.where(all_, 2, 1), 0)  # [B, Tq, Tk]

    def lists(c, value):
        hit = c == value
        num = hit.sum(-1)
        width = c.shape[-1]
        order = torch.arange(width, device=dev).expand_as(c)
        idx = torch.where(hit, order, width + order).sort(-1).values
        idx = torch.where(order < num[..., None], idx, 0)
        return num.to(torch.int32).contiguous(), idx.to(torch.int32).contiguous()

    cls_t = cls.transpose(1, 2)
    return (*lists(cls, 1), *lists(cls, 2), *lists(cls_t, 1), *lists(cls_t, 2))
