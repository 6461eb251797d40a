"""The seam between the training loop and a model: one small loss module per stage type.

The loop knows nothing of a model's parts. It asks ``stage_loss`` for the stage's
loss module, lets DDP / FSDP wrap that module, and calls it on each micro-batch:
``loss, counts = module(batch)``, the mean loss over what the batch supervises
(tokens, or pairs for a contrastive or preference batch) and counts for the step's
record (``counts["metrics"]``: scalar tensors the step's record averages, e.g. a
preference loss's reward margin and accuracy). What
a model must offer to be trained is ``TrainableModel``; ``fastvlm.VLM`` is its first
implementation.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from fastvlm.models.feature_cache import FeatureCache
from fastvlm.nn.lora import adapters_disabled
from fastvlm.train.preference import preference_loss
from fastvlm.train.recipe import PreferenceSection, Stage


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
    text alone), ``add_contrastive_heads`` / ``contrastive_loss`` (contrastive),
    ``answer_logprobs`` (preference: each answer's summed log-probs from shared-prompt rows).
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


def loss_params(p: PreferenceSection) -> dict:
    """The keyword arguments of the stage's preference loss (fastvlm.train.preference)."""
    return {"dpo": {"beta": p.beta, "label_smoothing": p.label_smoothing},
            "simpo": {"beta": p.beta, "gamma": p.gamma}, "orpo": {"beta": p.beta}}[p.loss]


def preference_inputs(model: TrainableModel, batch: dict, device, cache: FeatureCache | None = None) -> dict:
    """answer_logprobs' keyword arguments from a collated batch of shared-prompt rows."""
    return {**model.batch_inputs(batch, device, cache),
            **{k: batch[k].to(device) for k in ("branch_ids", "targets", "sequence_ids")},
            "num_sequences": batch["num_sequences"]}


class PreferenceLoss(nn.Module):
    """preference: DPO / SimPO / ORPO (fastvlm.train.preference) of a batch of pairs, from one
    forward of its shared-prompt rows (``answer_logprobs``). DPO's reference log-probs come
    from the same model with its adapters switched off (no autograd, before the policy's
    forward, so recomputation under checkpointing sees the adapters on), or from
    `reference`, the precomputed table [pairs, 2] (chosen, rejected) by dataset index."""

    def __init__(self, model: TrainableModel, device: torch.device, settings: PreferenceSection,
                 cache: FeatureCache | None = None, reference: torch.Tensor | None = None):
        super().__init__()
        self.model, self.device, self.settings, self.cache = model, device, settings, cache
        self.reference, self.params = reference, loss_params(settings)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        inputs = preference_inputs(self.model, batch, self.device, self.cache)
        ref = self.reference_logprobs(batch, inputs) if self.settings.loss == "dpo" else None
        logp, counts = self.model.answer_logprobs(**inputs)
        ref = ref.to(logp.dtype) if ref is not None else None  # a precomputed table is float64
        loss, metrics = preference_loss(self.settings.loss, logp, counts, ref, **self.params)
        return loss, {"pairs": batch["num_samples"], "metrics": metrics}

    def reference_logprobs(self, batch: dict, inputs: dict) -> torch.Tensor:
        if self.reference is None:
            with torch.no_grad(), adapters_disabled(self.model):
                return self.model.answer_logprobs(**inputs)[0]
        ref = self.reference[batch["item_indices"]].flatten()
        if bool(ref.isnan().any()):
            raise ValueError("reference: a pair of this batch has no precomputed reference log-probs (its "
                             "images could not be read during the reference pass)")
        return ref.to(self.device)


def stage_loss(model: TrainableModel, stage: Stage, device: torch.device,
               cache: FeatureCache | None = None, reference: torch.Tensor | None = None) -> nn.Module:
    """The loss module of `stage`'s type (what DDP / FSDP wrap); `reference`: a preference
    stage's precomputed reference log-probs (fastvlm.train.reference)."""
    if not isinstance(model, TrainableModel):
        raise ValueError(f"model: a {type(model).__name__} is not trainable here (it lacks batch_inputs, "
                         "GROUP_PATTERNS, fsdp_units or save_pretrained: see fastvlm.train.losses.TrainableModel)")
    if stage.type == "contrastive":
        return ContrastiveLoss(model, device, stage.contrastive.text_source, stage.contrastive.chunk)
    if stage.type == "lm":
        return TextLoss(model, device)
    if stage.type == "preference":
        return PreferenceLoss(model, device, stage.preference, cache, reference)
    return LanguageModelLoss(model, device, cache)
