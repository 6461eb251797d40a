"""Learning-rate schedules: linear warmup, then cosine decay or constant.

``lr_lambda(stage, total_steps)`` is the multiplier of each group's base LR at a
step (for torch's LambdaLR), so every group keeps its own LR and shares the shape.
"""
from __future__ import annotations

import math


def lr_multiplier(step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based) of `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_lambda(stage, total: int):
    warmup = round(stage.warmup_ratio * total)
    return lambda step: lr_multiplier(step, total, warmup, stage.schedule, stage.min_lr_ratio)
