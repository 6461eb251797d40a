"""Optimizers for adapter training: parameter groups with their own learning rates.

A VLM's trainable parts want different LRs: a freshly initialised connector
tolerates a high one, while adapters on pretrained parts (LLM, and more so the
vision encoder) need lower ones, or training undoes their pre-training.
``param_groups`` sorts trainable parameters into named groups by regex over
parameter names (first match wins); ``build_optimizer`` makes a torch AdamW or
a bitsandbytes 8-bit / paged AdamW over them.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from fastvlm.train.lora import TOWER_NAMES


def _under(names) -> str:
    return rf"(^|.*\.)({'|'.join(names)})\..*"


# Ordered: the first pattern that matches a parameter's name picks its group. The part
# names are apply_lora's (fastvlm's, transformers' LLaVA's), plus a generic "encoder".
DEFAULT_GROUPS = {
    "connector": _under(TOWER_NAMES["connector"]),
    "encoder_adapters": _under(TOWER_NAMES["vision"] + ("encoder",)),
    "llm_adapters": r".*",
}
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")


def param_groups(model: nn.Module, lrs: dict[str, float], patterns: dict[str, str] | None = None,
                 weight_decay: float = 0.0) -> list[dict]:
    """Trainable parameters split into groups ``{"name", "params", "lr", "weight_decay"}``.

    `lrs` maps each group name of `patterns` (default DEFAULT_GROUPS) to its LR; a
    group with no trainable parameter is left out. Biases and 1-D parameters (norm
    scales) get no weight decay.
    """
    patterns = DEFAULT_GROUPS if patterns is None else patterns
    unknown = set(lrs) - set(patterns)
    if unknown:
        raise ValueError(f"lrs: unknown groups {sorted(unknown)}; groups are {list(patterns)}")
    compiled = {g: re.compile(p) for g, p in patterns.items()}
    buckets: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = next((g for g, rx in compiled.items() if rx.fullmatch(name)), None)
        if group is None:
            raise ValueError(f"patterns: trainable parameter {name!r} matches no group")
        if group not in lrs:
            raise ValueError(f"lrs: no learning rate for group {group!r} (holds {name!r})")
        buckets.setdefault((group, p.ndim >= 2), []).append(p)
    if not buckets:
        raise ValueError("model: has no trainable parameters")
    return [{"name": g if decays else f"{g}_no_decay", "params": ps, "lr": lrs[g],
             "weight_decay": weight_decay if decays else 0.0}
            for (g, decays), ps in buckets.items()]


def build_optimizer(groups: list[dict], name: str = "adamw", betas=(0.9, 0.999), eps: float = 1e-8):
    """AdamW over `groups`: torch's, or bitsandbytes' 8-bit / paged (state paged to host on CUDA)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"name: expected one of {', '.join(OPTIMIZERS)}, got {name!r}")
    for g in groups:  # torch checks only its default lr, not each group's
        for key in ("lr", "weight_decay"):
            if key in g and not g[key] >= 0:
                raise ValueError(f"groups: {key} of group {g.get('name', '?')!r} must be >= 0, got {g[key]}")
    if name == "adamw":
        return torch.optim.AdamW(groups, betas=betas, eps=eps)
    import bitsandbytes as bnb

    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(groups, betas=betas, eps=eps)
