"""A Hugging Face VLM run (``model.source = "hf"``): its model, processor, stage data and shaping.

- ``build_hf_model``: the directory ``model.path`` loaded with transformers' own class
  (fastvlm.integrations.hf_load) in the dtype its weights are stored in and patched
  (fastvlm attention layouts, fused projector, the stages' vision checkpointing policy,
  fused LM-head loss), in ``HFVLM``, the trainer's model seam. Each stage's precision then
  casts it (fastvlm.train.build): what trains to float32 (exact from bf16 / fp16), what is
  frozen to the compute dtype (an fp32 stage: all of it to float32), so a bf16 checkpoint
  of a bf16 run is never held in float32 as a whole, and every weight has the dtype and
  value it had when the run loaded checkpoints in float32;
- ``RunProcessor``: the run's "tokenizer": the model directory's processor (tokenizer,
  image processor with the pixel budget ``data.min_pixels`` / ``data.max_pixels``, chat
  template), the one every consumer uses (training, evaluation, the saved final/tokenizer
  and exports); ``hf_stage_dataset``: a stage's samples through it (fastvlm.data.hf_processor);
- ``shape_hf_stage``: what a stage trains. ``align``: the projector only; the tower and
  the LLM are frozen, so the tower runs without autograd (no parameter of it, nor its
  pixels, needs a gradient). ``instruct``: the projector (``lr.connector``), the decoder by
  LoRA / QLoRA / full fine-tuning (``lr.llm``; full includes the output head) and LoRA on
  the tower's last ``lora.vision_blocks`` layers, or the whole tower (``lr.vision``). The
  tower's LoRA targets are ``lora.vision_targets``; left at its default (CLIP / SigLIP's
  names), every Linear of a tower layer, by the names the family gives them.
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

from fastvlm.data.hf_processor import HFProcessorDataset, load_processor, set_pixel_budget
from fastvlm.integrations.hf_load import load_patched, stored_dtype
from fastvlm.integrations.hf_trainable import HFVLM, layer_list
from fastvlm.integrations.transformers import UnsupportedModelError
from fastvlm.train.lora import apply_lora
from fastvlm.train.quant import apply_qlora
from fastvlm.train.recipe import LoRASection, Recipe, Stage


def build_hf_model(recipe: Recipe) -> HFVLM:
    """The run's starting model: ``model.path`` loaded and patched, in the dtype its weights
    are stored in (each stage's precision casts it, see the module docstring)."""
    path = Path(recipe.model.path).expanduser()
    if not path.is_dir():
        raise ValueError(f"model.path: {path} does not exist (source = 'hf' needs a transformers model directory)")
    policy = recipe.stages[0].checkpointing.get("vision", "none")  # one per run (recipe.validate_hf)
    try:
        hf = load_patched(path, stored_dtype(path), checkpointing=policy)
    except (UnsupportedModelError, FileNotFoundError) as err:
        raise ValueError(f"model.{err}") from None
    float32_buffers(hf)
    return HFVLM(hf)


def float32_buffers(model: torch.nn.Module) -> None:
    """Floating buffers in float32, with the values a float32 load gives them (what the run
    had when it loaded every checkpoint in float32): a persistent one is the stored value
    (exact in float32); a non-persistent one is made from the config at load, in the load's
    dtype: Gemma's ``embed_scale`` (sqrt(hidden), rounded to bf16 in a bf16 load) is made
    again from its exact value. Buffers are a few numbers (RoPE frequencies, scales)."""
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is None or not buffer.is_floating_point() or buffer.dtype == torch.float32:
                continue
            exact = getattr(module, f"scalar_{name}", None)
            value = torch.tensor(exact, dtype=torch.float32) if isinstance(exact, float) else buffer.float()
            setattr(module, name, value.to(buffer.device))


@dataclass
class RunProcessor:
    """The processor of the model directory, in the place of a native run's tokenizer."""
    processor: object
    chat_template: str | None = None  # data.chat_template's text, used instead of the processor's

    @classmethod
    def load(cls, path: Path, chat_template_file: str = "", *, min_pixels: int | None = None,
             max_pixels: int | None = None, key: str = "model.path") -> RunProcessor:
        """The processor of directory `path` (the recipe's `key`) with the pixel budget set;
        one without a chat template, and no `chat_template_file`, is refused here, before any
        model weight is read."""
        template = None
        if chat_template_file:
            file = Path(chat_template_file).expanduser()
            if not file.is_file():
                raise ValueError(f"data.chat_template: {file} does not exist (a Jinja chat template file)")
            template = file.read_text()
        try:
            processor = load_processor(Path(path))
        except (OSError, ValueError) as err:
            raise ValueError(f"{key}: {path} holds no processor transformers can load ({err})") from None
        if template is None and not getattr(processor, "chat_template", None):
            raise ValueError(f"{key}: the processor in {path} has no chat template; set data.chat_template to a "
                             "Jinja chat template file (the model's own, e.g. its instruct version's)")
        set_pixel_budget(processor, min_pixels, max_pixels)
        return cls(processor, template)

    @classmethod
    def of_recipe(cls, recipe: Recipe, path: Path | None = None) -> RunProcessor:
        """The run's processor: ``model.tokenizer`` or ``model.path`` (`path` if given: the
        caller checked it exists), ``data.chat_template``, ``data.min_pixels`` / ``max_pixels``."""
        m, d = recipe.model, recipe.data
        return cls.load(Path(path or Path(m.tokenizer or m.path).expanduser()), d.chat_template,
                        min_pixels=d.min_pixels or None, max_pixels=d.max_pixels or None,
                        key="model.tokenizer" if m.tokenizer else "model.path")

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
    # the pixel budget is the processor's own (RunProcessor.load)
    return HFProcessorDataset(samples, image_root, processor.processor, chat_template=processor.chat_template,
                              max_length=min(budget, d.max_length or budget), train_on_prompt=stage.train_on_prompt)


def shape_hf_stage(model: HFVLM, stage: Stage, quantize_from: torch.dtype | None = None) -> None:
    """Freeze all but what `stage` trains, add its adapters (see the module docstring);
    QLoRA quantizes from `quantize_from` (None: the weights' own dtype)."""
    model.requires_grad_(False)
    if stage.type == "instruct":
        _instruct(model, stage, quantize_from)
    connector = re.compile(model.GROUP_PATTERNS["connector"])
    for name, p in model.named_parameters():
        if connector.fullmatch(name) and p.is_floating_point():
            p.requires_grad_("connector" in stage.lr)
    set_llm_checkpointing(model, stage.checkpointing.get("llm", "none") == "full")


def _instruct(model: HFVLM, stage: Stage, quantize_from: torch.dtype | None) -> None:
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
                        compute_dtype="bf16" if stage.precision == "bf16" else "fp16", quantize_from=quantize_from)
    if "vision" in stage.lr:
        tower = model.vision_tower
        if stage.finetune == "full" and not lora.vision_blocks:
            tower.requires_grad_(True)  # its mergers are the connector's: shape_hf_stage sets them after
        else:
            name, layers = layer_list(tower)
            n = len(layers)
            blocks = "|".join(str(i) for i in range(max(0, n - lora.vision_blocks), n))
            names = "|".join(re.escape(t) for t in vision_targets(model, lora, layers[n - 1]))
            apply_lora(tower, rf"{re.escape(name)}\.({blocks})\.(.*\.)?({names})", lora.r, lora.alpha, lora.dropout)


def vision_targets(model: HFVLM, lora, layer: torch.nn.Module) -> list[str]:
    """The Linear names ``lora.vision_targets`` lists (left at its default: every Linear of
    the tower's `layer`, by its own names: Qwen2.5-VL's qkv, proj, gate / up / down_proj),
    each checked to name a Linear of `layer`."""
    linears = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    listed = lora.vision_targets
    if listed == LoRASection.vision_targets:
        listed = ",".join(dict.fromkeys(n.rpartition(".")[2] for n in linears))
    targets = [t.strip() for t in listed.split(",") if t.strip()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linears)]
    if missing or not targets:
        leaves = ", ".join(dict.fromkeys(n.rpartition(".")[2] for n in linears))
        raise ValueError(f"lora.vision_targets: {', '.join(missing) or repr(listed)} name(s) no Linear of "
                         f"{type(model.hf).__name__}'s vision tower layers; their Linears are {leaves}")
    return targets


def set_llm_checkpointing(model: HFVLM, on: bool) -> None:
    """Recompute each decoder layer in backward (transformers' GradientCheckpointingLayer
    switch, set on the decoder's layers only: the tower follows the patch's own policy)."""
    for layer in layer_list(model.language_model)[1]:
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = on
            layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
