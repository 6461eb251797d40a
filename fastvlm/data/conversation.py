"""One conversation to token ids and labels: render with a template, tokenize the whole
string once, and map the template's character spans to tokens through the offsets.

A token is supervised iff its non-whitespace characters lie in a supervised span (a token
made only of whitespace: iff all its characters do). A token whose characters fall on both
sides of a span boundary, or characters the tokenizer drops, make the mask undefined, and
that is an error naming the boundary, never a silently all-ignored sample.
"""
from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastvlm.data.formats import IMAGE_TAG, Sample, normalise_turns
from fastvlm.data.templates import get_template
from fastvlm.data.tokenizer import Tokenizer, load_tokenizer

IGNORE_INDEX = -100
# Every code point str.isspace() accepts (the set is small and fixed by the Unicode tables).
_WHITESPACE = np.array([c for c in range(0x3001) if chr(c).isspace()], dtype=np.uint32)


class SampleTooLong(ValueError):
    """Not even the first turn pair (with a supervised token) fits in ``max_length``."""


@dataclass
class EncodedSample:
    """``input_ids`` and ``labels`` (same length, not shifted; -100 = not supervised; image
    tokens never supervised); ``turn_spans``: contiguous token ranges covering the sequence, one
    per human+gpt pair (the first one includes BOS and system prompt), so cutting after any
    span's end is a turn boundary that never splits an image run; ``prefix_len``: tokens before
    the first supervised one."""

    input_ids: list[int]
    labels: list[int]
    num_images: int
    turn_spans: list[tuple[int, int]] = field(default_factory=list)
    prefix_len: int = 0

    def __len__(self):
        return len(self.input_ids)


_LOADED: dict = {}
_WRAPPED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _resolve(tokenizer) -> Tokenizer:
    """A `Tokenizer` for ``tokenizer``, loading a directory or wrapping an object once rather
    than per sample (a directory is reloaded when its tokenizer.json changes)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, Path)):
        path = Path(tokenizer)
        try:
            stamp = (path / "tokenizer.json").stat().st_mtime_ns
        except OSError:
            return load_tokenizer(path)  # raises the error that names what is missing
        key = (str(path.resolve()), stamp)
        if key not in _LOADED:
            _LOADED[key] = load_tokenizer(path)
        return _LOADED[key]
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None  # tokens added since: wrap again
    try:
        cached = _WRAPPED.get(tokenizer)
    except TypeError:  # not weak-referenceable: wrap each time
        return load_tokenizer(tokenizer)
    if cached is None or cached[0] != size:
        cached = (size, load_tokenizer(tokenizer))
        _WRAPPED[tokenizer] = cached
    return cached[1]


def _non_whitespace(text: str) -> np.ndarray:
    return ~np.isin(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32), _WHITESPACE)


def _chosen_chars(text: str, offsets: np.ndarray):
    """The non-whitespace mask of ``text`` and each token's [start, end) character range, a
    zero-width token widened to the character at its position. Within that range the
    non-whitespace characters decide the token's class, or all of them if there are none."""
    nonws = _non_whitespace(text)
    start, end = offsets[:, 0], offsets[:, 1]
    start = np.where(end > start, start, np.minimum(start, len(text) - 1))
    end = np.where(offsets[:, 1] > offsets[:, 0], end, start + 1)
    return nonws, start, end


def _classify(text: str, offsets: np.ndarray, supervised: np.ndarray, pair_of: np.ndarray):
    """(supervised?, pair index) of every token, and the index of the first token whose
    deciding characters fall on both sides of a label boundary / a turn boundary (or -1)."""
    nonws, start, end = _chosen_chars(text, offsets)
    cum_nonws = np.concatenate([[0], np.cumsum(nonws)])
    n_nonws = cum_nonws[end] - cum_nonws[start]
    only_ws = n_nonws == 0
    cum_sup = np.concatenate([[0], np.cumsum(supervised)])
    cum_sup_nonws = np.concatenate([[0], np.cumsum(supervised & nonws)])
    k = np.where(only_ws, cum_sup[end] - cum_sup[start], cum_sup_nonws[end] - cum_sup_nonws[start])
    n = np.where(only_ws, end - start, n_nonws)
    # pair_of never decreases, so a token is in one pair iff its first and last deciding chars are.
    where_nonws = np.flatnonzero(nonws)
    if where_nonws.size:
        first_nw = where_nonws[np.minimum(np.searchsorted(where_nonws, start), where_nonws.size - 1)]
        last_nw = where_nonws[np.maximum(np.searchsorted(where_nonws, end) - 1, 0)]
    else:
        first_nw, last_nw = start, end - 1
    first = np.where(only_ws, start, first_nw)
    last = np.where(only_ws, end - 1, last_nw)
    label_straddle = np.flatnonzero((k > 0) & (k < n))
    pair_straddle = np.flatnonzero(pair_of[first] != pair_of[last])
    return (k > 0, pair_of[first], int(label_straddle[0]) if label_straddle.size else -1,
            int(pair_straddle[0]) if pair_straddle.size else -1)


def _lost_span_end(offsets: np.ndarray, token_sup: np.ndarray, spans) -> int:
    """The first unsupervised token holding the last character of a supervised span, or -1.
    A span's leading whitespace may go to the prompt token before it (``"ASSISTANT:▁"``), but
    its end is what teaches the model to stop."""
    for start, end in spans:
        if end > start:
            holders = np.flatnonzero((offsets[:, 0] <= end - 1) & (end - 1 < offsets[:, 1]) & ~token_sup)
            if holders.size:
                return int(holders[0])
    return -1


def _char_mask(length: int, spans) -> np.ndarray:
    mask = np.zeros(length, dtype=bool)
    for start, end in spans:
        mask[start:end] = True
    return mask


def _supervised_spans(rendered, train_on_prompt: bool, last_turn_only: bool) -> list[tuple[int, int]]:
    if train_on_prompt:
        starts = [rendered.never] + rendered.pair_ends[:-1]
        spans = [(max(s, rendered.never), e) for s, e in zip(starts, rendered.pair_ends)]
    else:
        spans = list(rendered.answers)
    return spans[-1:] if last_turn_only else spans


def _describe(text: str, start: int, end: int) -> str:
    return f"token {text[start:end]!r} at characters {start}:{end} of {text!r}"


def encode_conversation(conversations, tokenizer, template="llava_v1", image_tokens: int = 576, *,
                        train_on_prompt: bool = False, last_turn_only: bool = False, system: str | None = None,
                        max_length: int | None = None) -> EncodedSample:
    """Token ids and labels of one conversation (LLaVA ``conversations`` or `messages` list, or
    a `Sample`), each ``<image>`` expanded to ``image_tokens`` copies of the image token id.

    Supervised: the answers (gpt turns) and the template's end-of-answer text; with
    ``train_on_prompt`` every text token but BOS; with ``last_turn_only`` only the last pair's.
    ``max_length``: keep the longest prefix of whole turn pairs that fits (`SampleTooLong` when
    none does). ``tokenizer``: a `Tokenizer`, a directory, or a transformers tokenizer.
    """
    if isinstance(conversations, Sample):
        conversations = conversations.conversations
    if not isinstance(image_tokens, int) or image_tokens < 1:
        raise ValueError(f"image_tokens: expected a positive int, got {image_tokens!r}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length: expected a positive int or None, got {max_length!r}")
    tok = _resolve(tokenizer)
    tmpl = get_template(template)
    turns = normalise_turns(conversations)
    num_images = sum(t["value"].count(IMAGE_TAG) for t in turns)
    if tok.image_token != IMAGE_TAG:
        turns = [{**t, "value": t["value"].replace(IMAGE_TAG, tok.image_token)} for t in turns]
    rendered = tmpl.render(turns, tok, system)
    text = rendered.text
    if text.count(tok.image_token) != num_images:
        raise ValueError(f"template {tmpl.name!r}: rendered {text.count(tok.image_token)} image tag(s) for "
                         f"{num_images} image(s) in the conversation")
    ids, offsets = tok.encode(text)
    if sum(1 for i in ids if i == tok.image_token_id) != num_images:
        raise ValueError(f"tokenizer: {tok.image_token!r} did not become one token per image in {text!r}")
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    _check_coverage(text, offsets)

    supervised = _char_mask(len(text), _supervised_spans(rendered, train_on_prompt, last_turn_only))
    # (whitespace decides nothing: a token's class is that of its other characters, so only a
    # span's trailing whitespace can end up in an unsupervised token; that is checked below)
    pair_of = np.minimum(np.searchsorted(np.asarray(rendered.pair_ends), np.arange(len(text)), side="right"),
                         len(rendered.pair_ends) - 1)
    ids = np.asarray(ids, dtype=np.int64)
    spans = _supervised_spans(rendered, train_on_prompt, last_turn_only)
    token_sup, token_pair, label_straddle, pair_straddle = _classify(text, offsets, supervised, pair_of)
    if label_straddle >= 0:
        raise ValueError(f"template {tmpl.name!r}: {_describe(text, *offsets[label_straddle])} straddles a label "
                         "boundary; the mask cannot be computed exactly with this tokenizer")
    lost = _lost_span_end(offsets, token_sup, spans)
    if lost >= 0:
        raise ValueError(f"template {tmpl.name!r}: {_describe(text, *offsets[lost])} holds the end of a supervised "
                         "span in an unsupervised token (the answer's terminator merges into the next prompt)")
    if pair_straddle >= 0:
        raise ValueError(f"template {tmpl.name!r}: {_describe(text, *offsets[pair_straddle])} straddles a turn "
                         "boundary")
    is_image = ids == tok.image_token_id
    copies = np.where(is_image, image_tokens, 1)
    labels = np.where(token_sup & ~is_image, ids, IGNORE_INDEX)
    return _finish(np.repeat(ids, copies), np.repeat(labels, copies), np.repeat(token_pair, copies),
                   len(rendered.pair_ends), tok.image_token_id, image_tokens, max_length, tmpl.name)


def _check_coverage(text: str, offsets) -> None:
    """Every non-whitespace character must be inside some token: a tokenizer that drops
    characters (normalisers, missing unknown token) leaves the mask undefined there."""
    edges = np.zeros(len(text) + 1, dtype=np.int64)
    wide = offsets[offsets[:, 1] > offsets[:, 0]]
    np.add.at(edges, wide[:, 0], 1)
    np.add.at(edges, wide[:, 1], -1)
    missing = np.flatnonzero((np.cumsum(edges[:-1]) == 0) & _non_whitespace(text))
    if missing.size:
        i = int(missing[0])
        raise ValueError(f"tokenizer: drops {missing.size} character(s), first {text[i]!r} at {i} of {text!r}; "
                         "the label mask cannot be computed exactly")


def _finish(input_ids: np.ndarray, labels: np.ndarray, token_pair: np.ndarray, num_pairs: int, image_token_id: int,
            image_tokens: int, max_length: int | None, name: str) -> EncodedSample:
    if np.any(np.diff(token_pair) < 0):
        raise ValueError(f"template {name!r}: the tokenizer's offsets are not in text order")
    bounds = np.searchsorted(token_pair, np.arange(num_pairs + 1), side="left").tolist()
    spans = list(itertools.pairwise(bounds))
    if any(s == e for s, e in spans):
        raise ValueError(f"template {name!r}: a turn pair rendered to no tokens")
    if max_length is not None and len(input_ids) > max_length:
        keep = sum(1 for _, e in spans if e <= max_length)
        cut = spans[keep - 1][1] if keep else 0
        if not np.any(labels[:cut] != IGNORE_INDEX):
            raise SampleTooLong(f"max_length: {len(input_ids)} tokens; no prefix of whole turns with a supervised "
                                f"token fits in {max_length}")
        input_ids, labels, spans = input_ids[:cut], labels[:cut], spans[:keep]
    supervised = np.flatnonzero(labels != IGNORE_INDEX)
    if not supervised.size:
        raise ValueError(f"template {name!r}: no token is supervised")
    num_images = int(np.count_nonzero(input_ids == image_token_id)) // image_tokens
    return EncodedSample(input_ids.tolist(), labels.tolist(), num_images, spans, int(supervised[0]))


def encode_prompt(conversations, tokenizer, template="llava_v1", image_tokens: int = 576, *,
                  system: str | None = None) -> list[int]:
    """Token ids a model continues to answer the last human turn (a trailing gpt turn is
    dropped): exactly the tokens that precede that answer in `encode_conversation`."""
    tok = _resolve(tokenizer)
    if isinstance(conversations, Sample):
        conversations = conversations.conversations
    turns = normalise_turns(list(conversations) + ([] if _ends_with_gpt(conversations) else [
        {"from": "gpt", "value": ""}]))
    if tok.image_token != IMAGE_TAG:
        turns = [{**t, "value": t["value"].replace(IMAGE_TAG, tok.image_token)} for t in turns]
    text = get_template(template).prompt(turns, tok, system)
    ids, _ = tok.encode(text)
    out = []
    for token_id in ids:
        out += [token_id] * (image_tokens if token_id == tok.image_token_id else 1)
    return out


def _ends_with_gpt(conversations) -> bool:
    last = conversations[-1] if conversations else {}
    return last.get("from", last.get("role")) in ("gpt", "assistant")
