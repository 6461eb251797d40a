"""Optimizers for adapter training: parameter groups with their own learning rates.

A VLM's trainable parts want different LRs: a freshly initialised connector
tolerates a high one, while adapters on pretrained parts (LLM, and more so the
vision encoder) need lower ones, or training undoes their pre-training.
``param_groups`` sorts trainable parameters into named groups by regex over
parameter names (first match wins); ``build_optimizer`` makes a torch AdamW or
a bitsandbytes 8-bit / paged AdamW over them. ``optimizer_step`` is one step of a
stage: the micro-batches' weighted backward (``accumulate``, one process or many),
clipping, and an update skipped when the loss or gradient is not finite.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from fastvlm.train.lora import TOWER_NAMES
from fastvlm.train.schedule import lr_lambda


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


# ---- one optimizer step of a stage ---------------------------------------------------------
def stage_optimizer(model: nn.Module, stage, total_steps: int):
    """(optimizer, scheduler): one parameter group per trained group of the model's
    GROUP_PATTERNS (its own LR; biases and norms without weight decay), warmup then
    cosine / constant over the stage's steps."""
    groups = param_groups(model, stage.lr, model.GROUP_PATTERNS, stage.weight_decay)
    optimizer = build_optimizer(groups, stage.optimizer, tuple(stage.betas))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage, total_steps))


def accumulate(step_loss: nn.Module, micro: list[dict], mp, device_type: str, dist,
               metrics: dict | None = None) -> float | None:
    """Backward of this rank's micro-batches of a step, each weighted by its supervised
    tokens (pairs, for contrastive and preference) over the step's count on all ranks, times the world
    size (the gradient reduction averages): k micro-batches give the gradient of one
    k-times batch, whatever the number of ranks. Gradients synchronise on the last one
    only. Returns the step's loss, or None when it is not finite (every rank runs every
    backward, a non-finite one too: its NaN gradients reach all ranks, so they agree on
    skipping the step). `metrics` (a dict) receives the loss module's ``counts["metrics"]``
    averaged over the step with the same weights."""
    total = dist.all_reduce([sum(b["supervised_tokens"] for b in micro)])[0]
    local, named = 0.0, {}
    for i, batch in enumerate(micro):
        weight = batch["supervised_tokens"] / total if total else 0.0
        with dist.sync_context(step_loss, sync=i == len(micro) - 1):
            with mp.autocast(device_type):
                loss, counts = step_loss(batch)
            mp.backward(loss * (weight * dist.world))
        local += float(loss.detach()) * weight
        for name, v in counts.get("metrics", {}).items():
            named[name] = named.get(name, 0.0) + float(v) * weight
    if metrics is not None and named:  # every rank runs the same loss module, so holds the same names
        metrics.update(zip(sorted(named), dist.all_reduce([named[k] for k in sorted(named)])))
    value = dist.all_reduce([local])[0]
    return value if math.isfinite(value) else None


def _grad_norm(params, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor


def optimizer_step(step_loss: nn.Module, micro: list[dict], optimizer, mp, stage, device_type: str,
                   dist, metrics: dict | None = None) -> tuple[float | None, float, bool]:
    """One optimizer step: (loss or None when non-finite, gradient norm, whether it stepped).
    A non-finite loss or gradient skips the update (fp16: the loss scale backs off).
    `metrics`: see accumulate."""
    optimizer.zero_grad(set_to_none=True)
    loss_value = accumulate(step_loss, micro, mp, device_type, dist, metrics)
    grad_norm = float("nan")
    if loss_value is not None:
        mp.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = _grad_norm(params, stage.grad_clip or float("inf"))
    # With fp16 the scaler sees inf gradients itself (skips, backs off); otherwise skip here.
    stepped = loss_value is not None and (mp.scaler is not None or math.isfinite(grad_norm)) and mp.step(optimizer)
    if loss_value is None and mp.scaler is not None:
        mp.scaler.update(mp.scaler.get_scale() / 2)  # back off as GradScaler does on an overflow
    if not stepped:
        optimizer.zero_grad(set_to_none=True)
    return loss_value, grad_norm, stepped


def bad_steps_message(stage, step: int, bad: int, mp, lr: float, finite: bool) -> str:
    """Why a stage stops after `bad` skipped steps in a row, and what to change."""
    what = "loss" if not finite else "gradient norm"
    if mp.precision == "fp16":
        cause = (f"fp16 overflow (loss scale now {mp.loss_scale:g}); use precision = 'bf16' or 'fp32', "
                 "or lower the learning rate")
    else:
        cause = (f"the learning rate (lr {lr:.3g} now; max {max(stage.lr.values()):.3g}) is too high for this stage, "
                 "or a batch holds broken data")
    return f"stage {stage.name!r}, step {step}: non-finite {what} in {bad} steps in a row; likely cause: {cause}"

