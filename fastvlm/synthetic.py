"""Synthetic packed VLM batches, shaped like real ones, for benchmarks and the demo.

Scenarios (token counts follow the public models):
- ``llava``: LLaVA-1.5 samples: a short prompt, one 576-token image, question and answer.
- ``multi_image``: multi-turn conversations with 4 images of 576 tokens between turns.
- ``packed``: many short samples packed into one row, a third of them text-only.
- ``qwen2vl``: long image runs (dynamic resolution: 1k to 4k tokens) with short text.
Each sample is packed left to right until the row is full; the tail is padding.
"""
from __future__ import annotations

import random

import torch

from fastvlm.ops.layout import AttentionLayout
from fastvlm.utils.checks import as_int

SCENARIOS = ("llava", "multi_image", "packed", "qwen2vl")


def _sample(rng: random.Random, scenario: str) -> list[tuple[str, int]]:
    """One sample as (text|image, length) pieces."""
    if scenario == "llava":
        return [("text", rng.randint(5, 40)), ("image", 576), ("text", rng.randint(20, 400))]
    if scenario == "multi_image":
        pieces = [("text", rng.randint(5, 30))]
        for _ in range(4):
            pieces += [("image", 576), ("text", rng.randint(30, 300))]
        return pieces
    if scenario == "packed":
        if rng.random() < 0.33:
            return [("text", rng.randint(50, 600))]
        return [("text", rng.randint(5, 40)), ("image", rng.choice([144, 256, 576])),
                ("text", rng.randint(10, 200))]
    if scenario == "qwen2vl":
        return [("text", rng.randint(5, 30)), ("image", rng.randint(1024, 4096)),
                ("text", rng.randint(20, 300))]
    raise ValueError(f"scenario: unknown {scenario!r}; expected one of {', '.join(SCENARIOS)}")


def vlm_layout(seq_len: int, kind: str = "mmca", scenario: str = "llava", *, batch: int = 1,
               seed: int = 0, split_softmax: bool = False, device="cpu") -> AttentionLayout:
    """A [batch, seq_len] packed layout of `scenario` samples (prefix = all but the last
    text piece of each sample, for prefix_lm)."""
    seq_len, batch = as_int(seq_len, "seq_len", minimum=1), as_int(batch, "batch", minimum=1)
    rng = random.Random(seed)
    seg = torch.full((batch, seq_len), -1, dtype=torch.int32)
    img = torch.full((batch, seq_len), -1, dtype=torch.int32)
    pre = torch.zeros((batch, seq_len), dtype=torch.bool)
    for b in range(batch):
        pos, s = 0, 0
        while pos < seq_len:
            pieces = _sample(rng, scenario)
            start, image = pos, 0
            for i, (what, length) in enumerate(pieces):
                length = min(length, seq_len - pos)
                if what == "image":
                    img[b, pos:pos + length] = image
                    image += 1
                if i < len(pieces) - 1:
                    pre[b, pos:pos + length] = True
                pos += length
                if pos == seq_len:
                    break
            seg[b, start:pos] = s
            s += 1
    return AttentionLayout(seg.to(device), img.to(device),
                           pre.to(device) if kind == "prefix_lm" else None, kind,
                           split_softmax=split_softmax)
