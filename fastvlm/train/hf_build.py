"""A Hugging Face VLM run (``model.source = "hf"``): its model, processor, stage data and shaping.

- ``build_hf_model``: the directory ``model.path`` loaded with transformers' own class
  (fastvlm.integrations.hf_load) in float32 and patched (fastvlm attention layouts, fused
  projector, the stages' vision checkpointing policy, fused LM-head loss), in ``HFVLM``,
  the trainer's model seam;
- ``RunProcessor``: the run's "tokenizer": the model directory's processor (tokenizer,
  image processor, chat template); ``hf_stage_dataset``: a stage's samples through it
  (fastvlm.data.hf_processor, the pixel budget ``data.min_pixels`` / ``data.max_pixels``);
- ``shape_hf_stage``: what a stage trains. ``align``: the projector only; the tower and
  the LLM are frozen, so the tower runs without autograd (no parameter of it, nor its
  pixels, needs a gradient). ``instruct``: the projector (``lr.connector``), the decoder by
  LoRA / QLoRA / full fine-tuning (``lr.llm``; full includes the output head) and LoRA on
  the tower's last ``lora.vision_blocks`` layers, or the whole tower (``lr.vision``).
  Adapters are fastvlm's LoRALinear (fastvlm.train.lora / quant, by module name), merged at
  the stage's end by fastvlm.train.build.finish_stage as for the native VLM.

The Hugging Face path has no feature cache (the tower encodes its pixels every step); its
VQA evaluation goes through the processor and the model's own generate
(fastvlm.train.hf_evaluation).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from fastvlm.data.hf_processor import HFProcessorDataset, load_processor
from fastvlm.integrations.hf_load import load_patched
from fastvlm.integrations.hf_trainable import HFVLM, layer_list
from fastvlm.integrations.transformers import UnsupportedModelError
from fastvlm.train.lora import apply_lora
from fastvlm.train.quant import apply_qlora
from fastvlm.train.recipe import Recipe, Stage


def build_hf_model(recipe: Recipe) -> HFVLM:
    """The run's starting model: ``model.path`` loaded and patched, in float32 (each stage's
    precision casts what it freezes)."""
    path = Path(recipe.model.path).expanduser()
    if not path.is_dir():
        raise ValueError(f"model.path: {path} does not exist (source = 'hf' needs a transformers model directory)")
    policy = recipe.stages[0].checkpointing.get("vision", "none")  # one per run (recipe.validate_hf)
    try:
        return HFVLM(load_patched(path, torch.float32, checkpointing=policy))
    except (UnsupportedModelError, FileNotFoundError) as err:
        raise ValueError(f"model.{err}") from None


@dataclass
class RunProcessor:
    """The processor of the model directory, in the place of a native run's tokenizer."""
    processor: object
    chat_template: str | None = None  # data.chat_template's text, used instead of the processor's

    @classmethod
    def load(cls, path: Path, chat_template_file: str = "") -> RunProcessor:
        template = None
        if chat_template_file:
            file = Path(chat_template_file).expanduser()
            if not file.is_file():
                raise ValueError(f"data.chat_template: {file} does not exist (a Jinja chat template file)")
            template = file.read_text()
        try:
            return cls(load_processor(Path(path)), template)
        except (OSError, ValueError) as err:
            raise ValueError(f"model.path: {path} holds no processor transformers can load ({err})") from None

    @property
    def pad_token_id(self) -> int | None:
        return self.processor.tokenizer.pad_token_id

    def save(self, path) -> None:
        """The processor's files (tokenizer, image processor, chat template) into `path`."""
        self.processor.save_pretrained(path)
        if self.chat_template is not None:
            (Path(path) / "chat_template.jinja").write_text(self.chat_template)


def hf_stage_dataset(samples, image_root, processor: RunProcessor, recipe: Recipe, stage: Stage
                     ) -> HFProcessorDataset:
    budget, d = stage.packing_budget, recipe.data
    return HFProcessorDataset(samples, image_root, processor.processor, chat_template=processor.chat_template,
                              max_length=min(budget, d.max_length or budget), train_on_prompt=stage.train_on_prompt,
                              min_pixels=d.min_pixels or None, max_pixels=d.max_pixels or None)


def shape_hf_stage(model: HFVLM, stage: Stage) -> None:
    """Freeze all but what `stage` trains, add its adapters (see the module docstring)."""
    model.requires_grad_(False)
    if stage.type == "instruct":
        _instruct(model, stage)
    connector = re.compile(model.GROUP_PATTERNS["connector"])
    for name, p in model.named_parameters():
        if connector.fullmatch(name) and p.is_floating_point():
            p.requires_grad_("connector" in stage.lr)
    set_llm_checkpointing(model, stage.checkpointing.get("llm", "none") == "full")


def _instruct(model: HFVLM, stage: Stage) -> None:
    lora = stage.lora
    if "llm" in stage.lr:
        decoder = model.language_model
        if stage.finetune == "full":
            decoder.requires_grad_(True)
            model.hf.get_output_embeddings().requires_grad_(True)
        elif stage.finetune == "lora":
            apply_lora(decoder, lora.targets, lora.r, lora.alpha, lora.dropout)
        else:
            apply_qlora(decoder, lora.targets, lora.r, lora.alpha, lora.dropout,
                        compute_dtype="bf16" if stage.precision == "bf16" else "fp16")
    if "vision" in stage.lr:
        tower = model.vision_tower
        if stage.finetune == "full" and not lora.vision_blocks:
            tower.requires_grad_(True)  # its mergers are the connector's: shape_hf_stage sets them after
        else:
            name, layers = layer_list(tower)
            n = len(layers)
            blocks = "|".join(str(i) for i in range(max(0, n - lora.vision_blocks), n))
            names = "|".join(re.escape(t.strip()) for t in lora.vision_targets.split(","))
            apply_lora(tower, rf"{re.escape(name)}\.({blocks})\.(.*\.)?({names})", lora.r, lora.alpha, lora.dropout)


def set_llm_checkpointing(model: HFVLM, on: bool) -> None:
    """Recompute each decoder layer in backward (transformers' GradientCheckpointingLayer
    switch, set on the decoder's layers only: the tower follows the patch's own policy)."""
    for layer in layer_list(model.language_model)[1]:
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = on
            layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
