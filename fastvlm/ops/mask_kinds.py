"""Mask kinds, each defined once: the interval of keys a query may attend to.

A kind is one small rule over the tokens of a segment (attention-gym style: one
composable unit per mask). For a query q it gives the interval ``[lo(q), hi(q)]``
of allowed keys, always inside q's own segment; a kind that *isolates images*
additionally drops, for an image query, every image key but q itself (and, with
``split_softmax``, attends to text keys and image keys with two softmaxes).
Padding (segment -1) attends nothing and is attended by nothing.

Everything else is derived here or from the per-token ``lo``/``hi`` this gives:
``allowed`` is the pair rule that the dense mask, FlexAttention's ``mask_mod``
and the reference's tile predicate evaluate (fastvlm.ops.layout); the block maps
(torch, C++, CUDA) summarise ``lo``/``hi`` per block and know a kind only by its
code and ``isolates_images``; so do the Triton kernels. tests/test_mask_kinds.py
checks the C++ enum and the Triton constants against ``KIND_DEFS``.

Adding a kind: one definition below (its interval rule and picture), its code in
``MaskKind`` / ``kMaskKinds`` of csrc/block_map/block_map.h and, only if it
isolates images, the kernels' predicate (``isolates_images`` in block_map.h,
``IMAGE_ISOLATING_KINDS`` in fastvlm/kernels/attention.py). The block maps stay
exact for any interval rule; an image-isolating kind must keep image queries
causal (``hi(q) == q``), which the tile rules rely on.

Shared prompt (``branch_ids``, on top of every kind): a preference pair or k
completions of one prompt share it in one segment, ``[prompt | answer 1 | answer 2 ...]``
with branch 0 the prompt and 1..k the answers. A query of answer b sees what its kind
allows among the keys of the prompt and of answer b, never another answer's; a prompt
query never sees an answer. So an answer's query sees two key intervals, the prompt and
its own answer so far: ``[lo, hi]`` with the answers between them cut out,
``[cut_lo, cut_hi]`` (see ``intervals``). Under causal, prompt ``t i i`` and two answers
``a a`` (branch 1) and ``b b`` (branch 2)::

        t  x . . . . . .
        i  x x . . . . .
        i  x x x . . . .
        a  x x x x . . .
        a  x x x x x . .
        b  x x x . . x .
        b  x x x . . x x

The block maps summarise the cut exactly; the kernels evaluate it in partial tiles only.

Pictures: one segment ``t t i i t`` (t = text, i = image tokens of one image,
p = prefix token), rows are queries, columns keys, ``x`` = allowed.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch


# ---- per-token runs the rules are written in ------------------------------------------------
def shift(x: torch.Tensor, fill, right: bool = True) -> torch.Tensor:
    """x moved one step along dim 1 (right: x[i-1] at i), `fill` entering."""
    edge = torch.full_like(x[:, :1], fill)
    return torch.cat([edge, x[:, :-1]], 1) if right else torch.cat([x[:, 1:], edge], 1)


def segment_starts(seg: torch.Tensor) -> torch.Tensor:
    """bool [B, N]: the first token of each segment (a row's first live token always is)."""
    return (seg >= 0) & (seg != shift(seg, -2))


def image_run_key(seg: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """One int64 key per (segment, image) pair, so an image is local to its segment."""
    stride = int(img.max()) + 2 if img.numel() else 1
    return seg.long() * stride + img.long()


def run_end(key: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """Index of the last token of each member token's run (any value elsewhere)."""
    n = key.shape[1]
    idx = torch.arange(n, device=key.device).expand_as(key)
    next_key, next_member = shift(key, -1, right=False), shift(member, False, right=False)
    is_end = member & (~next_member | (next_key != key))
    marker = torch.where(is_end, idx, n)
    return marker.flip(1).cummin(1).values.flip(1)


class Tokens:
    """The per-token quantities kind rules are written in, each computed on first use.

    Assumes validated metadata (fastvlm.ops.layout): contiguous segments, image runs
    and prefix runs within each segment."""

    def __init__(self, segment_ids: torch.Tensor, image_ids: torch.Tensor, prefix_mask: torch.Tensor | None,
                 branch_ids: torch.Tensor | None = None):
        self.segment_ids, self.image_ids, self.prefix_mask = segment_ids, image_ids, prefix_mask
        self.branch_ids = branch_ids
        self.live = segment_ids >= 0
        self.is_image = image_ids >= 0

    @functools.cached_property
    def pos(self) -> torch.Tensor:
        seg = self.segment_ids
        return torch.arange(seg.shape[1], device=seg.device, dtype=torch.int32).expand_as(seg)

    @functools.cached_property
    def segment_start(self) -> torch.Tensor:
        """Position of the first token of each token's segment."""
        return torch.where(segment_starts(self.segment_ids), self.pos, 0).cummax(1).values

    @functools.cached_property
    def image_end(self) -> torch.Tensor:
        """Position of the last token of each image token's image (meaningless elsewhere)."""
        return run_end(image_run_key(self.segment_ids, self.image_ids), self.is_image)

    @functools.cached_property
    def prefix_end(self) -> torch.Tensor:
        """Position of the last prefix token of each prefix token's segment (meaningless elsewhere)."""
        return run_end(self.segment_ids.long(), self.prefix_mask)

    @functools.cached_property
    def branch_key(self) -> torch.Tensor:
        """One int64 key per (segment, branch) pair, so a branch is local to its segment."""
        stride = int(self.branch_ids.max()) + 1 if self.branch_ids.numel() else 1
        return self.segment_ids.long() * stride + self.branch_ids.long()

    @functools.cached_property
    def branch_start(self) -> torch.Tensor:
        """Position of the first token of each token's branch run (branches are contiguous)."""
        starts = self.live & (self.branch_key != shift(self.branch_key, -1))
        return torch.where(starts, self.pos, 0).cummax(1).values

    @functools.cached_property
    def branch_end(self) -> torch.Tensor:
        """Position of the last token of each live token's branch run."""
        return run_end(self.branch_key, self.live)

    @functools.cached_property
    def prompt_end(self) -> torch.Tensor:
        """For an answer token (branch > 0): position of the last shared-prompt (branch 0)
        token of its segment, or the segment's start - 1 without one. The prompt leads its
        segment, so the last prompt token at or before an answer token, if in its segment,
        is that one."""
        last = torch.where(self.live & (self.branch_ids == 0), self.pos, -1).cummax(1).values
        return torch.maximum(last, self.segment_start - 1)


# ---- the kinds ----------------------------------------------------------------------------------
Interval = Callable[[Tokens], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class MaskKind:
    """One kind: its name, its code in the compiled ops and kernels, its interval rule
    (Tokens -> (lo, hi) per live token) and its flags."""

    name: str
    code: int
    interval: Interval
    isolates_images: bool = False  # image queries drop every image key but their own
    uses_prefix: bool = False      # reads the layout's prefix_mask (required then)

    @property
    def split_softmax(self) -> bool:
        """Whether ``split_softmax`` (text and image keys as two softmaxes) is defined:
        for image-isolating kinds, DeepSpeed-VisualChat's definition proper."""
        return self.isolates_images


KIND_DEFS: dict[str, MaskKind] = {}


def _kind(code: int, **flags):
    def define(rule: Interval) -> Interval:
        KIND_DEFS[rule.__name__] = MaskKind(rule.__name__, code, rule, **flags)
        return rule
    return define


@_kind(0)
def causal(t: Tokens):
    """key position <= query position::

        t  x . . . .
        t  x x . . .
        i  x x x . .
        i  x x x x .
        t  x x x x x
    """
    return t.segment_start, t.pos


@_kind(1, uses_prefix=True)
def prefix_lm(t: Tokens):
    """PaliGemma: prefix tokens see the whole prefix, the rest is causal. With
    prefix ``p p p t t``::

        p  x x x . .
        p  x x x . .
        p  x x x . .
        t  x x x x .
        t  x x x x x
    """
    return t.segment_start, torch.where(t.prefix_mask, t.prefix_end, t.pos)


@_kind(2)
def image_bidirectional(t: Tokens):
    """Gemma 3 / PaliGemma images: causal, plus every token of an image sees every
    token of the same image::

        t  x . . . .
        t  x x . . .
        i  x x x x .
        i  x x x x .
        t  x x x x x
    """
    return t.segment_start, torch.where(t.is_image, t.image_end, t.pos)


@_kind(3, isolates_images=True)
def mmca(t: Tokens):
    """DeepSpeed-VisualChat's multimodal causal attention: causal; a text query sees
    every earlier-or-same token; an image query sees earlier text tokens and itself,
    no other image token::

        t  x . . . .
        t  x x . . .
        i  x x x . .
        i  x x . x .
        t  x x x x x

    With ``split_softmax=True`` (their definition proper) the attention over text
    keys and the attention over image keys are two softmaxes whose outputs are
    summed: the text branch for every query (earlier-or-same text keys); the image
    branch over earlier image keys for a text query, over itself alone for an image
    query. A branch with no allowed key contributes 0. Their dense-mask code gives a
    near-uniform row there instead (the additive mask only lowers scores by a large
    constant); we differ on purpose, since attending uniformly to forbidden keys is
    never what the mask means.
    """
    return t.segment_start, t.pos


KINDS = tuple(sorted(KIND_DEFS, key=lambda name: KIND_DEFS[name].code))
_BY_CODE = {k.code: k for k in KIND_DEFS.values()}


def kind_by_code(code: int) -> MaskKind:
    return _BY_CODE[int(code)]


# ---- what derives from a definition ----------------------------------------------------------
def intervals(kind: MaskKind, tokens: Tokens, window: int | None = None):
    """int32 (lo, hi, cut) [B, N]; padding rows get the empty interval (0, -1).

    ``window`` (any kind; Gemma 3's sliding layers, Mistral): a query also drops every key
    more than ``window - 1`` positions before it, ``key > query - window`` as transformers
    writes it. Keys after the query that the kind allows (an image's, a prefix's) stay:
    the window bounds the interval from below only, so it stays an interval and every
    consumer of lo / hi (dense mask, mask_mod, block maps, kernels) honours it unchanged.

    ``cut`` (None without ``branch_ids``, or where no query has one): int32 [2, B, N], the
    keys ``[cut_lo, cut_hi]`` dropped from a query's interval: for an answer token, the
    answers between the prompt and its own answer. Every query also stops at the end of its
    own branch (a no-op for the kinds' rules, whose runs stay within a branch). A cut is
    kept only strictly inside the interval, ``lo < cut_lo <= cut_hi < q``; one that
    reaches ``lo`` (a window starting inside it) moves ``lo`` past it instead, and a query
    without a cut stores (0, -1), which drops nothing."""
    lo, hi = kind.interval(tokens)
    if window is not None:
        lo = torch.maximum(lo, tokens.pos - (window - 1))
    cut = None
    if tokens.branch_ids is not None:
        hi = torch.minimum(hi, tokens.branch_end)
        cut_lo, cut_hi = tokens.prompt_end + 1, tokens.branch_start - 1
        has = tokens.live & (tokens.branch_ids > 0) & (cut_lo <= cut_hi)
        lo = torch.where(has & (lo >= cut_lo), torch.maximum(lo, cut_hi + 1), lo)
        has &= lo < cut_lo
        if bool(has.any()):
            cut = torch.stack([torch.where(has, cut_lo, 0), torch.where(has, cut_hi, -1)]).to(torch.int32).contiguous()
    lo = torch.where(tokens.live, lo, 0).to(torch.int32).contiguous()
    hi = torch.where(tokens.live, hi, -1).to(torch.int32).contiguous()
    return lo, hi, cut


def allowed(kind: MaskKind, q, k, lo_q, hi_q, image_q, image_k, cut_lo_q=None, cut_hi_q=None):
    """May query q attend to key k? Elementwise over broadcastable tensors (or the
    scalars FlexAttention's vmap hands a mask_mod): q's interval less its cut (shared
    prompt: the other answers), and for a kind that isolates images no image query x
    other image key pair."""
    ok = (k >= lo_q) & (k <= hi_q)
    if cut_lo_q is not None:
        ok = ok & ((k < cut_lo_q) | (k > cut_hi_q))
    if kind.isolates_images:
        ok = ok & (~(image_q & image_k) | (q == k))
    return ok


def tile(kind: MaskKind, rows, cols, lo, hi, is_image, cut=None) -> torch.Tensor:
    """bool [rows, cols]: ``allowed`` for query positions `rows` x key positions `cols`
    of one batch row whose per-token ``lo``/``hi``/``is_image`` are 1-D (``cut`` [2, N])."""
    cuts = (None, None) if cut is None else (cut[0, rows][:, None], cut[1, rows][:, None])
    return allowed(kind, rows[:, None], cols[None, :], lo[rows][:, None], hi[rows][:, None],
                   is_image[rows][:, None], is_image[cols][None, :], *cuts)


def branches(ok: torch.Tensor, image_k: torch.Tensor, split_softmax: bool) -> tuple[torch.Tensor, ...]:
    """The allowed pairs per softmax: one branch, or (text keys, image keys) when split."""
    return (ok & ~image_k, ok & image_k) if split_softmax else (ok,)


def allowed_pairs(kind: MaskKind, lo: torch.Tensor, hi: torch.Tensor, is_image: torch.Tensor,
                  cut: torch.Tensor | None = None) -> int:
    """Number of allowed (query, key) pairs over the batch, in O(N)."""
    def width(a, b):
        return (b.long() - a.long() + 1).clamp_min(0)

    cut_width = 0 if cut is None else width(cut[0], cut[1])
    pairs = width(lo, hi) - cut_width
    if kind.isolates_images:  # an image query keeps the text keys of its interval (less its cut), and itself
        text = torch.nn.functional.pad((~is_image).long().cumsum(1), (1, 0))

        def text_in(a, b):
            return torch.where(b >= a, text.gather(1, (b.long() + 1).clamp_min(0)) - text.gather(1, a.long()), 0)

        text_pairs = text_in(lo, hi) - (0 if cut is None else text_in(cut[0], cut[1]))
        pairs = torch.where(is_image & (pairs > 0), text_pairs + 1, pairs)
    return int(pairs.sum())
