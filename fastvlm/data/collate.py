"""Collating encoded samples into the batch ``VLM.forward`` takes.

An item is one sample as ``VLMDataset`` returns it: ``input_ids`` and ``labels``
(LongTensor [L], labels unshifted, -100 = not supervised), ``pixel_values``
([n_img, 3, H, W] or None), ``image_spans`` ((start, length) of each image's
token run, in placeholder order), ``prefix_len``, ``id``, ``image_files`` (the files
its images came from) and ``image_keys`` (their content keys: the feature cache's index).

``PackedCollator`` lays the items of one planned row side by side in rows of
exactly ``budget`` tokens; ``PaddedCollator`` gives each item its own row,
padded to the longest. Either way a row is its samples, then padding: padding
only at the tail. Per token the batch carries the metadata ``AttentionLayout``
needs: ``segment_ids`` (the sample within its row, restarting at 0 per row, -1 =
padding; RoPE positions restart per segment), ``image_ids`` (the image's index in
``images``, -1 = text) and, for ``kind="prefix_lm"``, ``prefix_mask``. ``images``
holds every image of the batch in the order its placeholders appear (row by row),
which is the order ``fastvlm.models.splice`` fills them in.

Shared-prompt items (``fastvlm.data.preference``: a prompt and k answers in one sample)
carry their own ``position_ids`` (answers continue from the prompt's end), ``branch_ids``
(0 = the shared prompt, 1..k = answers), ``targets`` (next-token labels within a branch) and
``sequence_ids`` (each answer's index within the item, -1 = none); a batch with such items
holds ``branch_ids`` (0 at padding), ``targets`` (-100 at padding), ``sequence_ids`` numbered
across the batch (an item's answers after those of the items before it, row by row; -1 at
padding), ``num_sequences`` and ``item_indices`` (each item's dataset ``index``, in that order).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from fastvlm.data.packing import check_budget, pack
from fastvlm.ops import KINDS

MODEL_KEYS = ("input_ids", "images", "labels", "segment_ids", "prefix_mask")
# what a shared-prompt item carries per token besides input_ids and labels
BRANCH_KEYS = ("branch_ids", "position_ids", "targets", "sequence_ids")


def model_inputs(batch: dict) -> dict:
    """The keyword arguments of ``VLM.forward`` in a collated batch."""
    return {k: batch[k] for k in MODEL_KEYS}


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    return kind


def _check_item(item: dict) -> int:
    ids, labels = item["input_ids"], item["labels"]
    if ids.dim() != 1 or labels.shape != ids.shape:
        raise ValueError(f"items: sample {item.get('id')!r}: expected input_ids and labels of one shape [L], "
                         f"got {tuple(ids.shape)} and {tuple(labels.shape)}")
    for key in BRANCH_KEYS:
        if key in item and item[key].shape != ids.shape:
            raise ValueError(f"items: sample {item.get('id')!r}: expected {key} of the shape of input_ids "
                             f"{tuple(ids.shape)}, got {tuple(item[key].shape)}")
    pixels = item.get("pixel_values")
    images = 0 if pixels is None else pixels.shape[0]
    if len(item.get("image_spans", ())) != images:
        raise ValueError(f"items: sample {item.get('id')!r}: {images} images but "
                         f"{len(item.get('image_spans', ()))} image token runs (image_spans)")
    return ids.numel()


def collate_rows(rows: Sequence[Sequence[dict]], width: int, pad_id: int, kind: str) -> dict:
    """Rows of items -> the batch dict (see the module docstring); every row `width` tokens."""
    branched = [BRANCH_KEYS[0] in item for row in rows for item in row]
    if any(branched) and not all(branched):
        raise ValueError("items: shared-prompt items (with branch_ids) and plain ones cannot share a batch")
    batch = _collate_plain_rows(rows, width, pad_id, kind)
    if any(branched):
        _add_branches(batch, rows)
    return batch


def _add_branches(batch: dict, rows: Sequence[Sequence[dict]]) -> None:
    """Shared-prompt items' own positions and branch metadata, laid out as collate_rows laid
    out their tokens (items side by side from each row's start)."""
    shape = batch["input_ids"].shape
    branch_ids = torch.zeros(shape, dtype=torch.int32)
    targets = torch.full(shape, -100, dtype=torch.long)
    sequence_ids = torch.full(shape, -1, dtype=torch.long)
    sequences, indices = 0, []
    for r, row in enumerate(rows):
        start = 0
        for item in row:
            indices.append(item.get("index"))
            end = start + item["input_ids"].numel()
            batch["position_ids"][r, start:end] = item["position_ids"]
            branch_ids[r, start:end], targets[r, start:end] = item["branch_ids"], item["targets"]
            own = item["sequence_ids"]
            sequence_ids[r, start:end] = torch.where(own >= 0, own + sequences, -1)
            sequences += int(item["num_sequences"])
            start = end
    batch.update(branch_ids=branch_ids, targets=targets, sequence_ids=sequence_ids, num_sequences=sequences,
                 item_indices=indices)  # each item's dataset index, in the order of its sequences


def _collate_plain_rows(rows: Sequence[Sequence[dict]], width: int, pad_id: int, kind: str) -> dict:
    """collate_rows for items without branches (every sample's positions 0, 1, ...)."""
    batch_size = len(rows)
    input_ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
    labels = torch.full((batch_size, width), -100, dtype=torch.long)
    segment_ids = torch.full((batch_size, width), -1, dtype=torch.int32)
    image_ids = torch.full((batch_size, width), -1, dtype=torch.int32)
    position_ids = torch.zeros((batch_size, width), dtype=torch.long)
    prefix_mask = torch.zeros((batch_size, width), dtype=torch.bool) if kind == "prefix_lm" else None
    images, files, keys, ids, supervised = [], [], [], [], 0
    for r, row in enumerate(rows):
        start = 0
        for s, item in enumerate(row):
            n = item["input_ids"].numel()
            end = start + n
            input_ids[r, start:end], labels[r, start:end] = item["input_ids"], item["labels"]
            segment_ids[r, start:end] = s
            position_ids[r, start:end] = torch.arange(n)
            if prefix_mask is not None:
                prefix_mask[r, start:start + int(item.get("prefix_len", 0))] = True
            for k, (span_start, span_len) in enumerate(item.get("image_spans", ())):
                image_ids[r, start + span_start:start + span_start + span_len] = len(images)
                images.append(item["pixel_values"][k])
            files += item.get("image_files", ())
            keys += item.get("image_keys", ())
            supervised += int((item["labels"][1:] != -100).sum())  # the first token is never a target
            ids.append(item.get("id"))
            start = end
    real = int((segment_ids >= 0).sum())
    return {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids, "image_ids": image_ids,
            "position_ids": position_ids, "prefix_mask": prefix_mask,
            "images": torch.stack(images) if images else None, "image_files": files, "image_keys": keys,
            "ids": ids,
            "num_samples": len(ids),
            "real_tokens": real, "row_tokens": batch_size * width, "supervised_tokens": supervised}


class PackedCollator:
    """Items of one planned row -> rows of exactly `budget` tokens.

    The plan is made over estimated lengths; should the true lengths not fit
    one row, the items are re-packed (best-fit decreasing) into as few rows as
    they need (``overflow_rows`` in the batch counts the extra ones), so no row
    ever exceeds the budget and no sample is lost.
    """

    def __init__(self, pad_id: int, budget: int, kind: str = "causal"):
        self.pad_id, self.budget, self.kind = int(pad_id), check_budget(budget), _check_kind(kind)

    def __call__(self, items: Sequence[dict]) -> dict:
        """The items of one planned row."""
        return self.collate_planned([items])

    def collate_planned(self, rows: Sequence[Sequence[dict]]) -> dict:
        """Several planned rows (a micro-batch of them), each kept as planned unless its
        true lengths overflow the budget (then re-packed, best-fit decreasing)."""
        if not rows or not all(rows):
            raise ValueError("items: nothing to collate (an empty row)")
        fitted = []
        for items in rows:
            lengths = [_check_item(item) for item in items]
            too_long = [(item.get("id"), n) for item, n in zip(items, lengths) if n > self.budget]
            if too_long:
                raise ValueError(f"items: sample {too_long[0][0]!r} has {too_long[0][1]} tokens, more than the "
                                 f"row budget {self.budget} (give VLMDataset max_length={self.budget})")
            fitted += ([list(items)] if sum(lengths) <= self.budget
                       else [[items[i] for i in row] for row in pack(lengths, self.budget, "bfd")])
        batch = collate_rows(fitted, self.budget, self.pad_id, self.kind)
        batch["overflow_rows"] = len(fitted) - len(rows)
        return batch


class PaddedCollator:
    """One item per row, right-padded to the longest (rounded up to pad_to_multiple_of)."""

    def __init__(self, pad_id: int, kind: str = "causal", pad_to_multiple_of: int = 1):
        if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of <= 0:
            raise ValueError(f"pad_to_multiple_of: expected a positive int, got {pad_to_multiple_of!r}")
        self.pad_id, self.kind, self.multiple = int(pad_id), _check_kind(kind), pad_to_multiple_of

    def __call__(self, items: Sequence[dict]) -> dict:
        if not items:
            raise ValueError("items: nothing to collate (an empty batch)")
        longest = max(_check_item(item) for item in items)
        width = -(-longest // self.multiple) * self.multiple
        return collate_rows([[item] for item in items], width, self.pad_id, self.kind)
