"""Conversation files in: LLaVA JSON lists, JSON-lines, and the `messages` form.

A `Sample` is one record normalised to LLaVA's form (``{"from": "human"|"gpt"|"system",
"value": str}`` turns, ``<image>`` tags in the text, image paths relative to the image
folder). `read_samples` is lazy: a JSON list is parsed once and its raw records kept,
a JSON-lines file is indexed by the byte offset of each line; each record is validated
and normalised only when it is read, so a 1M-sample file is never tokenized or turned
into tensors up front. Every rejection is a ValueError naming the file, the sample id
and the reason.
"""
from __future__ import annotations

import json
import posixpath
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_TAG = "<image>"

# `messages` roles (LLaMA-Factory, ms-swift, TRL) and LLaVA's own, mapped to LLaVA's.
ROLE_NAMES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "system": "system"}


@dataclass
class Sample:
    """One conversation: ``images`` are relative paths in the order their ``<image>`` tags
    appear in ``conversations``."""

    id: str
    images: list[str] = field(default_factory=list)
    conversations: list[dict] = field(default_factory=list)

    def to_record(self) -> dict:
        """The LLaVA JSON record of this sample (``image`` for one image, ``images`` for several)."""
        record: dict = {"id": self.id}
        if len(self.images) == 1:
            record["image"] = self.images[0]
        elif self.images:
            record["images"] = list(self.images)
        record["conversations"] = [dict(t) for t in self.conversations]
        return record


def _bad(where: str, sample_id, reason: str) -> ValueError:
    return ValueError(f"{where}: sample {sample_id!r}: {reason}")


def _check_image_path(path, where: str, sample_id) -> str:
    if not isinstance(path, str) or not path:
        raise _bad(where, sample_id, f"image path must be a non-empty string, got {path!r}")
    norm = posixpath.normpath(path.replace("\\", "/"))
    if posixpath.isabs(norm) or norm == ".." or norm.startswith("../") or (len(norm) > 1 and norm[1] == ":"):
        raise _bad(where, sample_id, f"image path {path!r} escapes the image folder (must be relative, no '../')")
    return norm


def _content_text(content, where: str, sample_id, turn: int, part_images: list) -> str:
    """A `messages` content (a string or a list of text/image parts) as text with ``<image>`` tags."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(where, sample_id, f"turn {turn}: content must be a string or a list of parts, got "
                   f"{type(content).__name__}")
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind == "image":
            pieces.append(IMAGE_TAG)
            path = part.get("image", part.get("path"))
            if path is not None:
                part_images.append(path)
        else:
            raise _bad(where, sample_id, f"turn {turn}: content part {part!r} is not "
                       "{'type': 'text', 'text': str} or {'type': 'image'}")
    return "".join(pieces)


def _turns(record: dict, where: str, sample_id, part_images: list) -> list[dict]:
    has_conv, has_msgs = "conversations" in record, "messages" in record
    if has_conv == has_msgs:
        raise _bad(where, sample_id, "expected exactly one of 'conversations' or 'messages'")
    return _normalise(record["conversations" if has_conv else "messages"], where, sample_id, part_images)


def _normalise(raw, where: str, sample_id, part_images: list) -> list[dict]:
    """Turns in LLaVA form (``from``/``value``) or `messages` form (``role``/``content``), as
    LLaVA-form dicts; the form is the first turn's."""
    if not isinstance(raw, list) or not raw:
        raise _bad(where, sample_id, "conversation must be a non-empty list of turns")
    llava_form = isinstance(raw[0], dict) and "from" in raw[0]
    role_key, text_key = ("from", "value") if llava_form else ("role", "content")
    turns = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise _bad(where, sample_id, f"turn {i}: expected an object with {role_key!r} and {text_key!r}")
        role = ROLE_NAMES.get(turn[role_key]) if isinstance(turn[role_key], str) else None
        if role is None:
            raise _bad(where, sample_id, f"turn {i}: unknown role {turn[role_key]!r}; expected one of "
                       f"{sorted(ROLE_NAMES)}")
        if llava_form:
            if not isinstance(turn[text_key], str):
                raise _bad(where, sample_id, f"turn {i}: 'value' must be a string")
            text = turn[text_key]
        else:
            text = _content_text(turn[text_key], where, sample_id, i, part_images)
        turns.append({"from": role, "value": text})
    return turns


def normalise_turns(turns, where: str = "conversations", sample_id="<given>") -> list[dict]:
    """Validate a conversation given directly (LLaVA or `messages` form, alternating, ending
    with a gpt turn) and return it in LLaVA form. Image parts in content become ``<image>``."""
    out = _normalise(turns, where, sample_id, [])
    _check_alternation(out, where, sample_id)
    _count_tags(out, where, sample_id)
    return out


def _count_tags(turns: list[dict], where: str, sample_id) -> int:
    tags = 0
    for i, turn in enumerate(turns):
        n = turn["value"].count(IMAGE_TAG)
        if n and turn["from"] != "human":
            raise _bad(where, sample_id, f"turn {i}: {IMAGE_TAG} in a {turn['from']} turn (only human turns)")
        tags += n
    return tags


def _check_alternation(turns: list[dict], where: str, sample_id) -> None:
    body = turns[1:] if turns[0]["from"] == "system" else turns
    if not body:
        raise _bad(where, sample_id, "only a system turn, no human/gpt turns")
    for i, turn in enumerate(body):
        expected = "human" if i % 2 == 0 else "gpt"
        if turn["from"] != expected:
            where_turn = i + (len(turns) - len(body))
            if turn["from"] == "system":
                reason = f"turn {where_turn}: a system turn is allowed only first"
            else:
                reason = f"turn {where_turn}: turns not alternating: expected {expected!r}, got {turn['from']!r}"
            raise _bad(where, sample_id, reason)
    if body[-1]["from"] != "gpt":
        raise _bad(where, sample_id, "turns not alternating: the conversation must end with a gpt turn")


def _images(record: dict, where: str, sample_id, part_images: list) -> list[str]:
    if "image" in record and "images" in record:
        raise _bad(where, sample_id, "has both 'image' and 'images'")
    images = record.get("images", record.get("image"))
    if images is None:
        images = []
    elif isinstance(images, str):
        images = [images]
    elif not isinstance(images, list):
        raise _bad(where, sample_id, f"'images' must be a path or a list of paths, got {type(images).__name__}")
    if part_images:
        if images:
            raise _bad(where, sample_id, "image paths given both in content parts and in 'images'")
        images = part_images
    return [_check_image_path(p, where, sample_id) for p in images]


def record_id(record, where: str, index: int) -> str:
    """The id of a raw record (its ``id``, else ``#index``); a record that is no object is an error."""
    if not isinstance(record, dict):
        raise _bad(where, f"#{index}", f"expected a JSON object, got {type(record).__name__}")
    return str(record["id"]) if record.get("id") is not None else f"#{index}"


def parse_record(record, where: str, index: int) -> Sample:
    """Validate one raw record (a dict from the file) and normalise it to a `Sample`."""
    sample_id = record_id(record, where, index)
    part_images: list = []
    turns = _turns(record, where, sample_id, part_images)
    _check_alternation(turns, where, sample_id)
    images = _images(record, where, sample_id, part_images)
    tags = _count_tags(turns, where, sample_id)
    if tags != len(images):
        raise _bad(where, sample_id, f"{tags} {IMAGE_TAG} tag(s) but {len(images)} image(s)")
    return Sample(id=sample_id, images=images, conversations=turns)


class _Records(Sequence):
    """Lazily validated samples of one file; subclasses say how to fetch raw record i;
    ``parser(raw, where, index)`` validates and normalises it (parse_record by default)."""

    def __init__(self, path: Path):
        self.path = path
        self.parser = parse_record

    def raw(self, index: int):
        raise NotImplementedError

    def _where(self, index: int) -> str:
        return str(self.path)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if not isinstance(index, int) or not -n <= index < n:
            raise IndexError(f"sample index {index!r} out of range for {n} samples in {self.path}")
        index %= n
        return self.parser(self.raw(index), self._where(index), index)

    def validate(self) -> None:
        """Read every record once, raising at the first bad one (for a check before training)."""
        for i in range(len(self)):
            self[i]

    def __repr__(self):
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} samples)"


class JSONListSamples(_Records):
    """A LLaVA JSON list: parsed once, raw records kept, each validated when read."""

    def __init__(self, path: Path, records: list):
        super().__init__(path)
        self._records = records

    def __len__(self):
        return len(self._records)

    def raw(self, index: int):
        return self._records[index]


class JSONLinesSamples(_Records):
    """A JSON-lines file indexed by the byte offset of each non-blank line; a line is
    read and parsed only when its sample is."""

    def __init__(self, path: Path):
        super().__init__(path)
        self._offsets = array("q")
        self._lines = array("q")
        with open(path, "rb") as f:
            offset = 0
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    self._offsets.append(offset)
                    self._lines.append(lineno)
                offset += len(line)

    def __len__(self):
        return len(self._offsets)

    def _where(self, index: int) -> str:
        return f"{self.path}:{self._lines[index]}"

    def raw(self, index: int):
        with open(self.path, "rb") as f:
            f.seek(self._offsets[index])
            line = f.readline()
        try:
            return json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _bad(self._where(index), f"#{index}", f"malformed JSON line: {e}") from None


def _is_json_lines(path: Path) -> bool:
    """``.jsonl`` is JSON-lines; otherwise a file starting with ``[`` is a JSON list, and one
    starting with ``{`` is JSON-lines unless it is a single JSON value (then: not a list)."""
    if path.suffix.lower() == ".jsonl":
        return True
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"{"):
        return False
    try:
        with open(path, "rb") as f:
            json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True  # "Extra data" after the first object: one object per line
    return False


def read_samples(path, parser=parse_record) -> Sequence[Sample]:
    """The samples of a LLaVA JSON list (``.json``) or a JSON-lines file (``.jsonl``, or one
    object per line under another name): indexable, ``len()``, validated per sample when read
    by ``parser(raw record, where, index)`` (another record format: preference pairs)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: no conversation file at {path}")
    if _is_json_lines(path):
        samples = JSONLinesSamples(path)
        samples.parser = parser
        return samples
    try:
        with open(path, "rb") as f:
            records = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON: {e}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of samples, got {type(records).__name__}")  # noqa: TRY004
    samples = JSONListSamples(path, records)
    samples.parser = parser
    return samples


def estimate_length(sample: Sample, image_tokens: int, chars_per_token: float = 3.5, per_turn: int = 6,
                    overhead: int = 0) -> int:
    """Cheap token-count estimate without a tokenizer, for packing and length grouping:
    text chars / ``chars_per_token`` (about right for English with BPE vocabularies), plus a
    few tokens of template per turn, plus ``image_tokens`` per image, plus ``overhead`` tokens
    the template adds once (BOS, llava_v1's Vicuna system prompt: about 35)."""
    if image_tokens < 0:
        raise ValueError(f"image_tokens: expected >= 0, got {image_tokens}")
    chars = sum(len(t["value"]) - t["value"].count(IMAGE_TAG) * len(IMAGE_TAG) for t in sample.conversations)
    return (int(chars / chars_per_token) + per_turn * len(sample.conversations) + image_tokens * len(sample.images)
            + overhead)
