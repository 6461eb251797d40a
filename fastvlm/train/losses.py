"""The seam between the training loop and a model: one small loss module per stage type.

The loop knows nothing of a model's parts. It asks ``stage_loss`` for the stage's
loss module, lets DDP / FSDP wrap that module, and calls it on each micro-batch:
``loss, counts = module(batch)``, the mean loss over what the batch supervises
(tokens, or pairs for a contrastive batch) and counts for the step's record. What
a model must offer to be trained is ``TrainableModel``; ``fastvlm.VLM`` is its first
implementation.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from fastvlm.models.feature_cache import FeatureCache
from fastvlm.train.recipe import Stage


@runtime_checkable
class TrainableModel(Protocol):
    """What the trainer needs of a model (an ``nn.Module``).

    - ``batch_inputs(batch, device, cache=None)``: the keyword arguments of its forward
      taken from a collated batch (the layout inputs it needs: token ids, labels,
      segments, images or cached image features);
    - ``forward(**inputs)`` with ``labels``: the mean next-token loss of the supervised tokens;
    - ``GROUP_PATTERNS``: parameter group -> regex over parameter names (first match wins),
      the groups a stage's ``lr`` table names (connector, llm, vision, heads);
    - ``fsdp_units()``: the modules FSDP shards as units of their own;
    - ``save_pretrained(path)``.

    Stage types beyond language modelling ask for more: ``text_loss`` (lm: the LLM on
    text alone), ``add_contrastive_heads`` / ``contrastive_loss`` (contrastive).
    """

    GROUP_PATTERNS: dict[str, str]

    def batch_inputs(self, batch: dict, device, cache: FeatureCache | None = None) -> dict: ...

    def fsdp_units(self) -> list[nn.Module]: ...

    def save_pretrained(self, path) -> None: ...


class LanguageModelLoss(nn.Module):
    """align / instruct: the next-token loss of the batch's conversations, images
    included (their features from `cache` when the stage's tower is frozen)."""

    def __init__(self, model: TrainableModel, device: torch.device, cache: FeatureCache | None = None):
        super().__init__()
        self.model, self.device, self.cache = model, device, cache

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        loss = self.model(**self.model.batch_inputs(batch, self.device, self.cache))
        return loss, {"supervised_tokens": batch["supervised_tokens"]}


class TextLoss(nn.Module):
    """lm: the language model alone on the conversations' text."""

    def __init__(self, model: TrainableModel, device: torch.device):
        super().__init__()
        self.model, self.device = model, device

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        loss = self.model.text_loss(**self.model.batch_inputs(batch, self.device))
        return loss, {"supervised_tokens": batch["supervised_tokens"]}


class ContrastiveLoss(nn.Module):
    """contrastive: the CLIP / SigLIP loss of a batch of (image, caption) pairs."""

    def __init__(self, model: TrainableModel, device: torch.device, text_source: str, chunk: int):
        super().__init__()
        self.model, self.device, self.text_source, self.chunk = model, device, text_source, chunk

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        loss = self.model.contrastive_loss(batch["images"].to(self.device), batch["input_ids"].to(self.device),
                                           batch["text_mask"].to(self.device), text_source=self.text_source,
                                           chunk=self.chunk)
        return loss, {"pairs": batch["num_samples"]}


def stage_loss(model: TrainableModel, stage: Stage, device: torch.device,
               cache: FeatureCache | None = None) -> nn.Module:
    """The loss module of `stage`'s type (what DDP / FSDP wrap)."""
    if not isinstance(model, TrainableModel):
        raise ValueError(f"model: a {type(model).__name__} is not trainable here (it lacks batch_inputs, "
                         "GROUP_PATTERNS, fsdp_units or save_pretrained: see fastvlm.train.losses.TrainableModel)")
    if stage.type == "contrastive":
        return ContrastiveLoss(model, device, stage.contrastive.text_source, stage.contrastive.chunk)
    if stage.type == "lm":
        return TextLoss(model, device)
    return LanguageModelLoss(model, device, cache)
