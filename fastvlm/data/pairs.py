"""(image, caption) pairs for contrastive training (CLIP / SigLIP losses).

A sample's caption is its last assistant turn; its one image is decoded in the
DataLoader workers like every other image (a bad file skips the pair, counted in
``skipped``). The captions are tokenized once, when ``lengths()`` measures them: a
contrastive stage passes over the same pairs for many epochs, and tokenizing each
caption again between image decodes cost ~15 ms of the tiny demo's ~145 ms contrastive
step (one CPU thread; the batch's captions then ran with a cold tokenizer each time).
``PairCollator`` pads the captions of a batch into ``input_ids`` with a
``text_mask`` and stacks the images.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fastvlm.data.formats import Sample
from fastvlm.data.images import BadImageCounter, load_image_and_key
from fastvlm.models.preprocess import ImagePreprocessor


def caption_of(sample: Sample) -> str:
    """The sample's last assistant turn."""
    return next(t["value"] for t in reversed(sample.conversations) if t["from"] == "gpt")


class CaptionPairs(Dataset):
    """Samples of one image and a caption -> items {pixel_values [1, 3, S, S], input_ids
    (the caption's tokens), id, index, image_files, image_keys}, or None (counted)."""

    def __init__(self, samples: Sequence[Sample], image_root, tokenizer, preprocessor: ImagePreprocessor):
        bad = [s.id for s in samples if len(s.images) != 1]
        if bad:
            raise ValueError(f"samples: a caption pair holds exactly one image; sample {bad[0]!r} has "
                             f"{len(next(s for s in samples if s.id == bad[0]).images)}")
        self.samples, self.image_root, self.tokenizer = samples, Path(image_root), tokenizer
        self.preprocessor = preprocessor
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.skipped = BadImageCounter()
        # every caption's ids as one flat int64 array + offsets (a list of Python ints per
        # caption takes several times the memory on a large captions file); filled by lengths()
        self._ids: np.ndarray | None = None
        self._offsets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def _encode_caption(self, index: int) -> list[int]:
        return self.tokenizer.encode(caption_of(self.samples[index]))[0] or [self.pad_id]

    def caption_ids(self, index: int) -> list[int]:
        if self._ids is None:
            return self._encode_caption(index)
        return self._ids[self._offsets[index]:self._offsets[index + 1]].tolist()

    def _caption_tensor(self, index: int) -> torch.Tensor:
        if self._ids is None:
            return torch.tensor(self._encode_caption(index), dtype=torch.long)
        return torch.from_numpy(self._ids[self._offsets[index]:self._offsets[index + 1]].copy())

    def lengths(self) -> list[int]:
        """Caption tokens per sample (what a batch's width depends on); keeps the ids."""
        if self._ids is None:
            encoded = [self._encode_caption(i) for i in range(len(self))]
            self._offsets = np.cumsum([0] + [len(ids) for ids in encoded], dtype=np.int64)
            self._ids = np.fromiter((t for ids in encoded for t in ids), dtype=np.int64, count=int(self._offsets[-1]))
        return np.diff(self._offsets).tolist()

    def __getitem__(self, index: int) -> dict | None:
        sample = self.samples[index]
        path = self.image_root / sample.images[0]
        loaded = load_image_and_key(path, self.preprocessor, counter=self.skipped)
        if loaded is None:
            return None
        return {"pixel_values": loaded[0][None], "input_ids": self._caption_tensor(index),
                "id": sample.id, "index": index, "image_files": [path], "image_keys": [loaded[1]]}


class PairCollator:
    """Items of CaptionPairs -> {input_ids [B, L] (padded with `pad_id`), text_mask, images
    [B, 3, S, S], image_files, image_keys, ids, and the counts every batch carries}: a
    contrastive batch supervises its pairs (supervised_tokens = B)."""

    def __init__(self, pad_id: int):
        self.pad_id = int(pad_id)

    def __call__(self, items: Sequence[dict]) -> dict:
        if not items:
            raise ValueError("items: nothing to collate (an empty batch)")
        width = max(item["input_ids"].numel() for item in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(items), width, dtype=torch.bool)
        for i, item in enumerate(items):
            n = item["input_ids"].numel()
            input_ids[i, :n], mask[i, :n] = item["input_ids"], True
        return {"input_ids": input_ids, "text_mask": mask,
                "images": torch.cat([item["pixel_values"] for item in items]),
                "image_files": [f for item in items for f in item["image_files"]],
                "image_keys": [k for item in items for k in item["image_keys"]],
                "ids": [item["id"] for item in items], "num_samples": len(items),
                "real_tokens": int(mask.sum()), "row_tokens": mask.numel(), "supervised_tokens": len(items)}
