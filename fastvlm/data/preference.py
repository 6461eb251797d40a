"""Preference pairs: files in, one shared-prompt row item per pair out.

Record formats (a JSON list or JSON lines, read lazily by ``read_preference``):

- LLaVA / `messages` style: ``image`` or ``images``, the prompt turns as ``conversations``
  (``from``/``value``) or ``messages`` (``role``/``content``, content parts allowed), ending
  on a user turn, and ``chosen`` / ``rejected``: each a string or one assistant message
  (``{"role": "assistant", "content": ...}``, or a list holding just that message);
- TRL's vision preference format: ``images``, ``prompt`` (a string: one user turn; or a list
  of messages, images as ``{"type": "image"}`` parts), ``chosen``, ``rejected`` as above.

Every rejection is a ValueError naming the file (and line), the sample id and the reason.

Encoding (``encode_pair``): the conversation is encoded with each answer by
``encode_conversation`` (so the template's label mask is exact, the answer's own end-of-turn
token included), the two encodings must agree on every token before the answer, and the row
item is ``[shared prompt | branch 1: chosen | branch 2: rejected]``. A token's prediction
comes from the position before it, and an answer's first token is predicted from the
prompt's last token, so that token opens each branch (it is the one token repeated): the
shared prompt is the prompt without its last token, and every branch is ``[last prompt
token, answer tokens...]`` at positions continuing from the shared part's end, attending to
the shared part and itself, exactly as the prompt + that answer run alone. Per token:
``branch_ids`` (0 shared, 1 chosen, 2 rejected), ``position_ids``, ``labels`` (unshifted, as
everywhere: the answers' supervised tokens), ``targets`` (the next token's label within the
branch: what ``linear_logprob`` takes as labels, aligned with the hidden states) and
``sequence_ids`` (0 chosen, 1 rejected, -1 shared; the collator numbers them across the batch:
pair p's chosen is 2p, its rejected 2p + 1).

``PreferenceDataset`` is map-style with VLMDataset's contract (``__getitem__`` -> item or None
with the skip counted by reason in ``skipped``; ``lengths()``, ``has_images()``) for
``make_loader``; ``PackedCollator`` / ``PaddedCollator`` collate its items (collate_rows
carries the branch metadata). Skips: ``identical_answers``, ``too_long`` (the pair over
``max_length``: a pair is never cut), and the image reasons of ``load_image``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fastvlm.data.collate import PackedCollator, PaddedCollator
from fastvlm.data.conversation import IGNORE_INDEX, _resolve, encode_conversation
from fastvlm.data.dataset import VLMDataset, image_spans
from fastvlm.data.formats import (
    IMAGE_TAG,
    ROLE_NAMES,
    _bad,
    _check_alternation,
    _content_text,
    _count_tags,
    _images,
    _normalise,
    read_samples,
    record_id,
)
from fastvlm.data.images import load_image_and_key
from fastvlm.data.lengths import cached_array, code_hash
from fastvlm.models.preprocess import ImagePreprocessor

CHOSEN, REJECTED = 1, 2  # branch ids; sequence ids within a pair are branch - 1


@dataclass
class PreferencePair:
    """One pair: ``prompt`` turns in LLaVA form ending on a human turn, ``images`` in the order
    of their ``<image>`` tags, and the two answers' texts."""

    id: str
    images: list[str]
    prompt: list[dict]
    chosen: str
    rejected: str


def _answer(record: dict, key: str, where: str, sample_id) -> str:
    """``chosen`` / ``rejected``: a string, one assistant message, or a list of just that message."""
    if key not in record:
        raise _bad(where, sample_id, f"missing {key!r} (the {key} answer)")
    value, parts = record[key], []
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        form = ("from", "value") if "from" in value else ("role", "content")
        role = value.get(form[0])
        if (ROLE_NAMES.get(role) if isinstance(role, str) else None) != "gpt" or form[1] not in value:
            value = None
        else:
            value = _content_text(value[form[1]], where, sample_id, 0, parts)
    if not isinstance(value, str):
        raise _bad(where, sample_id, f"{key!r}: expected a string or one assistant message "
                                     "({'role': 'assistant', 'content': ...}), got " + repr(record[key])[:200])
    if parts or IMAGE_TAG in value:
        raise _bad(where, sample_id, f"{key!r}: an answer cannot hold an image")
    return value


def _prompt(record: dict, where: str, sample_id, part_images: list) -> list[dict]:
    keys = [k for k in ("prompt", "conversations", "messages") if k in record]
    if len(keys) != 1:
        raise _bad(where, sample_id, "expected exactly one of 'prompt' (TRL), 'conversations' or 'messages' "
                                     f"for the prompt turns, got {keys or 'none'}")
    raw = record[keys[0]]
    if isinstance(raw, str):
        raw = [{"from": "human", "value": raw}]
    turns = _normalise(raw, where, sample_id, part_images)
    if turns[-1]["from"] != "human":
        raise _bad(where, sample_id, f"{keys[0]!r}: the prompt must end on a user turn (the answers follow it), "
                                     f"got a {turns[-1]['from']} turn last")
    _check_alternation([*turns, {"from": "gpt", "value": ""}], where, sample_id)
    return turns


def parse_preference_record(record, where: str, index: int) -> PreferencePair:
    """Validate one raw record and normalise it to a `PreferencePair` (see the module docstring)."""
    sample_id = record_id(record, where, index)
    part_images: list = []
    prompt = _prompt(record, where, sample_id, part_images)
    chosen, rejected = (_answer(record, key, where, sample_id) for key in ("chosen", "rejected"))
    images = _images(record, where, sample_id, part_images)
    tags = _count_tags([*prompt, {"from": "gpt", "value": chosen}, {"from": "gpt", "value": rejected}],
                       where, sample_id)
    if tags != len(images):
        raise _bad(where, sample_id, f"{tags} <image> tag(s) in the prompt but {len(images)} image(s)")
    return PreferencePair(sample_id, images, prompt, chosen, rejected)


def read_preference(path) -> Sequence[PreferencePair]:
    """The pairs of a preference file (JSON list or JSON lines): indexable, ``len()``, each
    validated when read."""
    return read_samples(path, parser=parse_preference_record)


@dataclass
class EncodedPair:
    """One pair as a shared-prompt row item (lists of one length; see the module docstring)."""

    input_ids: list[int]
    labels: list[int]
    targets: list[int]
    branch_ids: list[int]
    position_ids: list[int]
    sequence_ids: list[int]
    shared_len: int
    num_images: int

    def __len__(self):
        return len(self.input_ids)


def encode_pair(pair: PreferencePair, tokenizer, template="llava_v1", image_tokens: int = 576, *,
                system: str | None = None) -> EncodedPair:
    """The shared-prompt row item of ``pair`` (``tokenizer``: as encode_conversation takes it)."""
    tok = _resolve(tokenizer)
    encoded = [encode_conversation([*pair.prompt, {"from": "gpt", "value": answer}], tok, template, image_tokens,
                                   last_turn_only=True, system=system) for answer in (pair.chosen, pair.rejected)]
    start = encoded[0].prefix_len  # the first supervised token: the answer's
    if encoded[1].prefix_len != start or encoded[0].input_ids[:start] != encoded[1].input_ids[:start]:
        raise ValueError(f"sample {pair.id!r}: template {template!r}: the prompt's tokens differ between the chosen "
                         "and the rejected answer (the tokenizer merges the answer into the prompt), so the two "
                         "cannot share it")
    if start < 1 or encoded[0].input_ids[start - 1] == tok.image_token_id:
        raise ValueError(f"sample {pair.id!r}: template {template!r}: the prompt ends on an image token; its last "
                         "token opens each answer's branch and must be text (use a chat template, not 'plain')")
    shared = start - 1
    ids, labels = encoded[0].input_ids[:shared], [IGNORE_INDEX] * shared
    branches, positions, sequences = [0] * shared, list(range(shared)), [-1] * shared
    for branch, enc in enumerate(encoded, start=CHOSEN):
        n = len(enc) - shared
        ids += enc.input_ids[shared:]
        labels += enc.labels[shared:]
        branches += [branch] * n
        positions += range(shared, shared + n)
        sequences += [branch - CHOSEN] * n
    # the next token's label: within a branch its own next token; at a branch's end the next
    # branch's opening token, which is never supervised, so nothing crosses branches
    targets = labels[1:] + [IGNORE_INDEX]
    return EncodedPair(ids, labels, targets, branches, positions, sequences, shared, encoded[0].num_images)


class PreferenceDataset(VLMDataset):
    """Preference pairs as shared-prompt row items, decoded lazily: VLMDataset's contract and
    options (strict, image_checks, the skip counter), over ``read_preference`` samples.

    max_length: a pair longer than this (prompt and both answers) is skipped as ``too_long``
    (give the packing budget; a pair is never cut). lengths() are exact (each pair tokenized
    once, images not decoded), cached next to the data file."""

    def __init__(self, samples: Sequence, image_root, tokenizer, template, image_tokens: int,
                 preprocessor: ImagePreprocessor, *, strict: bool = False, max_length: int | None = None,
                 system: str | None = None, data_path=None, image_checks: dict | None = None):
        super().__init__(samples, image_root, tokenizer, template, image_tokens, preprocessor, strict=strict,
                         max_length=max_length, truncation="drop", system=system, data_path=data_path,
                         image_checks=image_checks)

    def _pair(self, pair: PreferencePair) -> EncodedPair:
        return encode_pair(pair, self.tokenizer, self.template, self.image_tokens,
                           system=self.encode_options["system"])

    def encode(self, index: int) -> EncodedPair | None:
        """The pair's row item, or None when it is skipped (counted)."""
        pair = self.samples[index]
        if pair.chosen == pair.rejected:
            return self._skip("identical_answers", pair.id, f"sample {pair.id!r}: chosen and rejected are "
                                                            "the same answer")
        encoded = self._pair(pair)
        if self.max_length is not None and len(encoded) > self.max_length:
            return self._skip("too_long", pair.id, f"sample {pair.id!r}: prompt and answers are {len(encoded)} "
                                                   f"tokens, more than max_length {self.max_length}")
        return encoded

    def __getitem__(self, index: int) -> dict | None:
        encoded = self.encode(index)
        if encoded is None:
            return None
        pair = self.samples[index]
        pixels, keys, files = [], [], [self.image_root / rel for rel in pair.images]
        for path in files:
            loaded = load_image_and_key(path, self.preprocessor, self.strict, counter=self.skipped,
                                        **self.image_checks)
            if loaded is None:
                return None
            pixels.append(loaded[0])
            keys.append(loaded[1])
        as_long = {key: torch.tensor(getattr(encoded, key), dtype=torch.long)
                   for key in ("input_ids", "labels", "targets", "position_ids", "sequence_ids")}
        return {**as_long, "branch_ids": torch.tensor(encoded.branch_ids, dtype=torch.int32), "num_sequences": 2,
                "pixel_values": torch.stack(pixels) if pixels else None,
                "image_spans": image_spans(encoded.input_ids[:encoded.shared_len], self.tokenizer.image_token_id,
                                           self.image_tokens),
                "image_files": files, "image_keys": keys, "id": pair.id, "prefix_len": encoded.shared_len,
                "index": index}

    def _estimates(self) -> np.ndarray:
        """[2, n]: each pair's exact token count (lengths()) and image count (has_images()),
        cached by data file hash and everything else they depend on."""
        if self.data_path is None:
            if not hasattr(self, "_memo"):
                self._memo = self._measure_all()
            return self._memo
        options = "|".join(["preference", f"image_tokens={self.image_tokens}", f"encoder={code_hash(encode_pair)}",
                            f"n={len(self)}", f"template={self.template!r}",
                            f"system={self.encode_options['system']!r}", f"tokenizer={self._tokenizer_hash()}"])
        return cached_array(self.data_path, options, self._measure_all)

    def _measure_all(self) -> np.ndarray:
        lengths = [len(self._pair(pair)) for pair in self.samples]
        images = [len(pair.images) for pair in self.samples]
        return np.asarray([lengths, images], dtype=np.int64).reshape(2, len(lengths))


def per_pair(batch: dict) -> dict:
    """A preference batch weighs its pairs, not its tokens: a step's micro-batches are
    weighted by ``supervised_tokens`` (the step's loss is then the mean over its pairs)."""
    batch["supervised_tokens"] = batch["num_samples"]
    return batch


class PairPackedCollator(PackedCollator):
    """PackedCollator for PreferenceDataset items, each micro-batch weighed by its pairs."""

    def collate_planned(self, rows):
        return per_pair(super().collate_planned(rows))


class PairPaddedCollator(PaddedCollator):
    """PaddedCollator for PreferenceDataset items, each micro-batch weighed by its pairs."""

    def __call__(self, items):
        return per_pair(super().__call__(items))
