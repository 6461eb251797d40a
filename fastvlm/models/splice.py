"""Putting image features into the token embeddings at the image placeholders.

The transformers convention is accepted as is: each image's placeholder is
already expanded into a run of as many image tokens as the image has feature
vectors (what transformers' LLaVA processor produces). As a convenience, a
single unexpanded placeholder per image is expanded here. Any mismatch between
placeholders and features is an error, never a silent truncation.
"""
from __future__ import annotations

import torch

from fastvlm.utils.checks import check_finite


def placeholder_runs(input_ids: torch.Tensor, image_token_id: int) -> list[list[tuple[int, int]]]:
    """Per row, (start, length) of each consecutive run of the image token."""
    is_img = (input_ids == image_token_id).to(torch.int8)
    edges = torch.diff(is_img, dim=1, prepend=torch.zeros_like(is_img[:, :1]),
                       append=torch.zeros_like(is_img[:, :1]))
    runs = []
    for row in edges:
        starts = (row == 1).nonzero().squeeze(1).tolist()
        ends = (row == -1).nonzero().squeeze(1).tolist()
        runs.append([(s, e - s) for s, e in zip(starts, ends)])
    return runs


def expand_placeholders(input_ids: torch.Tensor, image_token_id: int, tokens_per_image: int,
                        labels: torch.Tensor | None = None, pad_token_id: int = 0):
    """Turn every single image token into a run of `tokens_per_image` (right-padding
    rows to a common length; labels of the new positions are -100).
    Returns (input_ids, labels or None, attention_mask)."""
    rows, label_rows = [], []
    for b in range(input_ids.shape[0]):
        ids = input_ids[b]
        reps = torch.where(ids == image_token_id, tokens_per_image, 1)
        rows.append(ids.repeat_interleave(reps))
        if labels is not None:
            lab = labels[b].repeat_interleave(reps)
            lab[rows[-1] == image_token_id] = -100
            label_rows.append(lab)
    n = max(r.numel() for r in rows)
    out = torch.full((len(rows), n), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros(len(rows), n, dtype=torch.long, device=input_ids.device)
    out_labels = torch.full_like(out, -100) if labels is not None else None
    for b, r in enumerate(rows):
        out[b, :r.numel()], mask[b, :r.numel()] = r, 1
        if labels is not None:
            out_labels[b, :r.numel()] = label_rows[b]
    return out, out_labels, mask


def splice_image_features(inputs_embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                          image_features: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """Replace the embeddings of image-token positions by image features, in order.

    image_features: [num_images, T, H] or a list of [T_i, H] (images of different
    token counts). Images are matched to placeholder runs in reading order (row by
    row); a run holds one or more whole images back to back (as transformers
    accepts: T_i + T_{i+1} + ... tokens), never part of one.
    """
    feats = list(image_features) if isinstance(image_features, (list, tuple)) else list(image_features.unbind(0))
    for i, f in enumerate(feats):
        if f.dim() != 2 or f.shape[-1] != inputs_embeds.shape[-1]:
            raise ValueError(f"image_features: image {i} must be [tokens, {inputs_embeds.shape[-1]}], "
                             f"got {tuple(f.shape)}")
    runs = [run for row in placeholder_runs(input_ids, image_token_id) for run in row]
    images_per_run(runs, [f.shape[0] for f in feats], image_token_id)
    mask = (input_ids == image_token_id)
    if not feats:
        return inputs_embeds
    flat = torch.cat(feats, 0).to(inputs_embeds.dtype)
    check_finite(flat, "image_features", "the vision tower (or a feature cache) produced NaN/inf; check the "
                                         "pixel values and the encoder's precision")
    # masked_scatter fills positions in row-major order, which is the order of `runs`.
    return inputs_embeds.masked_scatter(mask[..., None], flat)


def images_per_run(runs: list[tuple[int, int]], tokens: list[int], image_token_id: int) -> list[int]:
    """How many images (token counts `tokens`, in order) fill each placeholder run:
    each run must be whole images back to back, and every image must find its run."""
    counts, i = [], 0
    for r, (_, length) in enumerate(runs):
        first, filled = i, 0
        while i < len(tokens) and filled < length:
            filled, i = filled + tokens[i], i + 1
        if i == first:
            break
        if filled != length:
            what = (f"image {first} has {filled} feature vectors but its" if i == first + 1 else
                    f"images {first}..{i - 1} have {filled} feature vectors together but their")
            raise ValueError(f"image_features: {what} placeholder run has {length} tokens (a run holds whole "
                             "images back to back; expand each placeholder to the feature count, e.g. with "
                             "fastvlm.models.splice.expand_placeholders)")
        counts.append(i - first)
    if len(counts) != len(runs) or i != len(tokens):
        raise ValueError(f"image_features: {len(tokens)} images for {len(runs)} image placeholder runs "
                         f"(token id {image_token_id}) in input_ids, each run one or more whole images")
    return counts
