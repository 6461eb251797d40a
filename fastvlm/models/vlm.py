"""The VLM: vision encoder -> connector -> decoder LLM, LLaVA style.

``VLM.forward(input_ids, images, labels)`` encodes the images, projects their
features to the LLM's width, splices them into the token embeddings at the
image placeholders (fastvlm.models.splice), builds the attention layout of the
batch from its token metadata (segments, image runs) and runs the LLM with the
fused LM-head loss. Hugging Face LLaVA checkpoints (``LlavaForConditionalGeneration``,
old and new key layouts) load with ``VLM.from_pretrained``; ``save_pretrained``
writes fastvlm's own directory format, which from_pretrained also reads.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastvlm.models import llava_names
from fastvlm.models.hf_vision import config_from_hf, convert_state_dict
from fastvlm.models.llm import (
    LLM,
    LLMConfig,
    check_labels,
    check_positions,
    check_token_ids,
    load_state_dict,
    positions_of,
)
from fastvlm.models.splice import splice_image_features
from fastvlm.models.vision import VisionConfig, VisionEncoder
from fastvlm.nn.connector import FusedMLPConnector
from fastvlm.nn.lora import LoRALinear
from fastvlm.ops import KINDS, AttentionLayout
from fastvlm.ops.activations import FUSED_ACTIVATIONS, activation_from_hf
from fastvlm.utils.config import check_known_keys, check_required_keys, require
from fastvlm.utils.io import atomic_write, read_json

VISION_FEATURES = ("patch", "full")  # LLaVA's "default" drops the class (and register) tokens
FORMAT = "fastvlm_vlm"


@dataclass
class VLMConfig:
    vision: VisionConfig
    llm: LLMConfig
    image_token_id: int
    select_layer: int | list[int] = -2  # hidden-state index(es) of the encoder; several are concatenated
    vision_feature: str = "patch"
    projector_act: str = "gelu"
    projector_bias: bool = True
    attention_kind: str = "causal"  # causal | image_bidirectional | mmca | prefix_lm
    split_softmax: bool = False

    def __post_init__(self):
        layers = [self.select_layer] if isinstance(self.select_layer, int) else self.select_layer
        if not isinstance(layers, (list, tuple)) or not layers or \
                not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ValueError(f"select_layer: expected an int or a non-empty list of ints, got {self.select_layer!r}")
        if self.vision_feature not in VISION_FEATURES:
            raise ValueError(f"vision_feature: expected one of {VISION_FEATURES}, got {self.vision_feature!r}")
        if self.attention_kind not in KINDS:
            raise ValueError(f"attention_kind: unknown layout kind {self.attention_kind!r}; expected one of "
                             f"{', '.join(KINDS)}")
        if isinstance(self.image_token_id, bool) or not isinstance(self.image_token_id, int) \
                or self.image_token_id < 0:
            raise ValueError(f"image_token_id: expected a token id >= 0, got {self.image_token_id}")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["vision"], d["llm"] = self.vision.to_dict(), dataclasses.asdict(self.llm)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VLMConfig":
        check_known_keys(cls, d, 'config')
        check_required_keys(cls, d, 'config')
        d = dict(d)
        d["vision"] = VisionConfig.from_dict(d["vision"])
        d["llm"] = LLMConfig.from_dict(d["llm"])
        return cls(**d)


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.config = cfg
        self.vision_tower = VisionEncoder(cfg.vision)
        self.multi_modal_projector = FusedMLPConnector(cfg.vision.hidden_size * len(self.select_layers),
                                                       cfg.llm.hidden_size,
                                                       cfg.llm.hidden_size, activation=cfg.projector_act,
                                                       bias=cfg.projector_bias)
        self.language_model = LLM(cfg.llm)

    # ---- pieces ------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[num_images, C, H, W] -> projected features [num_images, T, llm hidden]."""
        feats = self.vision_tower(images, select_layers=self.select_layers)
        if self.config.vision_feature == "patch":
            feats = [f[:, self.config.vision.num_prefix_tokens:] for f in feats]
        feats = feats[0] if len(feats) == 1 else torch.cat(feats, -1)  # transformers' order: layer-major
        # not projector[0].weight: under LoRA or PEFT's ModulesToSaveWrapper the layer is wrapped
        return self.multi_modal_projector(feats.to(next(self.multi_modal_projector.parameters()).dtype))

    @property
    def select_layers(self) -> list[int]:
        sel = self.config.select_layer
        return [sel] if isinstance(sel, int) else list(sel)

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        image_id = self.config.image_token_id
        is_image = input_ids == image_id
        # The placeholder id may lie outside the vocabulary; its rows are overwritten anyway.
        embeds = self.language_model.model.embed_tokens(input_ids.masked_fill(is_image, 0))
        if images is None:
            if bool(is_image.any()):
                raise ValueError(f"images: input_ids hold image tokens (id {image_id}) but no images were given")
            return embeds
        return splice_image_features(embeds, input_ids, image_id, self.encode_images(images))

    def tokens_per_image(self, images: torch.Tensor | None = None) -> int:
        """Feature vectors per image (of `images`' resolution; default the config's)."""
        v = self.config.vision
        h, w = images.shape[-2:] if images is not None else (v.image_size, v.image_size)
        prefix = v.num_prefix_tokens if self.config.vision_feature == "full" else 0
        return (h // v.patch_size) * (w // v.patch_size) + prefix

    def layout(self, input_ids, attention_mask=None, segment_ids=None, prefix_mask=None,
               images: torch.Tensor | None = None) -> AttentionLayout:
        """The batch's attention layout: a run of image tokens holds one image per
        tokens_per_image tokens (two images written back to back are two images)."""
        return AttentionLayout.from_input_ids(input_ids, self.config.image_token_id,
                                              attention_mask=attention_mask, segment_ids=segment_ids,
                                              prefix_mask=prefix_mask, kind=self.config.attention_kind,
                                              split_softmax=self.config.split_softmax,
                                              tokens_per_image=self.tokens_per_image(images))

    # ---- training / inference ------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, images: torch.Tensor | None = None, labels=None, *,
                attention_mask=None, segment_ids=None, prefix_mask=None):
        """Logits [B, N, V], or the mean next-token loss when labels are given
        (image tokens and label -100 are never targets)."""
        self._check_input_ids(input_ids)
        layout = self.layout(input_ids, attention_mask, segment_ids, prefix_mask, images)
        check_positions(self.config.llm, input_ids.shape[1], "input_ids", positions_of(layout),  # before encoding
                        layout.segment_ids >= 0)
        embeds = self.embed(input_ids, images)
        if labels is not None:
            check_labels(labels, tuple(input_ids.shape), None)  # the LLM checks the ids, placeholders masked
            labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)
        return self.language_model(inputs_embeds=embeds, layout=layout, labels=labels)

    def _check_input_ids(self, input_ids) -> None:
        # the placeholder id may lie outside the vocabulary: its rows are overwritten
        check_token_ids(input_ids, self.config.llm.vocab_size, "input_ids", ignore=self.config.image_token_id)

    @torch.no_grad()
    def generate(self, input_ids, images=None, *, attention_mask=None, prefix_mask=None,
                 **kwargs) -> torch.Tensor:
        """New tokens [B, max_new_tokens]; the prompt is prefilled with the multimodal
        layout (prefix_mask: the prompt's bidirectional prefix under prefix_lm), then
        decoded with the KV cache (see LLM.generate for the options)."""
        self._check_input_ids(input_ids)
        layout = self.layout(input_ids, attention_mask, prefix_mask=prefix_mask, images=images)
        return self.language_model.generate(inputs_embeds=self.embed(input_ids, images),
                                            attention_mask=layout.segment_ids >= 0, layout=layout, **kwargs)

    # ---- checkpoints ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, *, dtype: torch.dtype | None = None) -> "VLM":
        """A Hugging Face LLaVA directory, or one written by save_pretrained."""
        path = Path(path)
        raw = read_json(path / "config.json")
        if raw.get("model_type") == FORMAT:
            model = cls(VLMConfig.from_dict(raw["config"]))
            state = load_state_dict(path)
            if model.config.llm.tie_word_embeddings:
                state.setdefault("language_model.lm_head.weight",
                                 state.get("language_model.model.embed_tokens.weight"))
        elif raw.get("model_type") == "llava":
            model, state = _from_hf_llava(raw, load_state_dict(path))
        else:
            raise ValueError(f"path: {path}/config.json has model_type {raw.get('model_type')!r}; expected "
                             f"'llava' or {FORMAT!r}")
        _load_exact(model, state, path)
        return model.to(dtype) if dtype is not None else model

    def save_pretrained(self, path) -> None:
        """config.json + model.safetensors, each written to a temp file and renamed
        into place, so an interrupted save never leaves a half-written file."""
        from safetensors.torch import save_model

        adapters = [n for n, m in self.named_modules() if isinstance(m, LoRALinear)]
        if adapters:  # their base_layer / lora_* keys are not this format's; from_pretrained would refuse them
            raise ValueError(f"model: has LoRA layers ({adapters[0]}, ...): call fastvlm.train.lora.merge_and_unload"
                             "(model) first to save a plain model, or save_adapter(model, dir) for the adapter")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name, write in (("model.safetensors", lambda f: save_model(self, f)),
                            ("config.json", lambda f: Path(f).write_text(json.dumps(
                                {"model_type": FORMAT, "config": self.config.to_dict()}, indent=2)))):
            atomic_write(path / name, write)


def _from_hf_llava(raw: dict, hf_state: dict) -> tuple[VLM, dict]:
    """Config and renamed weights of a transformers LLaVA checkpoint (the 4.x layout
    `vision_tower.* / multi_modal_projector.* / language_model.model.*` and the
    newer `model.vision_tower.* / model.language_model.* / lm_head.*`)."""
    require(raw, ("vision_config", "text_config"))
    strategy = raw.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"config.json: vision_feature_select_strategy {strategy!r}; expected 'default' or 'full'")
    layer = raw.get("vision_feature_layer", -2)
    vision = config_from_hf(raw["vision_config"])
    if strategy == "default" and vision.num_prefix_tokens != 1:  # transformers drops exactly one token
        raise ValueError(f"config.json: vision_feature_select_strategy 'default' drops the first token, which "
                         f"a {vision.family} tower with {vision.num_prefix_tokens} class/register tokens "
                         "does not hold alone; not supported (use 'full')")
    text = dict(raw["text_config"])
    # transformers ties the LM head if either the LLaVA config or its text config says so
    text["tie_word_embeddings"] = bool(raw.get("tie_word_embeddings")) or bool(text.get("tie_word_embeddings"))
    llm = LLMConfig.from_hf(text)
    act = activation_from_hf(raw.get("projector_hidden_act", "gelu"), "projector_hidden_act", FUSED_ACTIVATIONS)
    image_id = raw.get("image_token_id", raw.get("image_token_index"))
    if not isinstance(image_id, int) or isinstance(image_id, bool):
        raise ValueError(f"config.json: image_token_index (or image_token_id) must be the image placeholder's "
                         f"token id, got {image_id!r}")
    cfg = VLMConfig(vision=vision, llm=llm, image_token_id=image_id, select_layer=layer,
                    vision_feature="patch" if strategy == "default" else "full", projector_act=act,
                    projector_bias=raw.get("multimodal_projector_bias", True))
    model = VLM(cfg)
    vision_hf, state = {}, {}
    for key, tensor in hf_state.items():
        part, rest = llava_names.split_hf_name(key)
        if part == "vision":  # renamed (and reshaped) by the vision tower's own conversion
            vision_hf[rest] = tensor
            continue
        try:
            state[llava_names.from_hf(key, vision)] = tensor
        except KeyError:
            state[key] = tensor  # reported as unexpected by _load_exact
    converted, unexpected = convert_state_dict(vision_hf, vision)
    state.update({f"vision_tower.{k}": v for k, v in converted.items()})
    state.update({f"vision_tower.{k}": vision_hf[k] for k in unexpected})  # reported by _load_exact
    if llm.tie_word_embeddings:
        state.setdefault("language_model.lm_head.weight", state.get("language_model.model.embed_tokens.weight"))
    return model, state


def _load_exact(model: nn.Module, state: dict, path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}"
              for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"path: checkpoint {path} does not match the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}, shape mismatches {shapes[:4]}")
    model.load_state_dict(state)
