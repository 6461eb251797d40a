"""A patched transformers VLM behind the trainer's model seam (what ``fastvlm.VLM`` offers).

``HFVLM`` wraps a model patched by ``fastvlm.integrations.transformers.patch`` (or a
PeftModel around one) and takes the batches of ``fastvlm.data.hf_collate``:

- ``batch_inputs(batch)``: the forward's keyword arguments from a collated batch: the
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
- ``parameter_groups()``: ``connector`` / ``llm`` / ``vision``;
- ``save_pretrained(path)``: the family's own format.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
import transformers
from torch import nn

from fastvlm.integrations import hf_attention
from fastvlm.integrations.transformers import FAMILIES, _layout_for, family_of, patch, unwrap

VISION_TOWERS = ("vision_tower", "visual", "vision_model")  # the inner model's vision child, per family
CONNECTOR_IN_TOWER = "merger"  # Qwen-VL keeps its projectors (merger, deepstack mergers) in the vision tower
BOOKKEEPING = ("labels", "image_files", "ids", "num_samples", "real_tokens", "row_tokens", "supervised_tokens",
               "overflow_rows", "sample_images")


def _load_patched(path, dtype: torch.dtype, **patch_options) -> nn.Module:
    """The model of a transformers checkpoint directory, by the class its config names,
    patched. (To be replaced by integrations.transformers.load_patched.)"""
    config = transformers.AutoConfig.from_pretrained(path)
    names = [n for n in (config.architectures or []) if n in FAMILIES]
    if not names:
        raise ValueError(f"model.path: {path} holds a {config.architectures} model; fastvlm trains "
                         f"{', '.join(FAMILIES)}")
    model = getattr(transformers, names[0]).from_pretrained(path, dtype=dtype)
    return patch(model, **patch_options)


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

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, **patch_options) -> HFVLM:
        return cls(_load_patched(Path(path), dtype, **patch_options))

    @property
    def hf(self) -> nn.Module:
        """The transformers model (inside any PEFT / compile wrapper)."""
        return unwrap(self.model)

    # ---- inputs ----------------------------------------------------------------------------
    def batch_inputs(self, batch: dict) -> dict:
        inputs = {k: v for k, v in batch.items() if k in self.input_names and v is not None}
        inputs["segment_ids"] = batch["segment_ids"]
        if self.rope_index is not None:
            inputs["position_ids"] = self.rope_positions(batch)
        return inputs

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

    def save_pretrained(self, path, **kwargs) -> None:
        self.model.save_pretrained(path, **kwargs)
