"""Samples through a Hugging Face model's own processor: its chat template renders the
conversation, its image processor (dynamic resolution for Qwen, with a pixel budget)
makes the pixels and its tokenizer the ids, exactly as at inference.

Labels come from character offsets, never from per-family rules:

1. the conversation is rendered twice with the chat template: as is, and with every text
   part replaced by a unique sentinel. The sentinel render is the template's skeleton;
   walking both renders side by side gives each message's character span in the real
   render (a template may trim a part). A render that does not follow its skeleton is an
   error naming the sample;
2. the render is tokenized with offsets; a token is supervised iff its characters lie in
   an assistant message's span (fastvlm.data.conversation's rules: a token straddling a
   span boundary is an error), plus the end-of-turn token after each answer (whitespace
   tokens, then a special token, e.g. ``<|im_end|>``, ``<end_of_turn>``, ``</s>``; a
   template that renders none after an answer, as llava-1.5-hf's, gets the tokenizer's EOS
   inserted there, as LLaVA's own training ends each answer);
3. the processor's ids (image placeholders expanded, BOS or wrappers added) are aligned to
   the render's tokens by a sequence diff: tokens the processor inserted (image runs,
   ``<start_of_image>`` wrappers) are never supervised; a supervised token the processor
   changed is an error naming the sample.

``train_on_prompt``: every token but image placeholders and padding is a label. The first
token of a sample is never one (nothing in the sample predicts it, so a packed row never
predicts across samples).

An item (``HFProcessorDataset[i]``) is a dict: ``input_ids`` and ``labels`` (LongTensor [L],
unshifted, -100 = not supervised), ``token_inputs`` (the processor's other per-token
outputs, [L] each: ``token_type_ids``, ``mm_token_type_ids``), ``vision_inputs`` (the image
processor's outputs of this sample, batch dimension first: ``pixel_values``,
``image_grid_thw``, ``image_sizes``...), ``image_files`` (the image paths: a feature
cache's keys), ``id``, ``index``, ``num_images``. A sample that cannot be used (a bad image
file, an image the processor rejects, longer than ``max_length``) is None, counted in
``skipped`` by reason; ``strict=True`` raises instead.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import inspect
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import AutoProcessor

from fastvlm.data.conversation import IGNORE_INDEX, _check_coverage, _classify, _describe
from fastvlm.data.formats import IMAGE_TAG, Sample, estimate_length
from fastvlm.data.hf_image_tokens import estimator_code, sample_image_tokens
from fastvlm.data.images import BadImageCounter, BadImageError, open_image
from fastvlm.data.lengths import cached_array, code_hash

PER_TOKEN_SUFFIX = "token_type_ids"  # token_type_ids, mm_token_type_ids: the processor's per-token outputs
DROPPED = ("attention_mask", "labels")  # the collator makes the mask; PaliGemma's BC labels are not ours
CALIBRATION_SAMPLES = 64  # samples rendered and tokenized (no images) to calibrate the length estimates
CALIBRATION = 0.9  # quantile of true / estimated text tokens the estimates are scaled by
_SENTINEL = re.compile("\ue000(\\d+)\ue001")


class RenderError(ValueError):
    """A render that cannot be aligned to its messages, or whose labels cannot be exact."""


def load_processor(processor):
    """A transformers processor: the object itself or ``AutoProcessor.from_pretrained(path)``."""
    if isinstance(processor, (str, Path)):
        path = Path(processor)
        if not path.is_dir():
            raise ValueError(f"processor: no directory at {path}")
        return AutoProcessor.from_pretrained(path)
    if not callable(processor) or not hasattr(processor, "tokenizer"):
        raise ValueError(f"processor: expected a transformers processor or its directory, got "
                         f"{type(processor).__name__}")
    return processor


def set_pixel_budget(processor, min_pixels: int | None, max_pixels: int | None) -> None:
    """Dynamic resolution (Qwen-VL family): images resized to keep their pixel count in
    [min_pixels, max_pixels] (the image processor's ``size`` shortest/longest edge)."""
    if min_pixels is None and max_pixels is None:
        return
    image = getattr(processor, "image_processor", None)
    size = dict(getattr(image, "size", None) or {})
    if not {"shortest_edge", "longest_edge"} <= set(size):
        raise ValueError(f"data.min_pixels / data.max_pixels: {type(image).__name__} has no pixel budget (dynamic "
                         f"resolution, size with shortest_edge / longest_edge); its size is {size}")
    for key, value, edge in (("min_pixels", min_pixels, "shortest_edge"), ("max_pixels", max_pixels, "longest_edge")):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"data.{key}: expected a positive int (pixels), got {value!r}")
            size[edge] = value
    if size["shortest_edge"] > size["longest_edge"]:
        raise ValueError(f"data.min_pixels ({size['shortest_edge']}) is above data.max_pixels "
                         f"({size['longest_edge']})")
    image.size = size


def to_messages(turns: Sequence[dict], system: str | None = None) -> list[dict]:
    """LLaVA-form turns as transformers chat messages: content a list of ``{"type": "text"}``
    and ``{"type": "image"}`` parts in the order of the ``<image>`` tags (LLaVA's
    ``<image>\\n`` line: the newline after a tag belongs to the tag)."""
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    messages = []
    if system is not None and turns[0]["from"] != "system":
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    for turn in turns:
        parts = []
        for k, text in enumerate(turn["value"].split(IMAGE_TAG)):
            if k:
                parts.append({"type": "image"})
                text = text.removeprefix("\n")
            if text:
                parts.append({"type": "text", "text": text})
        messages.append({"role": roles[turn["from"]], "content": parts})
    return messages


def _sentinel(k: int) -> str:
    return f"\ue000{k}\ue001"


def message_spans(render, messages: list[dict], sample_id) -> tuple[str, list]:
    """The template's render of `messages` and [start, end) of each message's text in it
    (None for a message without text; see the module docstring). ``render(messages)``
    renders a conversation."""
    texts, owner, marked = [], [], []
    for m, message in enumerate(messages):
        content = []
        for part in message["content"]:
            if part["type"] == "text":
                content.append({"type": "text", "text": _sentinel(len(texts))})
                texts.append(part["text"])
                owner.append(m)
            else:
                content.append(part)
        marked.append({**message, "content": content})
    real, skeleton = render(messages), render(marked)
    pieces = _SENTINEL.split(skeleton)
    found = [int(k) for k in pieces[1::2]]
    if sorted(found) != list(range(len(texts))):
        raise RenderError(f"sample {sample_id!r}: the chat template did not render each message's text once "
                          f"(rendered text parts {found} of {len(texts)})")

    def fail(at: int) -> RenderError:
        return RenderError(f"sample {sample_id!r}: the chat template's render cannot be aligned to its messages at "
                           f"character {at}: {real[max(0, at - 20):at + 40]!r}")

    cursor, spans = 0, [None] * len(texts)
    if not real.startswith(pieces[0]):
        raise fail(0)
    cursor = len(pieces[0])
    for k, after in zip(found, pieces[2::2]):
        text = texts[k]
        for candidate in dict.fromkeys((text, text.strip(), text.lstrip(), text.rstrip())):
            end = cursor + len(candidate)
            if real.startswith(candidate, cursor) and real.startswith(after, end):
                spans[k] = (cursor, end)
                cursor = end + len(after)
                break
        else:
            raise fail(cursor)
    if cursor != len(real):
        raise fail(cursor)
    per_message = [[s for s, o in zip(spans, owner) if o == m] for m in range(len(messages))]
    return real, [(ss[0][0], ss[-1][1]) if ss else None for ss in per_message]


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special)
    return ids


def image_token_ids(processor) -> set[int]:
    tok = processor.tokenizer
    names = {getattr(obj, attr, None) for obj in (tok, processor) for attr in ("image_token", "video_token")}
    ids = {tok.convert_tokens_to_ids(n) for n in names if isinstance(n, str)}
    return {i for i in ids if i is not None and i != tok.unk_token_id}


def supervised_tokens(text: str, offsets: np.ndarray, ids: list[int], spans, specials: set[int],
                      sample_id) -> np.ndarray:
    """bool per token of ``text``: in an assistant span, or its end-of-turn token (and the
    whitespace tokens before it)."""
    mask = np.zeros(len(text), dtype=bool)
    for start, end in spans:
        mask[start:end] = True
    sup, _, straddle, _ = _classify(text, offsets, mask, np.zeros(len(text), dtype=np.int64))
    if straddle >= 0:
        raise RenderError(f"sample {sample_id!r}: {_describe(text, *offsets[straddle])} straddles the boundary of "
                          f"an assistant message; the label mask cannot be exact with this tokenizer")
    for _, end in spans:
        j = int(np.searchsorted(offsets[:, 0], end, side="left"))
        run = []
        while j < len(ids) and ids[j] not in specials and text[offsets[j, 0]:offsets[j, 1]].isspace():
            run.append(j)
            j += 1
        if j < len(ids) and ids[j] in specials:
            sup[run + [j]] = True
    return sup


def special_texts(tokenizer, image_ids: set[int]) -> tuple[str, ...]:
    """The texts of the tokenizer's special tokens but the image placeholders: what may end an
    answer in a render."""
    return tuple(sorted(tokenizer.convert_ids_to_tokens(sorted(_special_ids(tokenizer) - image_ids))))


def end_answers(text: str, spans: list[tuple[int, int]], tokenizer, specials: tuple[str, ...]
                ) -> tuple[str, list[tuple[int, int]], bool]:
    """(text, spans, whether an answer had no end): each answer (a [start, end) span of
    `text`) followed by a special token, its end of turn, supervised with it. Where the
    template renders none (llava-1.5-hf's ends an answer with ' ' and the next 'USER:'),
    the tokenizer's EOS is inserted after the answer, as LLaVA's own training ends each
    answer: without it the model would never learn to stop. Training and the evaluation's
    prompts (earlier answers of a conversation) render answers alike."""
    eos = tokenizer.eos_token or ""
    ended, shift, missing = [], 0, False
    for start, end in spans:
        start, end = start + shift, end + shift
        if not text[end:].lstrip().startswith(specials):
            missing = True
            text = text[:end] + eos + text[end:]
            shift += len(eos)
        ended.append((start, end))
    return text, ended, missing


def align(render_ids: list[int], processor_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """int per processor token: the render token it is (-1: inserted by the processor), and
    bool per render token: kept unchanged by the processor."""
    source = np.full(len(processor_ids), -1, dtype=np.int64)
    kept = np.zeros(len(render_ids), dtype=bool)
    matcher = difflib.SequenceMatcher(None, render_ids, processor_ids, autojunk=False)
    for i, j, n in matcher.get_matching_blocks():
        source[j:j + n] = np.arange(i, i + n)
        kept[i:i + n] = True
    return source, kept


def _is_prefix_lm(processor) -> bool:
    """A processor taking a ``suffix`` (PaliGemma): token_type_ids 1 marks the suffix (the
    answer, attended causally), 0 the prefix (attended bidirectionally)."""
    return "suffix" in inspect.signature(type(processor).__call__).parameters


class HFProcessorDataset(Dataset):
    def __init__(self, samples: Sequence[Sample], image_root, processor, *, chat_template: str | None = None,
                 max_length: int | None = None, train_on_prompt: bool = False, system: str | None = None,
                 min_pixels: int | None = None, max_pixels: int | None = None, strict: bool = False,
                 data_path=None, image_checks: dict | None = None):
        """samples: e.g. ``read_samples(path)``. processor: a transformers processor or its
        directory (a given object is copied: the pixel budget is set on the copy).
        chat_template: a Jinja template used instead of the processor's own (required when
        it has none). max_length: longer samples are skipped (``too_long``), never cut.
        image_checks: min_size, max_pixels, max_aspect for ``open_image``."""
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise ValueError(f"max_length: expected a positive int or None, got {max_length!r}")
        self.processor = copy.deepcopy(load_processor(processor))
        if chat_template is not None and not isinstance(chat_template, str):
            raise ValueError(f"chat_template: expected a Jinja template string, got {type(chat_template).__name__}")
        self.chat_template = chat_template if chat_template is not None else getattr(self.processor,
                                                                                      "chat_template", None)
        if not self.chat_template:
            raise ValueError(f"processor: {type(self.processor).__name__} has no chat template; give one "
                             f"(chat_template=, the recipe's data.chat_template)")
        tok = self.processor.tokenizer
        if not getattr(tok, "is_fast", False):
            raise ValueError(f"processor: its tokenizer {type(tok).__name__} is not a fast tokenizer; character "
                             f"offsets (for the label mask) need one")
        set_pixel_budget(self.processor, min_pixels, max_pixels)
        self.samples, self.image_root = samples, Path(image_root)
        self.max_length, self.train_on_prompt, self.system, self.strict = max_length, train_on_prompt, system, strict
        self.data_path = data_path if data_path is not None else getattr(samples, "path", None)
        self.image_checks = dict(image_checks or {})
        self.skipped = BadImageCounter()
        self.specials, self.image_ids = _special_ids(tok), image_token_ids(self.processor)
        self.special_texts = special_texts(tok, self.image_ids)
        self.warned = False  # an answer without an end of turn: warned once
        self.prefix_lm = _is_prefix_lm(self.processor)
        self.length_calibration: float | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def _skip(self, reason: str, sample, message: str):
        if self.strict:
            raise ValueError(message)
        self.skipped.add(reason, sample.id)

    # ---- rendering and labels ----------------------------------------------------------------
    def _render(self, messages: list[dict]) -> str:
        return self.processor.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=False)

    def render(self, sample: Sample) -> tuple[str, list[tuple[int, int]]]:
        """The chat template's text of the sample and the character spans of its assistant
        messages in it."""
        messages = to_messages(sample.conversations, self.system)
        text, spans = message_spans(self._render, messages, sample.id)
        placeholder = getattr(self.processor, "image_token", None)
        if isinstance(placeholder, str) and text.count(placeholder) != len(sample.images):
            raise RenderError(f"sample {sample.id!r}: the chat template rendered {text.count(placeholder)} image "
                              f"placeholder(s) {placeholder!r} for {len(sample.images)} image(s)")
        answers = [s for s, m in zip(spans, messages) if m["role"] == "assistant" and s is not None]
        return self._end_answers(text, answers)

    def _end_answers(self, text: str, spans: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
        text, spans, inserted = end_answers(text, spans, self.processor.tokenizer, self.special_texts)
        if inserted and not self.warned:
            self.warned = True
            eos = self.processor.tokenizer.eos_token
            warnings.warn("the chat template renders no special token after an answer; "
                          + (f"the tokenizer's EOS {eos!r} is added after each such answer (supervised)" if eos else
                             "the tokenizer has no EOS to add there: the model will not learn to stop"),
                          stacklevel=3)
        return text, spans

    def _render_tokens(self, sample: Sample, text: str, spans):
        """(the render's ids, offsets [n, 2], supervised per token)."""
        enc = self.processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        try:
            _check_coverage(text, offsets)
        except ValueError as err:
            raise RenderError(f"sample {sample.id!r}: {err}") from None
        return ids, offsets, supervised_tokens(text, offsets, ids, spans, self.specials, sample.id)

    def labels(self, sample: Sample, text: str, spans, processor_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(labels, assistant mask) of the processor's ids of the sample's render `text`
        whose assistant spans are `spans` (see the module docstring)."""
        ids, offsets, sup = self._render_tokens(sample, text, spans)
        source, kept = align(ids, processor_ids)
        changed = np.flatnonzero(sup & ~kept)
        if changed.size:
            raise RenderError(f"sample {sample.id!r}: the processor changed supervised "
                              f"{_describe(text, *offsets[changed[0]])}; the labels cannot be aligned")
        pids = np.asarray(processor_ids, dtype=np.int64)
        assistant = np.where(source >= 0, sup[np.maximum(source, 0)], False)
        if not assistant.any():
            raise RenderError(f"sample {sample.id!r}: no token is supervised (no assistant text in the render)")
        if self.train_on_prompt:
            pad = self.processor.tokenizer.pad_token_id
            # every token but images and padding; an answer's end of turn is kept where it is the pad id
            keep = assistant | ~np.isin(pids, list(self.image_ids | ({pad} if pad is not None else set())))
        else:
            keep = assistant
        labels = np.where(keep, pids, IGNORE_INDEX)
        labels[0] = IGNORE_INDEX
        return labels, assistant

    # ---- items -------------------------------------------------------------------------------
    def _images(self, sample: Sample):
        files = [self.image_root / rel for rel in sample.images]
        images = []
        for path in files:
            try:
                images.append(open_image(path, **self.image_checks))
            except BadImageError as err:
                if self.strict:
                    raise
                self.skipped.add(err.reason, err.path)
                return files, None
        return files, images

    def process(self, text: str, images) -> dict:
        """The processor's outputs for a render and its images (batch dim 1)."""
        # one list of images per text: the processor sees one multi-image sample (LLaVA-OneVision,
        # Idefics3 treat a flat list as one image per sample)
        return self.processor(text=[text], images=[list(images)] if images else None, add_special_tokens=False,
                              return_tensors="pt")

    def __getitem__(self, index: int) -> dict | None:
        sample = self.samples[index]
        files, images = self._images(sample)
        if images is None:
            return None
        text, spans = self.render(sample)
        try:
            out = self.process(text, images)
        except Exception as err:  # noqa: BLE001  the processor's own refusal, whatever its type
            return self._skip("rejected", sample, f"sample {sample.id!r}: the processor rejected it: "
                                                  f"{type(err).__name__}: {err}")
        ids = out["input_ids"][0]
        if self.max_length is not None and ids.numel() > self.max_length:
            return self._skip("too_long", sample, f"sample {sample.id!r}: {ids.numel()} tokens, more than "
                                                  f"max_length {self.max_length}")
        labels, assistant = self.labels(sample, text, spans, ids.tolist())
        token_inputs = {k: v[0] for k, v in out.items() if k.endswith(PER_TOKEN_SUFFIX)}
        if self.prefix_lm:  # the answer (from the first supervised token on) is the suffix
            first = int(np.flatnonzero(assistant)[0])
            token_inputs["token_type_ids"] = (torch.arange(ids.numel()) >= first).long()
        vision = {k: v for k, v in out.items() if k != "input_ids" and k not in DROPPED and k not in token_inputs}
        return {"input_ids": ids.long(), "labels": torch.from_numpy(labels), "token_inputs": token_inputs,
                "vision_inputs": vision, "image_files": files, "id": sample.id, "index": index,
                "num_images": len(files)}

    # ---- cheap per-sample metadata for the sampler ---------------------------------------------
    def _image_tokens(self, sample: Sample) -> int:
        """Placeholder tokens of the sample's images from their headers (no pixel decoded);
        0 for a file that does not open (the sample is skipped when fetched)."""
        sizes = []
        for rel in sample.images:
            try:
                with Image.open(self.image_root / rel) as image:  # reads the header only
                    sizes.append((image.height, image.width))
            except (OSError, ValueError):
                continue
        if not sizes:
            return 0
        counted = sample_image_tokens(self.processor, sizes, self.__dict__.setdefault("_tile_token_memo", {}))
        return counted if counted is not None else sum(self._measured_image_tokens(size) for size in sizes)

    def _measured_image_tokens(self, size: tuple[int, int]) -> int:
        """Placeholder tokens of one image of `size` (height, width), by running the processor
        on a blank one (for a processor that cannot say without an image); memoised by size."""
        memo = self.__dict__.setdefault("_image_token_memo", {})
        if size not in memo:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]
            image = Image.new("RGB", (size[1], size[0]))
            ids = self.process(self._render(messages), [image])["input_ids"]
            memo[size] = int(torch.isin(ids, torch.tensor(sorted(self.image_ids))).sum())
        return memo[size]

    def _estimate_all(self) -> np.ndarray:
        raw = np.asarray([estimate_length(s, 0) for s in self.samples], dtype=np.int64)
        images = np.asarray([self._image_tokens(s) for s in self.samples], dtype=np.int64)
        counts = np.asarray([len(s.images) for s in self.samples], dtype=np.int64)
        if not len(raw):
            return np.zeros((2, 0), dtype=np.int64)
        pick = np.random.default_rng(0).choice(len(raw), size=min(len(raw), CALIBRATION_SAMPLES), replace=False)
        ratios = []
        for i in pick.tolist():
            sample = self.samples[i]
            text, _ = self.render(sample)
            true = len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]) - len(sample.images)
            ratios.append(true / max(1, raw[i]))
        self.length_calibration = float(np.quantile(ratios, CALIBRATION))
        text = np.maximum(1, np.ceil(raw * self.length_calibration)).astype(np.int64)
        return np.stack([text + images, counts])

    def _estimates(self) -> np.ndarray:
        if self.data_path is None:
            if not hasattr(self, "_memo"):
                self._memo = self._estimate_all()
            return self._memo
        estimator = [HFProcessorDataset._estimate_all, HFProcessorDataset._image_tokens, *estimator_code()]
        options = "|".join([f"estimator={''.join(code_hash(f) for f in estimator)}", f"n={len(self)}",
                            f"processor={self._processor_hash()}", f"system={self.system!r}",
                            f"image_root={self.image_root}", f"calibration={CALIBRATION}"])
        return cached_array(self.data_path, options, self._estimate_all)

    def _processor_hash(self) -> str:
        state = repr(sorted(self.processor.image_processor.to_dict().items())) + self.chat_template
        state += self.processor.tokenizer.backend_tokenizer.to_str()
        return hashlib.sha256(state.encode()).hexdigest()[:16]

    def lengths(self) -> list[int]:
        """Estimated token count per sample: calibrated text plus the processor's count for
        each image at its size."""
        return self._estimates()[0].tolist()

    def has_images(self) -> list[bool]:
        return (self._estimates()[1] > 0).tolist()

