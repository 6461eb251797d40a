"""Collating HFProcessorDataset items into the batch a patched transformers VLM takes.

``HFPackedCollator`` lays the items of one planned row side by side in rows of exactly
``budget`` tokens (several whole samples per row, padding only at the tail);
``HFPaddedCollator`` gives each item its own row, padded to the longest. The batch:

- per token, [B, N]: ``input_ids`` (pad_id at padding), ``labels`` (-100 at padding and
  at each sample's first token, so no label is predicted across a sample boundary),
  ``segment_ids`` (int32, the sample within its row from 0, -1 = padding),
  ``position_ids`` (restarting at 0 per sample; 0 at padding), ``attention_mask`` (1 =
  a sample's token), and the processor's per-token outputs (``token_type_ids``,
  ``mm_token_type_ids``; 0 at padding);
- vision inputs: every image output of the processor (``pixel_values``,
  ``image_grid_thw``, ``image_sizes``, ``pixel_attention_mask``...) concatenated over the
  batch's samples in row order along dim 0, zero-padded in the other dims where
  samples differ (LLaVA-NeXT's patch count, Idefics3's image count);
- ``sample_images`` (LongTensor [num_samples]: images of each sample, in the same order),
  and for the trainer ``image_files``, ``ids``, ``num_samples``, ``real_tokens``,
  ``row_tokens``, ``supervised_tokens`` (and ``overflow_rows`` when packed).

Positions here are 1-D; a model with 3-row multimodal RoPE (Qwen-VL) gets its positions
per sample from its own ``get_rope_index`` in ``HFVLM.batch_inputs``, which needs the
model's config.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastvlm.data.packing import check_budget, fit_planned_rows

PER_TOKEN_FILL = {"input_ids": None, "labels": -100, "segment_ids": -1, "position_ids": 0, "attention_mask": 0}


def _check_item(item: dict) -> int:
    ids, labels = item["input_ids"], item["labels"]
    if ids.dim() != 1 or labels.shape != ids.shape:
        raise ValueError(f"items: sample {item.get('id')!r}: expected input_ids and labels of one shape [L], "
                         f"got {tuple(ids.shape)} and {tuple(labels.shape)}")
    for key, value in item["token_inputs"].items():
        if value.shape != ids.shape:
            raise ValueError(f"items: sample {item.get('id')!r}: {key} has shape {tuple(value.shape)}, expected "
                             f"{tuple(ids.shape)} like input_ids")
    return ids.numel()


def concat_padded(tensors: Sequence[torch.Tensor], key: str) -> torch.Tensor:
    """Concatenation along dim 0, each tensor zero-padded at the end of its other dims to
    the largest (a processor pads so across the images of one call)."""
    if len({t.dim() for t in tensors}) != 1:
        raise ValueError(f"{key}: samples disagree on its number of dimensions "
                         f"({sorted({t.dim() for t in tensors})})")
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        pad = []
        for d in reversed(range(1, t.dim())):
            pad += [0, shape[d - 1] - t.shape[d]]
        padded.append(F.pad(t, pad) if any(pad) else t)
    return torch.cat(padded)


def collate_hf_rows(rows: Sequence[Sequence[dict]], width: int, pad_id: int) -> dict:
    """Rows of items -> the batch dict (see the module docstring); every row `width` tokens."""
    batch_size = len(rows)
    token_keys = sorted({k for row in rows for item in row for k in item["token_inputs"]})
    fills = {**PER_TOKEN_FILL, "input_ids": pad_id, **dict.fromkeys(token_keys, 0)}
    out = {k: torch.full((batch_size, width), fill, dtype=torch.int32 if k == "segment_ids" else torch.long)
           for k, fill in fills.items()}
    vision: dict[str, list] = {}
    files, ids, sample_images = [], [], []
    for r, row in enumerate(rows):
        start = 0
        for s, item in enumerate(row):
            n = item["input_ids"].numel()
            cols = slice(start, start + n)
            out["input_ids"][r, cols], out["labels"][r, cols] = item["input_ids"], item["labels"]
            out["labels"][r, start] = -100  # nothing in this sample predicts its first token
            out["segment_ids"][r, cols], out["attention_mask"][r, cols] = s, 1
            out["position_ids"][r, cols] = torch.arange(n)
            for key in token_keys:
                if key not in item["token_inputs"]:
                    raise ValueError(f"items: sample {item.get('id')!r} has no {key} (other samples of the batch "
                                     f"have): all items must come from one processor")
                out[key][r, cols] = item["token_inputs"][key]
            for key, value in item["vision_inputs"].items():
                vision.setdefault(key, []).append(value)
            files += item.get("image_files", ())
            ids.append(item.get("id"))
            sample_images.append(int(item.get("num_images", 0)))
            start += n
    for key, values in vision.items():
        out[key] = concat_padded(values, key)
    real = int(out["attention_mask"].sum())
    out.update(sample_images=torch.tensor(sample_images, dtype=torch.long), image_files=files, ids=ids,
               num_samples=len(ids), real_tokens=real, row_tokens=batch_size * width,
               supervised_tokens=int((out["labels"] != -100).sum()))
    return out


class HFPackedCollator:
    """Items of one planned row -> rows of exactly `budget` tokens. Should the true lengths
    not fit one row (the plan is made over estimates), the items are re-packed (best-fit
    decreasing) into as many rows as they need (``overflow_rows``). A sample over the budget
    is an error: give HFProcessorDataset ``max_length=budget``, which skips it and counts it."""

    def __init__(self, pad_id: int, budget: int):
        if isinstance(pad_id, bool) or not isinstance(pad_id, int):
            raise ValueError(f"pad_id: expected an int token id, got {pad_id!r}")
        self.pad_id, self.budget = pad_id, check_budget(budget)

    def __call__(self, items: Sequence[dict]) -> dict:
        return self.collate_planned([items])

    def collate_planned(self, rows: Sequence[Sequence[dict]]) -> dict:
        """Several planned rows (a micro-batch of them), each kept as planned unless its true
        lengths overflow the budget (then re-packed, best-fit decreasing)."""
        if not rows or not all(rows):
            raise ValueError("items: nothing to collate (an empty row)")
        lengths = [[_check_item(item) for item in items] for items in rows]
        too_long = [(item.get("id"), n) for items, sizes in zip(rows, lengths) for item, n in zip(items, sizes)
                    if n > self.budget]
        if too_long:
            raise ValueError(f"items: sample {too_long[0][0]!r} has {too_long[0][1]} tokens, more than the row "
                             f"budget {self.budget} (give HFProcessorDataset max_length={self.budget})")
        fitted = fit_planned_rows(rows, lengths, self.budget)
        batch = collate_hf_rows(fitted, self.budget, self.pad_id)
        batch["overflow_rows"] = len(fitted) - len(rows)
        return batch


class HFPaddedCollator:
    """One item per row, right-padded to the longest (rounded up to pad_to_multiple_of)."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1):
        if isinstance(pad_id, bool) or not isinstance(pad_id, int):
            raise ValueError(f"pad_id: expected an int token id, got {pad_id!r}")
        if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of <= 0:
            raise ValueError(f"pad_to_multiple_of: expected a positive int, got {pad_to_multiple_of!r}")
        self.pad_id, self.multiple = pad_id, pad_to_multiple_of

    def __call__(self, items: Sequence[dict]) -> dict:
        if not items:
            raise ValueError("items: nothing to collate (an empty batch)")
        longest = max(_check_item(item) for item in items)
        width = -(-longest // self.multiple) * self.multiple
        return collate_hf_rows([[item] for item in items], width, self.pad_id)
