"""One conversation to token ids and labels: render with a template, tokenize the whole
string once, and map the template's character spans to tokens through the offsets.

A token is supervised iff its non-whitespace characters lie in a supervised span (a token
made only of whitespace: iff all its characters do). A token whose characters fall on both
sides of a span boundary, or characters the tokenizer drops, make the mask undefined, and
that is an error naming the boundary, never a silently all-ignored sample.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path

from fastvlm.data.formats import IMAGE_TAG, Sample, normalise_turns
from fastvlm.data.templates import get_template
from fastvlm.data.tokenizer import Tokenizer, load_tokenizer

IGNORE_INDEX = -100


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


def _token_class(values, text: str, start: int, end: int) -> set:
    """The classes (``values`` per character) of a token's non-whitespace characters, or of all
    its characters when it is only whitespace; a zero-width token takes its position's class."""
    if end <= start:
        at = min(start, len(text) - 1)
        return {values[at]}
    chars = [i for i in range(start, end) if not text[i].isspace()] or range(start, end)
    return {values[i] for i in chars}


def _char_classes(length: int, spans, default, value) -> list:
    classes = [default] * length
    for start, end in spans:
        classes[start:end] = [value] * (end - start)
    return classes


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
    _check_coverage(text, offsets)

    supervised = _char_classes(len(text), _supervised_spans(rendered, train_on_prompt, last_turn_only), False, True)
    pair_of = [0] * len(text)
    for p, (start, end) in enumerate(zip([0] + rendered.pair_ends[:-1], rendered.pair_ends)):
        pair_of[start:end] = [p] * (end - start)
    pair_of[rendered.pair_ends[-1]:] = [len(rendered.pair_ends) - 1] * (len(text) - rendered.pair_ends[-1])

    input_ids, labels, token_pair = [], [], []
    for token_id, (start, end) in zip(ids, offsets):
        sup, pair = _token_class(supervised, text, start, end), _token_class(pair_of, text, start, end)
        if len(sup) > 1:
            raise ValueError(f"template {tmpl.name!r}: {_describe(text, start, end)} straddles a label boundary; "
                             "the mask cannot be computed exactly with this tokenizer")
        if len(pair) > 1:
            raise ValueError(f"template {tmpl.name!r}: {_describe(text, start, end)} straddles a turn boundary")
        copies = image_tokens if token_id == tok.image_token_id else 1
        label = token_id if sup.pop() and token_id != tok.image_token_id else IGNORE_INDEX
        input_ids += [token_id] * copies
        labels += [label] * copies
        token_pair += [pair.pop()] * copies
    return _finish(input_ids, labels, token_pair, len(rendered.pair_ends), tok.image_token_id, image_tokens,
                   max_length, tmpl.name)


def _check_coverage(text: str, offsets) -> None:
    covered = bytearray(len(text))
    for start, end in offsets:
        covered[start:end] = b"\1" * (end - start)
    missing = [i for i, c in enumerate(covered) if not c and not text[i].isspace()]
    if missing:
        i = missing[0]
        raise ValueError(f"tokenizer: drops {len(missing)} character(s), first {text[i]!r} at {i} of {text!r}; "
                         "the label mask cannot be computed exactly")


def _finish(input_ids, labels, token_pair, num_pairs, image_token_id, image_tokens, max_length, name) -> EncodedSample:
    spans, start = [], 0
    for p in range(num_pairs):
        end = start
        while end < len(token_pair) and token_pair[end] == p:
            end += 1
        spans.append((start, end))
        start = end
    if any(s == e for s, e in spans):
        raise ValueError(f"template {name!r}: a turn pair rendered to no tokens")
    if max_length is not None and len(input_ids) > max_length:
        keep = sum(1 for _, e in spans if e <= max_length)
        cut = spans[keep - 1][1] if keep else 0
        if not any(label != IGNORE_INDEX for label in labels[:cut]):
            raise SampleTooLong(f"max_length: {len(input_ids)} tokens; no prefix of whole turns with a supervised "
                                f"token fits in {max_length}")
        input_ids, labels, spans = input_ids[:cut], labels[:cut], spans[:keep]
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if first is None:
        raise ValueError(f"template {name!r}: no token is supervised")
    num_images = sum(1 for t in input_ids if t == image_token_id) // image_tokens
    return EncodedSample(input_ids, labels, num_images, spans, first)


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
