"""A patched transformers VLM behind the trainer's model seam (what ``fastvlm.VLM`` offers).

``HFVLM`` wraps a model patched by ``fastvlm.integrations.transformers.patch`` (or a
PeftModel around one) and takes the batches of ``fastvlm.data.hf_collate``:

It is the trainer's model seam (fastvlm.train.losses.TrainableModel), as ``fastvlm.VLM`` is:

- ``batch_inputs(batch, device)``: the forward's keyword arguments from a collated batch,
  on `device`, ``labels`` included: the
  per-token inputs the model's forward takes (``input_ids``, ``attention_mask``,
  ``token_type_ids``, ``mm_token_type_ids``...), ``segment_ids``, the vision inputs, and
  ``position_ids``: the batch's 1-D per-sample positions, or, for a model with
  multimodal RoPE (a ``get_rope_index``: Qwen-VL), each sample's own 3-row positions from
  that function, concatenated along its row (0 at padding). Computed here rather than in
  the collator because they need the model's config (and the collator runs in workers);
- ``forward(**inputs, labels=None)``: with labels, the mean next-token loss over the
  supervised tokens through the patch's fused LM-head loss (no [tokens x vocab] logits);
  without, the model's output;
- ``final_hidden(**inputs)`` and ``output_head()``: the hidden states before the LM head
  and the head, for losses the trainer computes itself;
- ``parameter_groups()``: ``connector`` / ``llm`` / ``vision``, and ``GROUP_PATTERNS``,
  the same partition as regexes over this module's parameter names (``group_patterns``:
  what the optimizer and the dry run read; they hold for LoRA layers added later);
- ``language_model`` / ``vision_tower``: the decoder and the vision tower (what a stage
  adapts), ``fsdp_units()``: their layers;
- ``save_pretrained(path)``: the family's own format; ``checkpoint_files()``: the text
  files beside a checkpoint's weights (the transformers config, the LoRA setup).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import re
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from fastvlm.integrations import hf_attention
from fastvlm.integrations.hf_blank_image import blank_image_in_embeddings
from fastvlm.integrations.hf_load import load_patched
from fastvlm.integrations.transformers import _layout_for, family_of, unwrap
from fastvlm.models.feature_cache import FeatureCache
from fastvlm.nn.lora import LoRALinear

VISION_TOWERS = ("vision_tower", "visual", "vision_model")  # the inner model's vision child, per family
CONNECTOR_IN_TOWER = "merger"  # Qwen-VL keeps its projectors (merger, deepstack mergers) in the vision tower
PIXEL_INPUTS = ("pixel_values", "pixel_values_videos")  # what makes the forward run the tower
BOOKKEEPING = ("labels", "image_files", "ids", "num_samples", "real_tokens", "row_tokens", "supervised_tokens",
               "overflow_rows", "sample_images")


class HFVLM(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        hf = unwrap(model)
        family_of(hf)  # an unsupported class is refused here, naming the supported ones
        if "_fastvlm_patch" not in hf.__dict__:
            raise ValueError("model: not patched by fastvlm; call fastvlm.integrations.transformers.patch(model)")
        self.model = model
        params = inspect.signature(hf.forward).parameters  # the patched forward's: with segment_ids
        self.input_names = {n for n, p in params.items() if p.kind != p.VAR_KEYWORD} - set(BOOKKEEPING)
        self.rope_index = getattr(hf.model, "get_rope_index", None)
        prefix = next(n for n, m in self.named_modules() if m is hf)
        self.GROUP_PATTERNS = group_patterns(hf, prefix + ".")

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, **patch_options) -> HFVLM:
        return cls(load_patched(Path(path), dtype, **patch_options))

    @property
    def hf(self) -> nn.Module:
        """The transformers model (inside any PEFT / compile wrapper)."""
        return unwrap(self.model)

    # ---- inputs ----------------------------------------------------------------------------
    def batch_inputs(self, batch: dict, device, cache: FeatureCache | None = None) -> dict:
        """The forward's keyword arguments (with ``labels``) on `device`. `cache`: a feature
        cache is fastvlm.VLM's; a Hugging Face tower always encodes its pixels."""
        if cache is not None:
            raise ValueError("cache: a Hugging Face VLM encodes its images itself (no feature cache)")
        inputs = {k: v for k, v in batch.items() if k in self.input_names and v is not None}
        inputs["segment_ids"] = batch["segment_ids"]
        if self.rope_index is not None:
            inputs["position_ids"] = self.rope_positions(batch)
        inputs["labels"] = batch["labels"]
        return {k: v.to(device) for k, v in inputs.items()}

    def rope_positions(self, batch: dict) -> torch.Tensor:
        """[3, B, N]: each sample's multimodal RoPE positions from the model's get_rope_index,
        run on that sample alone (its tokens and its images' grids), 0 at padding."""
        ids, seg = batch["input_ids"], batch["segment_ids"]
        mm = batch.get("mm_token_type_ids")
        if mm is None:
            raise ValueError("batch: mm_token_type_ids missing; the model's get_rope_index needs it (the "
                             "processor's per-token output)")
        grids = {k: batch[k] for k in ("image_grid_thw", "video_grid_thw") if batch.get(k) is not None}
        per_sample = batch["sample_images"].tolist()
        take = inspect.signature(self.rope_index).parameters
        out = torch.zeros(3, *ids.shape, dtype=torch.long, device=ids.device)
        image, sample = 0, 0
        for r in range(ids.shape[0]):
            for s in range(int(seg[r].max()) + 1):
                cols = (seg[r] == s).nonzero().squeeze(1)
                a, b = int(cols[0]), int(cols[-1]) + 1
                n = per_sample[sample]
                kwargs = {"input_ids": ids[r:r + 1, a:b], "mm_token_type_ids": mm[r:r + 1, a:b]}
                if n and "image_grid_thw" in grids:
                    kwargs["image_grid_thw"] = grids["image_grid_thw"][image:image + n]
                pos, _ = self.rope_index(**{k: v for k, v in kwargs.items() if k in take})
                out[:, r, a:b] = pos[:, 0].to(out.device)
                image, sample = image + n, sample + 1
        return out

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, labels: torch.Tensor | None = None, **inputs):
        """With labels: the mean next-token cross-entropy over supervised tokens (fused with
        the LM head). Without: the model's output (logits)."""
        blank = (labels is not None and self.training and not any(k in inputs for k in PIXEL_INPUTS)
                 and tower_sharded(self.vision_tower))
        with blank_image_in_embeddings(self.hf) if blank else contextlib.nullcontext():
            out = self.model(**inputs, labels=labels)
        return out.loss if labels is not None else out

    def final_hidden(self, **inputs) -> torch.Tensor:
        """[B, N, H]: the decoder's last hidden states (after its final norm), which the
        output head maps to logits."""
        hf = self.hf
        segment_ids = inputs.pop("segment_ids", None)
        inputs[hf_attention.LAYOUT_KWARG] = _layout_for(hf, family_of(hf), inputs, segment_ids)
        return hf.model(**inputs, return_dict=True).last_hidden_state

    def output_head(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    # ---- parameters and export -------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"connector", "llm", "vision"}: the projector (with Qwen's merger, LLaVA-NeXT's
        image_newline), the language model with its head and embeddings, the vision tower.
        Each parameter in exactly one group (tied weights once)."""
        inner = self.hf.model
        decoder = self.hf.get_decoder()
        tower_name = next((n for n in VISION_TOWERS if hasattr(inner, n)), None)
        if tower_name is None:
            raise ValueError(f"model: {type(inner).__name__} has none of {VISION_TOWERS} (its vision tower)")
        tower = getattr(inner, tower_name)
        in_tower = {id(p) for n, p in tower.named_parameters()
                    if any(CONNECTOR_IN_TOWER in part for part in n.split("."))}  # Qwen3-VL: deepstack_merger_list
        groups = {"connector": [], "llm": [], "vision": []}
        seen = set()

        def add(group, params):
            for p in params:
                if id(p) not in seen:
                    seen.add(id(p))
                    groups[group].append(p)

        add("llm", decoder.parameters())
        add("llm", self.hf.get_output_embeddings().parameters())
        add("connector", (p for p in tower.parameters() if id(p) in in_tower))
        add("vision", tower.parameters())
        add("connector", self.model.parameters())  # the rest: projectors, image_newline
        return groups

    @property
    def language_model(self) -> nn.Module:
        """The decoder (what LoRA / QLoRA / full fine-tuning of the LLM adapt)."""
        return self.hf.get_decoder()

    @property
    def vision_tower(self) -> nn.Module:
        inner = self.hf.model
        tower_name = next((n for n in VISION_TOWERS if hasattr(inner, n)), None)
        if tower_name is None:
            raise ValueError(f"model: {type(inner).__name__} has none of {VISION_TOWERS} (its vision tower)")
        return getattr(inner, tower_name)

    def fsdp_units(self) -> list[nn.Module]:
        """Every decoder layer and vision block (the longest ModuleList of each tower)."""
        return list(layer_list(self.language_model)[1]) + list(layer_list(self.vision_tower)[1])

    def checkpoint_files(self) -> dict[str, str]:
        """config.json (the transformers config) and lora.json (the LoRA setup of the decoder
        and the tower, and whether the decoder's base is NF4) beside a checkpoint's weights."""
        lora = {}
        for part, module in (("llm", self.language_model), ("vision", self.vision_tower)):
            cfg = getattr(module, "lora_config", None)
            lora[part] = None if cfg is None else dataclasses.asdict(cfg)
        lora["llm_nf4"] = any(isinstance(m, LoRALinear) and m.quantized for m in self.language_model.modules())
        return {"config.json": self.hf.config.to_json_string(), "lora.json": json.dumps(lora)}

    def save_pretrained(self, path, **kwargs) -> None:
        self.model.save_pretrained(path, **kwargs)


def tower_sharded(tower: nn.Module) -> bool:
    """Whether the tower's layers are FSDP-sharded: then a training micro-batch without
    images runs a blank one (hf_blank_image), or its rank would skip the gathers that
    other ranks' micro-batches with images run (a hang)."""
    return isinstance(layer_list(tower)[1][0], FSDPModule)


def layer_list(tower: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, modules) of the tower's longest ModuleList: its transformer layers."""
    lists = [(n, m) for n, m in tower.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"model: {type(tower).__name__} holds no list of layers")
    return max(lists, key=lambda item: len(item[1]))


def group_patterns(hf: nn.Module, prefix: str = "") -> dict[str, str]:
    """parameter_groups' partition of a transformers VLM `hf` as regexes over parameter
    names under `prefix` (first match wins): ``connector`` (a merger inside the vision tower,
    and whatever is neither tower nor head: the projector, image_newline), ``vision`` (the
    tower), ``llm`` (the decoder and the output head)."""
    names = {id(m): n for n, m in hf.named_modules()}
    inner = hf.model
    tower_name = next((n for n in VISION_TOWERS if hasattr(inner, n)), None)
    if tower_name is None:
        raise ValueError(f"model: {type(inner).__name__} has none of {VISION_TOWERS} (its vision tower)")
    tower = re.escape(prefix + names[id(getattr(inner, tower_name))])
    llm = "|".join(re.escape(prefix + names[id(m)]) for m in (hf.get_decoder(), hf.get_output_embeddings()))
    merger = rf"{tower}\.(.*\.)?[^.]*{CONNECTOR_IN_TOWER}[^.]*\..*"
    return {"connector": rf"{merger}|(?!{tower}\.|({llm})\.).*", "vision": rf"{tower}\..*", "llm": rf"({llm})\..*"}
