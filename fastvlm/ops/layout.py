"""Attention layouts described by compact per-token metadata.

A packed batch carries, per token, the sample it belongs to (``segment_ids``,
-1 for padding), the image it came from (``image_ids``, -1 for text) and,
for prefix-LM, whether it is in the bidirectional prefix. Every mask kind is
a predicate over that metadata, and always stays within one segment: tokens
never see another segment, padding sees nothing and is seen by nothing.

Each kind is defined once, with its picture, in fastvlm.ops.mask_kinds:
``causal``, ``prefix_lm`` (PaliGemma), ``image_bidirectional`` (Gemma 3 /
PaliGemma images) and ``mmca`` (DeepSpeed-VisualChat, optionally with
``split_softmax``). The dense mask, FlexAttention's mask_mod, the tile
predicate and the block map below all derive from that definition.

Internally every kind reduces to an interval of allowed keys per query row,
``[lo[q], hi[q]]`` (a kind that isolates images, mmca, also drops other image
keys for image queries). A shared-prompt row (``branch_ids``: 0 = the prompt,
1..k = answers) adds per query a cut ``[cut_lo[q], cut_hi[q]]`` inside it: an
answer's query sees the prompt and its own answer, two intervals.
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
from fastvlm.ops import mask_kinds
from fastvlm.ops.backend import always, register_op, resolve_backend
from fastvlm.ops.mask_kinds import KIND_DEFS, KINDS, image_run_key, segment_starts
from fastvlm.ops.mask_kinds import shift as _shift
from fastvlm.utils.checks import as_int

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

    # ---- work order of the kernels' longest-first grids (fastvlm.kernels.attention) -------------
    def row_order(self) -> torch.Tensor:
        """int32 [B * Tq]: every (batch row b, query block i) once as b * Tq + i, by descending
        number of tiles to visit (partial + full; ties in index order). A longest-first grid
        walks it; the forward and the deterministic dQ kernel share it.
        Computed on the device (one argsort of B * Tq counts) and cached."""
        return self._cached("row_order", lambda: _longest_first(self.kv_num_blocks, self.full_kv_num_blocks))

    def column_order(self) -> torch.Tensor:
        """int32 [B * Tk]: every (b, key block j) once as b * Tk + j, by descending number of
        query blocks (the dK/dV kernel's own counts); as row_order."""
        return self._cached("column_order", lambda: _longest_first(self.q_num_blocks, self.full_q_num_blocks))

    def uniform_work(self) -> tuple[bool, bool] | None:
        """(every query block visits as many tiles, every key block as many), or None where that
        cannot be read now (torch.compile tracing, a CUDA graph capturing). Reading it waits
        for the block map on the device once; the answer is cached."""
        if torch.compiler.is_compiling() or (self.kv_num_blocks.is_cuda and torch.cuda.is_current_stream_capturing()):
            return None

        def read():
            rows = self.kv_num_blocks + self.full_kv_num_blocks
            cols = self.q_num_blocks + self.full_q_num_blocks
            lo_hi = torch.stack([rows.min(), rows.max(), cols.min(), cols.max()]).tolist()
            return lo_hi[0] == lo_hi[1], lo_hi[2] == lo_hi[3]
        return self._cached("uniform_work", read)

    def _cached(self, name: str, make):
        """A value derived from the lists, kept on this (frozen) map. Not kept while
        torch.compile traces: it would hold the trace's tensors past it."""
        derived = getattr(self, "_derived", None)
        if derived is not None and name in derived:
            return derived[name]
        got = make()
        if not torch.compiler.is_compiling():
            object.__setattr__(self, "_derived", {**(derived or {}), name: got})
        return got


def _longest_first(num: torch.Tensor, full_num: torch.Tensor) -> torch.Tensor:
    counts = (num + full_num).flatten()
    return torch.argsort(counts, descending=True, stable=True).to(torch.int32)


def _check_window(window) -> None:
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        _fail("window", f"expected None or a positive int, got {window!r}")


def _fail(arg: str, msg: str):
    raise ValueError(f"{arg}: {msg}")


def _kinds_where(flag: str) -> str:
    return " or ".join(repr(name) for name in KINDS if getattr(KIND_DEFS[name], flag))


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






def _runs_contiguous(key: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """Per row: does every key value among `member` tokens form one run? -> bool [B]."""
    prev_key, prev_member = _shift(key, -1), _shift(member, False)
    starts = (member & (~prev_member | (key != prev_key))).sum(1)
    sentinel = torch.iinfo(torch.int64).max
    ordered = torch.where(member, key, sentinel).sort(dim=1).values
    prev_sorted = _shift(ordered, sentinel)
    distinct = ((ordered != prev_sorted) & (ordered != sentinel)).sum(1)
    return starts == distinct


def _check_branches(branch_ids, seg: torch.Tensor, img: torch.Tensor, prefix_mask) -> torch.Tensor:
    """branch_ids validated against the other metadata, as int32 with 0 at padding."""
    branch = _as_ids(branch_ids, "branch_ids", tuple(seg.shape), seg.device)
    live = seg >= 0
    if bool((branch[live] < 0).any()):
        _fail("branch_ids", "expected ids >= 0 at live tokens (0 = the shared prompt, 1..k = answers)")
    branch = torch.where(live, branch, 0)
    tokens = mask_kinds.Tokens(seg, img, None, branch)
    if not bool(_runs_contiguous(tokens.branch_key, live).all()):
        _fail("branch_ids", "each answer (branch id > 0) and the prompt (0) must be one contiguous run "
                            "within its segment")
    if bool((live & (branch == 0) & (tokens.branch_start != tokens.segment_start)).any()):
        _fail("branch_ids", "the shared prompt (branch 0) must lead its segment, before every answer")
    same_seg = live & (seg == _shift(seg, -2))
    crosses = same_seg & (branch != _shift(branch, 0))
    if bool((crosses & (img >= 0) & (img == _shift(img, -1))).any()):
        _fail("image_ids", "an image's run crosses from one branch (branch_ids) into another")
    if prefix_mask is not None and bool((crosses & prefix_mask & _shift(prefix_mask, False)).any()):
        _fail("prefix_mask", "the prefix crosses from one branch (branch_ids) into another")
    return branch.contiguous()


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
        window: None, or a positive int: each query also drops keys ``window`` or more
            positions before it (sliding-window attention; see mask_kinds.intervals).
        branch_ids: int [B, N] or None; a shared prompt and its answers in one segment:
            0 for the prompt, which leads its segment, 1..k for the answers, each one
            contiguous run (values at padding are ignored). An answer sees the prompt and
            itself, never another answer; the prompt never sees an answer (on top of the
            kind; see mask_kinds). Images and the prefix lie within one branch each.
            Positions (``positions``) of every answer continue from the prompt's end.

    See the module docstring for a picture of each kind.
    """

    def __init__(self, segment_ids, image_ids=None, prefix_mask=None, kind: str = "causal", *,
                 split_softmax: bool = False, window: int | None = None, branch_ids=None):
        _check_window(window)
        if kind not in KIND_DEFS:
            _fail("kind", f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        if split_softmax and not KIND_DEFS[kind].split_softmax:
            _fail("split_softmax", f"only defined for kind={_kinds_where('split_softmax')}, got kind={kind!r}")
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
        if not bool(_runs_contiguous(image_run_key(seg, img), img >= 0).all()):
            _fail("image_ids", "each image id must form one contiguous run within its segment "
                               "(give separate images separate ids)")
        if prefix_mask is not None:
            if not KIND_DEFS[kind].uses_prefix:
                _fail("prefix_mask", f"only used by kind={_kinds_where('uses_prefix')}, got kind={kind!r}")
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
        elif KIND_DEFS[kind].uses_prefix:
            _fail("prefix_mask", f"required for kind={kind!r}")
        if branch_ids is not None:
            branch_ids = _check_branches(branch_ids, seg, img, prefix_mask)

        self.segment_ids, self.image_ids, self.prefix_mask = seg, img, prefix_mask
        self.branch_ids = branch_ids
        self.kind, self.split_softmax, self.window = kind, bool(split_softmax), window
        self.mask_kind = KIND_DEFS[kind]
        self.lo, self.hi, self.cut = mask_kinds.intervals(self.mask_kind, self._token_runs(), window)
        self.is_image = (img >= 0).contiguous()
        self._block_maps: dict[tuple[int, int], BlockMap] = {}
        self._query_blocks: dict[tuple[int, int], torch.Tensor] = {}
        self._windowed: dict[int | None, AttentionLayout] = {}

    # ---- derived metadata ------------------------------------------------------------
    def _token_runs(self) -> mask_kinds.Tokens:
        """The metadata as the kinds' rules read it (not kept: the layout holds lo / hi only)."""
        return mask_kinds.Tokens(self.segment_ids, self.image_ids, self.prefix_mask, self.branch_ids)

    @property
    def kind_code(self) -> int:
        return self.mask_kind.code

    def allowed_pairs(self) -> int:
        """(query, key) pairs the mask allows over the batch, in O(N)."""
        return mask_kinds.allowed_pairs(self.mask_kind, self.lo, self.hi, self.is_image, self.cut)

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
        """Bytes held by the metadata (the kernels' view: lo, hi, is_image and any cut)."""
        held = (self.lo, self.hi, self.is_image) + (() if self.cut is None else (self.cut,))
        return sum(t.numel() * t.element_size() for t in held)

    def positions(self) -> torch.Tensor:
        """int64 [B, N] RoPE positions: the index within each packed segment, where every
        answer of a shared prompt continues from the prompt's end (the answers before it in
        the row, its cut, are not counted). Padding keeps its index in the row."""
        idx = torch.arange(self.seq_len, device=self.device)[None]
        t = self._token_runs()
        pos = idx - t.segment_start.long()
        if self.branch_ids is not None:  # from the metadata, not the cut (a window may drop it)
            skipped = t.branch_start.long() - t.prompt_end.long() - 1
            pos = pos - torch.where(self.branch_ids > 0, skipped, 0)
        return torch.where(t.live, pos, idx)

    def to(self, device) -> "AttentionLayout":
        return AttentionLayout(self.segment_ids.to(device), self.image_ids.to(device),
                               None if self.prefix_mask is None else self.prefix_mask.to(device),
                               self.kind, split_softmax=self.split_softmax, window=self.window,
                               branch_ids=None if self.branch_ids is None else self.branch_ids.to(device))

    def with_window(self, window: int | None) -> "AttentionLayout":
        """This mask with a sliding ``window`` (None: without one), built once per window
        and kept: every sliding layer of a forward shares it (and its block maps)."""
        _check_window(window)  # before the lookup: True == 1 and 3.0 == 3 as dict keys
        if window == self.window:
            return self
        if window not in self._windowed:
            self._windowed[window] = AttentionLayout(self.segment_ids, self.image_ids, self.prefix_mask, self.kind,
                                                     split_softmax=self.split_softmax, window=window,
                                                     branch_ids=self.branch_ids)
        return self._windowed[window]

    def unpadded(self) -> tuple["AttentionLayout", torch.Tensor]:
        """(the same mask over the live tokens only, as one row [1, T], and their flat indices
        into [B * N]): every row's segments in order, renumbered so that no two touch with one
        id (images keep their runs, offset per row). Each kind stays within its segment, so a
        token attends to exactly the keys it did; per-token work (projections, MLPs, the loss)
        then skips the padding that fixed-length rows carry."""
        new_seg, index, row = live_segments_as_one_row(self.segment_ids)
        img = self.image_ids.flatten()[index].long()
        stride = int(self.image_ids.max()) + 1 if index.numel() else 1
        new_img = torch.where(img >= 0, img + row * stride, -1).to(self.image_ids.dtype)
        prefix = None if self.prefix_mask is None else self.prefix_mask.flatten()[index][None]
        branch = None if self.branch_ids is None else self.branch_ids.flatten()[index][None]
        return AttentionLayout(new_seg, new_img[None], prefix, self.kind, split_softmax=self.split_softmax,
                               window=self.window, branch_ids=branch), index

    def __repr__(self):
        window = "" if self.window is None else f", window={self.window}"
        window += "" if self.branch_ids is None else ", branched"
        return (f"AttentionLayout(kind={self.kind!r}, split_softmax={self.split_softmax}{window}, "
                f"shape={self.shape}, device={self.device})")

    # ---- as flash-attn's varlen arguments ----------------------------------------------
    @functools.cached_property
    def is_packed_causal(self) -> bool:
        """True if every live token sees exactly the earlier tokens of its own segment:
        plain or packed causal attention, whatever ``kind`` says (e.g. mmca of text only).
        Conservative for mmca: any image token makes it False. False without live tokens."""
        t = self._token_runs()
        causal_rows = bool((((self.lo == t.segment_start) & (self.hi == t.pos)) | ~t.live).all())
        # a kind that isolates images removes image keys from image queries' rows: only
        # without images is it causal
        isolated = self.mask_kind.isolates_images and bool(self.is_image.any())
        return causal_rows and bool(t.live.any()) and not isolated and self.cut is None

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
        key = segment_starts(seg).flatten().long().cumsum(0)[live]
        lengths = torch.unique_consecutive(key, return_counts=True)[1]
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        index = None if bool(live.all()) else live.nonzero().squeeze(1)
        return cu, index, int(lengths.max()) if lengths.numel() else 0

    # ---- dense masks (tests / small N) ----------------------------------------------
    def dense(self) -> torch.Tensor:
        """bool [B, N, N], mask[b, q, k] = q may attend to k (union of branches)."""
        pos = torch.arange(self.seq_len, device=self.device)
        img = self.is_image
        cuts = () if self.cut is None else (self.cut[0][:, :, None], self.cut[1][:, :, None])
        return mask_kinds.allowed(self.mask_kind, pos[None, :, None], pos[None, None, :], self.lo[:, :, None],
                                  self.hi[:, :, None], img[:, :, None], img[:, None, :], *cuts)

    def dense_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(text-key mask, image-key mask), each bool [B, N, N]; their union is dense()."""
        return mask_kinds.branches(self.dense(), self.is_image[:, None, :], split_softmax=True)

    def flex_mask_mod(self):
        """The same mask as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``, for
        interoperability and as the baseline in tests and benchmarks."""
        lo, hi, img, kind, cut = self.lo, self.hi, self.is_image, self.mask_kind, self.cut

        def mask_mod(b, h, q, k):
            cuts = () if cut is None else (cut[0, b, q], cut[1, b, q])
            return mask_kinds.allowed(kind, q, k, lo[b, q], hi[b, q], img[b, q], img[b, k], *cuts)

        return mask_mod

    def tile_predicate(self, b: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """bool [rows, cols]: the allowed pairs of query `rows` x key `cols` of batch row b
        (what the kernels evaluate in partial tiles)."""
        return mask_kinds.tile(self.mask_kind, rows, cols, self.lo[b], self.hi[b], self.is_image[b],
                               None if self.cut is None else self.cut[:, b])

    def query_blocks(self, block: int, merge: int | None = None) -> torch.Tensor:
        """int64 [calls, 7], rows ``(b, q0, q1, k0, k1, causal, s)``: the calls a per-range
        attention kernel makes, in row order, each query range [q0, q1) with every allowed key
        in [k0, k1), grouped by ``s`` (calls with the same s share keys):
        - a segment longer than `block` whose mask is plain causal (``is_packed_causal``
          restricted to it) is one call, causal=1, k = q;
        - a longer non-causal one is cut into calls of `block` queries, each against the
          union of its rows' intervals;
        - a segment of more than `merge` (default `block`) and at most `block` tokens is one
          call of its own, causal=1 where its mask is plain causal;
        - shorter segments are merged, in order, into calls of at most `merge` tokens
          (with the padding around them while it fits: its rows allow nothing, and a row of
          at most `merge` tokens is one call) with k = q, causal=1 only for a single causal
          segment without padding.
        So no call spans more than `block` queries unless causal, and no range leaves its
        segments. Cached per (block, merge) (it syncs with the host; every layer asks again)."""
        block = as_int(block, "block", minimum=1)
        merge = block if merge is None else min(as_int(merge, "merge", minimum=1), block)
        if (block, merge) not in self._query_blocks:
            self._query_blocks[block, merge] = self._segment_ranges(block, merge)
        return self._query_blocks[block, merge]

    def _segment_ranges(self, block: int, merge: int) -> torch.Tensor:
        t = self._token_runs()
        not_causal = t.live & ((self.lo != t.segment_start) | (self.hi != t.pos))
        if self.mask_kind.isolates_images:  # image keys leave image queries' rows
            not_causal |= self.is_image
        if self.cut is not None:  # answers of a shared prompt skip the answers before them
            not_causal |= self.cut[1] >= self.cut[0]
        bad = torch.nn.functional.pad(not_causal.long().cumsum(1), (1, 0))
        ends = mask_kinds.run_end(self.segment_ids.long(), t.live) + 1
        starts = segment_starts(self.segment_ids)
        calls, n = [], self.seq_len
        for b in range(self.batch_size):
            lo, hi, bad_b, ends_b = self.lo[b].tolist(), self.hi[b].tolist(), bad[b].tolist(), ends[b].tolist()
            merged: list[tuple[int, int, bool]] = []  # short segments waiting to share a call

            def flush(row_end=False):
                if not merged:
                    return
                c0, c1 = merged[0][0], merged[-1][1]
                # padding around the chunk joins it while it fits: whole rows become one call
                prev = calls[-1][2] if calls and calls[-1][0] == b else 0
                c0 = prev if c1 - prev <= merge else c0
                c1 = n if row_end and n - c0 <= merge else c1
                causal = len(merged) == 1 and merged[0][2] and (c0, c1) == merged[0][:2]
                calls.append((b, c0, c1, c0, c1, int(causal), c0))
                merged.clear()

            for s in starts[b].nonzero().flatten().tolist():
                e = ends_b[s]
                causal = bad_b[e] == bad_b[s]
                if e - s <= merge:
                    if merged and e - merged[0][0] > merge:
                        flush()
                    merged.append((s, e, causal))
                    continue
                flush()
                if causal or e - s <= block:  # one call over the segment's own keys
                    calls.append((b, s, e, s, e, int(causal), s))
                    continue
                for q0 in range(s, e, block):
                    q1 = min(q0 + block, e)
                    calls.append((b, q0, q1, min(lo[q0:q1]), max(hi[q0:q1]) + 1, 0, s))
            flush(row_end=True)
        return torch.tensor(calls, dtype=torch.int64).view(-1, 7)

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
            lists = block_map_reference(self.lo, self.hi, self.is_image, self.kind_code, block_q, block_k, self.cut)
        else:
            lists = _ext.block_map(self.lo, self.hi, self.is_image, self.kind_code, block_q, block_k, self.cut)
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
                       split_softmax: bool = False, tokens_per_image: int | None = None, branch_ids=None):
        """From token ids: each consecutive run of ``image_token_id`` is one image,
        or, with ``tokens_per_image``, that many images back to back.

        Segments come from ``segment_ids`` if given, else from
        ``attention_mask`` (0 = padding), else the whole row is one sample.
        Images are numbered 0, 1, ... per row in order of appearance. ``branch_ids``: a
        shared prompt and its answers (see the class).
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
        if bool(((image_ids >= 0) & (image_ids == _shift(image_ids, -1)) & segment_starts(seg)).any()):
            _fail("input_ids", "an image's placeholder run crosses a segment boundary (segment_ids / "
                               "attention_mask): each image must lie within one sample")
        return cls(seg, image_ids, prefix_mask, kind, split_softmax=split_softmax, branch_ids=branch_ids)

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


def live_segments_as_one_row(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The live tokens (segment id >= 0) of every row of `segment_ids` [B, N], in order, as one
    row: (their segment ids [1, T], renumbered 0, 1, ... so that a new segment starts wherever
    the id or the row changes; their flat indices into [B * N]; their rows [T])."""
    b, n = segment_ids.shape
    index = (segment_ids >= 0).flatten().nonzero().squeeze(1)
    row = torch.arange(b, device=segment_ids.device).repeat_interleave(n)[index]
    seg = segment_ids.flatten()[index].long()
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[1:] = (seg[1:] != seg[:-1]) | (row[1:] != row[:-1])
    return (starts.cumsum(0) - 1).to(segment_ids.dtype)[None], index, row


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


register_op("block_map", {"reference": always, "cpp": _compiled_block_map("cpu"),
                          "cuda": _compiled_block_map("cuda")},
            {"cpu": ("cpp", "reference"), "cuda": ("cuda", "reference")},
            {"cpp": ("fastvlm::block_map",), "cuda": ("fastvlm::block_map",)})

def block_map_reference(lo, hi, is_image, kind: int, block_q: int, block_k: int, cut=None):
    """Torch block map from per-token intervals (and cuts, int32 [2, B, N] or None): the
    same O(N + Tq*Tk) summaries and exact tile rules as csrc/block_map/block_map.h, vectorised."""
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
    isolate = mask_kinds.kind_by_code(kind).isolates_images
    if isolate:
        any_before = (col(min_lo_text) <= k1) | ((col(min_lo_image) != big) &
                                                 (last_text[:, None, :] >= col(min_lo_image)))
    else:
        any_before = col(min_lo) <= k1
    any_after = col(max_hi) >= k0  # an isolating kind keeps image rows causal: only text rows reach forward
    any_ = torch.where(overlap, in_overlap > 0, torch.where(before, any_before, any_after))
    any_ &= col(rows) > 0
    all_ = (col(rows) == (q1 - q0 + 1)) & (col(max_lo) <= k0) & (col(min_hi) >= k1)
    if isolate:
        image_keys = image_cum[:, k1 + 1] - image_cum[:, k0]
        diag_only = (col(image_rows) == 1) & (image_keys == 1) & (k1 == q0) & image[:, q0.clamp(max=n - 1)]
        all_ &= ~((col(image_rows) > 0) & (image_keys > 0) & ~diag_only)
    if cut is not None:
        text_cum = nonpad_cum - image_cum
        cut_any, cut_free = _cut_rules(lo, hi, image if isolate else torch.zeros_like(image), cut, text_cum,
                                       last_text, block_q, block_k, tq, tk)
        any_ = torch.where(overlap | ~before, any_, cut_any & (col(rows) > 0))
        all_ &= cut_free
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


def _cut_rules(lo, hi, isolated, cut, text_cum, last_text, block_q: int, block_k: int, tq: int, tk: int):
    """(any allowed pair in a tile of keys strictly before its queries, no query's cut meets
    the tile), bool [B, Tq, Tk], for a layout with cuts (block_map.h's CutCell, vectorised).
    A query q sees [lo, hi] less its cut, lo < cut_lo <= cut_hi < q <= hi; `isolated` marks
    the image queries of an image-isolating kind, which see text keys (and themselves) only.
    Each rule is "some query of the block with x_q <= (a bound of the tile) has y_q > (another
    bound)": x_q picks a kv-block bucket of one cell per (q block, bucket), a cumulative max
    or min over the buckets answers it for every tile, O(N + Tq*Tk)."""
    b, n = lo.shape
    dev = lo.device
    big = _INT32_MAX
    live = hi >= lo
    cut_lo, cut_hi = cut[0].long(), cut[1].long()
    has_cut = live & (cut_hi >= cut_lo)
    lo, qblock = lo.long(), (torch.arange(n, device=dev) // block_q).expand(b, n)

    def cells(bucket, value, member, reduce: str, init: int):
        out = torch.full((b, tq * (tk + 1)), init, dtype=torch.long, device=dev)
        value = torch.where(member, value, init)
        out.scatter_reduce_(1, qblock * (tk + 1) + bucket.clamp(0, tk), value, reduce)
        return out.view(b, tq, tk + 1)

    def per_block(value, member):  # min over each q block's members
        padded = torch.nn.functional.pad(torch.where(member, value, big), (0, tq * block_q - n), value=big)
        return padded.view(b, tq, block_q).amin(-1)

    k0 = (torch.arange(tk, device=dev) * block_k)[None, None]
    k1 = torch.clamp(k0 + block_k, max=n) - 1
    text_rows = live & ~isolated
    # a text-role query meets a before-tile iff lo <= k1 and not (cut_lo <= k0 and k1 <= cut_hi)
    text_cut_lo = cells(lo // block_k, torch.where(has_cut, cut_lo, big), text_rows, "amax", -1).cummax(-1).values
    min_cut_hi_text = per_block(cut_hi, text_rows & has_cut)[..., None]
    any_ = (text_cut_lo[..., :tk] > k0) | (min_cut_hi_text < k1)
    # an isolated image query: a text key of [lo, cut_lo - 1] or of [cut_hi + 1, q - 1] in the tile
    image_rows = live & isolated
    if bool(image_rows.any()):
        prompt_bucket = torch.where(has_cut, (cut_lo - 1) // block_k, tk)
        image_lo = cells(prompt_bucket, lo, image_rows, "amin", big).flip(-1).cummin(-1).values.flip(-1)
        last_text_t = last_text[:, None, :]
        tile_start = prompt_bucket.clamp(max=tk - 1) * block_k
        first = torch.maximum(lo, tile_start)
        prompt_text = text_cum.gather(1, cut_lo.clamp(0, n)) - text_cum.gather(1, first.clamp(0, n))
        hit = cells(prompt_bucket, (prompt_text > 0).long(), image_rows & has_cut, "amax", 0)[..., :tk] > 0
        min_cut_hi_image = per_block(cut_hi, image_rows & has_cut)[..., None]
        any_ |= hit | ((last_text_t >= 0) & ((image_lo[..., 1:] <= last_text_t) | (min_cut_hi_image < last_text_t)))
    # no query's cut meets the tile: none with cut_lo <= k1 has cut_hi >= k0
    cut_reach = cells(cut_lo // block_k, cut_hi, has_cut, "amax", -1).cummax(-1).values[..., :tk]
    return any_, cut_reach < k0


def shared_prompt_mrope_positions(prompt_positions: torch.Tensor, answer_lengths: Sequence[int]) -> torch.Tensor:
    """Qwen-style 3-row M-RoPE positions (temporal, height, width) of a shared-prompt row
    ``[prompt | answer 1 | ... | answer k]``: the prompt's own [3, P] (e.g. from the model's
    get_rope_index, images included), then every answer, text, counting on all three rows
    from the prompt's largest position + 1, as it would after the prompt alone.
    -> int64 [3, P + sum(answer_lengths)]."""
    if not isinstance(prompt_positions, torch.Tensor) or prompt_positions.dim() != 2 \
            or prompt_positions.shape[0] != 3 or prompt_positions.is_floating_point():
        _fail("prompt_positions", "expected an integer tensor [3, P] (M-RoPE's three rows)")
    lengths = [as_int(n, "answer_lengths", minimum=1) for n in answer_lengths]
    if not lengths:
        _fail("answer_lengths", "expected at least one answer")
    start = int(prompt_positions.max()) + 1 if prompt_positions.numel() else 0
    dev = prompt_positions.device
    answers = torch.cat([torch.arange(start, start + n, device=dev) for n in lengths])
    return torch.cat([prompt_positions.long(), answers[None].expand(3, -1)], 1)
