"""The VLM: vision encoder -> connector -> decoder LLM, LLaVA style.

``VLM.forward(input_ids, images, labels)`` encodes the images, projects their
features to the LLM's width, splices them into the token embeddings at the
image placeholders (fastvlm.models.splice), builds the attention layout of the
batch from its token metadata (segments, image runs) and runs the LLM with the
fused LM-head loss. It is the first model the trainer trains through its seam
(fastvlm.train.losses.TrainableModel): ``batch_inputs`` reads a collated batch,
``GROUP_PATTERNS`` names its parameter groups, ``fsdp_units`` its sharding units,
``text_loss`` and ``contrastive_loss`` serve the lm and contrastive stages.
Hugging Face LLaVA checkpoints (``LlavaForConditionalGeneration``,
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
from fastvlm.models.feature_cache import FeatureCache
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
from fastvlm.nn.connector import FusedMLPConnector, MultiLevelConnector, ResamplerConnector
from fastvlm.nn.contrastive import ContrastiveHeads, text_states
from fastvlm.nn.lora import LoRALinear
from fastvlm.ops import KINDS, AttentionLayout
from fastvlm.ops.activations import FUSED_ACTIVATIONS, activation_from_hf
from fastvlm.ops.linear_logprob import linear_logprob
from fastvlm.utils.config import check_known_keys, check_required_keys, require
from fastvlm.utils.io import atomic_write, read_json

VISION_FEATURES = ("patch", "full")  # LLaVA's "default" drops the class (and register) tokens
CONNECTORS = ("mlp", "multilevel", "resampler")
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
    connector: str = "mlp"          # mlp (LLaVA mlp2x_gelu) | multilevel | resampler
    select_layers: list | None = None  # multilevel: several encoder hidden states (default [select_layer])
    multilevel_mode: str = "concat"    # multilevel: concat (HF LLaVA's list of layers) | sum (COMM)
    token_reduction: str | None = None  # mlp / multilevel: pixel_shuffle | avg_pool (2x2, 4x fewer tokens)
    resampler_queries: int = 64

    def __post_init__(self):
        if not isinstance(self.select_layer, int) or isinstance(self.select_layer, bool):
            raise ValueError(f"select_layer: expected an int (several layers: select_layers), "
                             f"got {self.select_layer!r}")
        if self.select_layers is not None and (
                not isinstance(self.select_layers, (list, tuple)) or not self.select_layers
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.select_layers)):
            raise ValueError(f"select_layers: expected a non-empty list of ints, got {self.select_layers!r}")
        if self.connector not in CONNECTORS:
            raise ValueError(f"connector: expected one of {CONNECTORS}, got {self.connector!r}")
        if self.token_reduction is not None and self.connector == "resampler":
            raise ValueError("token_reduction: the resampler already fixes the token count; use mlp or multilevel")
        if self.select_layers is not None and self.connector != "multilevel" and len(self.select_layers) != 1:
            raise ValueError(f"select_layers: several layers {self.select_layers} need connector='multilevel'")
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
    # Parameter groups by name (the optimizer's per-group learning rates); first match wins.
    GROUP_PATTERNS = {
        "heads": r"contrastive_heads\..*",
        "connector": r"multi_modal_projector\..*",
        "vision": r"vision_tower\..*",
        "llm": r"language_model\..*",
    }

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.config = cfg
        self.vision_tower = VisionEncoder(cfg.vision)
        self.multi_modal_projector = build_connector(cfg)
        self.language_model = LLM(cfg.llm)

    @classmethod
    def from_parts(cls, vision, llm, *, image_token_id: int, **options) -> "VLM":
        """LLaVA stage 1's starting point: a vision tower and an LLM, each a local Hugging
        Face directory (CLIP / SigLIP / DINOv2; Llama / Qwen2 / Mistral) or a config, joined
        by a fresh connector; `options` are VLMConfig fields (connector, select_layer, ...)."""
        tower = VisionEncoder.from_pretrained(vision) if isinstance(vision, (str, Path)) else VisionEncoder(vision)
        lm = LLM.from_pretrained(llm) if isinstance(llm, (str, Path)) else LLM(llm)
        model = cls(VLMConfig(vision=tower.config, llm=lm.config, image_token_id=image_token_id, **options))
        model.vision_tower, model.language_model = tower, lm
        return model

    @property
    def feature_layers(self) -> list[int]:
        """The encoder hidden states the connector reads."""
        return list(self.config.select_layers or [self.config.select_layer])

    @property
    def image_tokens(self) -> int:
        """LLM tokens per image at the config's resolution (each expanded placeholder run's length)."""
        return self.tokens_per_image()

    # ---- pieces ------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor | None = None, image_features=None) -> torch.Tensor:
        """[num_images, C, H, W] -> projected features [num_images, T, llm hidden]; or, instead
        of pixels, the encoder's hidden states at `feature_layers` (one [num_images, T, C] per
        layer, e.g. from a FeatureCache)."""
        feats = (self.vision_tower(images, select_layers=self.feature_layers)
                 if image_features is None else list(image_features))
        if self.config.vision_feature == "patch":
            feats = [f[:, self.config.vision.num_prefix_tokens:] for f in feats]
        dtype = next(self.multi_modal_projector.parameters()).dtype
        feats = [f.to(dtype) for f in feats]
        return self.multi_modal_projector(feats if self.config.connector == "multilevel" else feats[0])

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None, image_features=None) -> torch.Tensor:
        image_id = self.config.image_token_id
        is_image = input_ids == image_id
        # The placeholder id may lie outside the vocabulary; its rows are overwritten anyway.
        embeds = self.language_model.model.embed_tokens(input_ids.masked_fill(is_image, 0))
        if images is None and (image_features is None or len(image_features) == 0):
            if bool(is_image.any()):
                raise ValueError(f"images: input_ids hold image tokens (id {image_id}) but no images were given")
            if self.training and torch.is_grad_enabled():
                return embeds + self.blank_image_term(from_features=image_features is not None)
            return embeds
        return splice_image_features(embeds, input_ids, image_id, self.encode_images(images, image_features))

    def blank_image_term(self, from_features: bool = False) -> torch.Tensor:
        """Exactly 0, computed from one blank image: by the tower and the connector (pixels), or
        by the connector alone on blank encoder features (`from_features`: the batches with
        images bring their features from a feature cache). A training batch without images
        adds it to its embeddings, so that it runs the modules a batch with images runs and
        gives their parameters gradients (zeros) too: the ranks of a distributed job then
        run the same collectives whatever their micro-batches hold (FSDP gathers each
        block's weights as it runs; DDP and FSDP reduce the same set of gradients), and the
        gradient is the one-process gradient. LLaVA feeds its text-only samples a blank
        image for the same reason."""
        v = self.config.vision
        if from_features:
            device = next(self.multi_modal_projector.parameters()).device
            blank = [torch.zeros(1, v.grid_size ** 2 + v.num_prefix_tokens, v.hidden_size, device=device)
                     for _ in self.feature_layers]
            projected = self.encode_images(image_features=blank)
        else:
            projected = self.encode_images(torch.zeros(1, v.num_channels, v.image_size, v.image_size,
                                                       device=self.vision_tower.patch_embed.weight.device))
        # Blank pixels give finite features, and 0 times a finite sum is exactly 0; its
        # gradients (0 times finite activations) are zeros, which leave every sum they join exact.
        return projected.sum() * 0

    def tokens_per_image(self, images: torch.Tensor | None = None) -> int:
        """LLM tokens per image (of `images`' resolution; default the config's): what the
        connector makes of the encoder's patches (a resampler's fixed budget, 4x fewer
        under token reduction)."""
        if self.config.connector == "resampler":
            return self.config.resampler_queries
        v = self.config.vision
        h, w = images.shape[-2:] if images is not None else (v.image_size, v.image_size)
        prefix = v.num_prefix_tokens if self.config.vision_feature == "full" else 0
        tokens = (h // v.patch_size) * (w // v.patch_size) + prefix
        return tokens // 4 if self.config.token_reduction else tokens

    def layout(self, input_ids, attention_mask=None, segment_ids=None, prefix_mask=None,
               images: torch.Tensor | None = None, branch_ids=None) -> AttentionLayout:
        """The batch's attention layout: a run of image tokens holds one image per
        tokens_per_image tokens (two images written back to back are two images);
        branch_ids: a shared prompt (with its images) and its answers (AttentionLayout)."""
        return AttentionLayout.from_input_ids(input_ids, self.config.image_token_id,
                                              attention_mask=attention_mask, segment_ids=segment_ids,
                                              prefix_mask=prefix_mask, kind=self.config.attention_kind,
                                              split_softmax=self.config.split_softmax,
                                              tokens_per_image=self.tokens_per_image(images),
                                              branch_ids=branch_ids)

    # ---- the trainer's seam (fastvlm.train.losses.TrainableModel) ------------------------
    def batch_inputs(self, batch: dict, device, cache: FeatureCache | None = None) -> dict:
        """forward's keyword arguments from a collated batch (fastvlm.data.collate), on
        `device`: its token metadata, and its images as pixels or, with a `cache` of this
        model's frozen tower, as their cached encoder features (keyed by the content keys
        the batch carries; the misses are encoded from the batch's pixels). A batch without
        images passes no features (``[]``: see blank_image_term)."""
        inputs = {k: batch[k].to(device) for k in ("input_ids", "labels", "segment_ids", "prefix_mask")
                  if batch.get(k) is not None}
        images = batch.get("images")
        if cache is None:
            return {**inputs, "images": images.to(device) if images is not None else None}
        keys = batch["image_keys"]
        first = {key: i for i, key in reversed(list(enumerate(keys)))}
        features = cache.features(keys, lambda missing: images[[first[k] for k in missing]]) if keys else []
        return {**inputs, "image_features": features}

    def fsdp_units(self) -> list[nn.Module]:
        """Modules FSDP shards as units of their own: every decoder and vision encoder block.
        The rest (embeddings, norms, connector, heads) is the root's unit, gathered for the
        whole micro-batch (the contrastive loss embeds captions with the LLM's token table
        alone). Blocks, not the tower: a wrapped transformers tower breaks its hidden-state
        capture (it looks modules up by class name)."""
        return list(self.language_model.model.layers) + list(self.vision_tower.blocks)

    def text_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, segment_ids=None, **_) -> torch.Tensor:
        """The LLM alone on text (an ``lm`` stage: images and the tower play no part)."""
        return self.language_model(input_ids, segment_ids=segment_ids, labels=labels)

    def add_contrastive_heads(self, embed_dim: int, kind: str = "sigmoid", image_pool: str = "mean") -> None:
        """Pooling + projections of both towers for a contrastive stage (``contrastive_heads``)."""
        self.contrastive_heads = ContrastiveHeads(self.config.vision.hidden_size, self.config.llm.hidden_size,
                                                  embed_dim, kind, image_pool)

    def contrastive_loss(self, images: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor, *,
                         text_source: str = "embeddings", chunk: int = 1024) -> torch.Tensor:
        """CLIP / SigLIP loss of (image, caption) pairs through ``contrastive_heads``: the towers
        under the caller's autocast; pooling, projections and the B x B loss in fp32 (in bf16
        the loss itself would be rounded to 3 significant digits)."""
        heads = getattr(self, "contrastive_heads", None)
        if heads is None:
            raise ValueError("contrastive_heads: none; add them first (add_contrastive_heads)")
        (vision_hidden,) = self.vision_tower(images, select_layers=[-1])
        text = text_states(self.language_model, input_ids, text_mask, text_source)
        with torch.autocast(images.device.type, enabled=False):
            image_emb = heads.image_embedding(vision_hidden.float(), self.vision_tower.config.num_prefix_tokens)
            text_emb = heads.text_embedding(text.float(), text_mask)
            return heads.loss(image_emb, text_emb, chunk)

    # ---- training / inference ------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, images: torch.Tensor | None = None, labels=None, *,
                attention_mask=None, segment_ids=None, prefix_mask=None, image_features=None, branch_ids=None):
        """Logits [B, N, V], or the mean next-token loss when labels are given
        (image tokens and label -100 are never targets). `image_features` replaces
        `images` by precomputed encoder hidden states (see encode_images); `[]` says a batch
        without images is one of a run whose images come as features. A training batch
        without images runs the tower and connector (the connector alone with
        `image_features=[]`) on a blank image whose contribution is exactly 0
        (blank_image_term), so every rank of a distributed job runs the same modules.
        `branch_ids`: a shared prompt and its answers in one row (see AttentionLayout)."""
        self._check_input_ids(input_ids)
        layout = self.layout(input_ids, attention_mask, segment_ids, prefix_mask, images, branch_ids)
        check_positions(self.config.llm, input_ids.shape[1], "input_ids", positions_of(layout),  # before encoding
                        layout.segment_ids >= 0)
        embeds = self.embed(input_ids, images, image_features)
        if labels is not None:
            check_labels(labels, tuple(input_ids.shape), None)  # the LLM checks the ids, placeholders masked
            labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)
        return self.language_model(inputs_embeds=embeds, layout=layout, labels=labels)

    def answer_logprobs(self, input_ids: torch.Tensor, targets: torch.Tensor, sequence_ids: torch.Tensor,
                        num_sequences: int, branch_ids: torch.Tensor, images: torch.Tensor | None = None, *,
                        segment_ids=None, prefix_mask=None, image_features=None,
                        **_) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp [S], token_count [S]): each answer's summed token log-probabilities and its
        token count, from one forward of shared-prompt rows (fastvlm.data.preference: the
        prompt and its images once, every answer attending to it and to itself; `targets`
        the next token's label within a branch, `sequence_ids` the answer each token's
        target belongs to) through the fused linear log-prob (no [tokens x vocab] logits).
        Padding is dropped before the first layer, as in forward."""
        self._check_input_ids(input_ids)
        layout = self.layout(input_ids, None, segment_ids, prefix_mask, images, branch_ids)
        positions = positions_of(layout)
        check_positions(self.config.llm, input_ids.shape[1], "input_ids", positions, layout.segment_ids >= 0)
        embeds = self.embed(input_ids, images, image_features)
        if 0 < int((layout.segment_ids >= 0).sum()) < layout.segment_ids.numel():
            layout, index = layout.unpadded()
            embeds = embeds.flatten(0, 1)[index][None]
            positions, targets, sequence_ids = (t.expand(input_ids.shape).flatten()[index][None]
                                                for t in (positions, targets, sequence_ids))
        hidden = self.language_model.hidden_states(inputs_embeds=embeds, layout=layout, position_ids=positions)
        return linear_logprob(hidden, self.language_model.lm_head, targets, sequence_ids, num_sequences)

    def _check_input_ids(self, input_ids) -> None:
        # the placeholder id may lie outside the vocabulary: its rows are overwritten
        check_token_ids(input_ids, self.config.llm.vocab_size, "input_ids", ignore=self.config.image_token_id)

    @torch.no_grad()
    def generate(self, input_ids, images=None, *, attention_mask=None, prefix_mask=None,
                 **kwargs) -> torch.Tensor:
        """New tokens [B, max_new_tokens]; the prompt is prefilled with the multimodal
        layout (prefix_mask: the prompt's bidirectional prefix under prefix_lm), then
        decoded with the KV cache (see LLM.generate for the options). The image
        placeholder token is never generated: it stands for no text, and an answer holding
        it, fed back in a conversation, would ask for an image that is not there."""
        self._check_input_ids(input_ids)
        layout = self.layout(input_ids, attention_mask, prefix_mask=prefix_mask, images=images)
        image = self.config.image_token_id
        suppress = (*kwargs.pop("suppress_tokens", ()), *([image] if image < self.config.llm.vocab_size else []))
        return self.language_model.generate(inputs_embeds=self.embed(input_ids, images),
                                            attention_mask=layout.segment_ids >= 0, layout=layout,
                                            suppress_tokens=suppress, **kwargs)

    @torch.no_grad()
    def score_answers(self, answers, input_ids, images=None, *, attention_mask=None,
                      prefix_mask=None) -> list[torch.Tensor]:
        """The logits that predict each answer's tokens ([B, L_j] ids each) after the prompt
        `input_ids` with its images, the prompt encoded and prefilled once (LLM.score_answers:
        what a forward over [prompt | answer] gives there)."""
        self._check_input_ids(input_ids)
        layout = self.layout(input_ids, attention_mask, prefix_mask=prefix_mask, images=images)
        return self.language_model.score_answers(answers, inputs_embeds=self.embed(input_ids, images),
                                                 attention_mask=layout.segment_ids >= 0, layout=layout)

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


def build_connector(cfg: VLMConfig) -> torch.nn.Module:
    """The connector VLMConfig.connector names, vision width -> LLM width."""
    width, out = cfg.vision.hidden_size, cfg.llm.hidden_size
    if cfg.connector == "resampler":
        return ResamplerConnector(width, out, cfg.resampler_queries, num_heads=max(1, out // 64),
                                  positions=cfg.vision_feature == "patch")
    if cfg.connector == "multilevel":
        return MultiLevelConnector([width] * len(cfg.select_layers or [cfg.select_layer]), out, out,
                                   mode=cfg.multilevel_mode, layer_norm=cfg.multilevel_mode == "sum",
                                   activation=cfg.projector_act, reduce=cfg.token_reduction)
    scale = 4 if cfg.token_reduction == "pixel_shuffle" else 1
    return FusedMLPConnector(scale * width, out, out, activation=cfg.projector_act, bias=cfg.projector_bias,
                             reduce=cfg.token_reduction)


def _from_hf_llava(raw: dict, hf_state: dict) -> tuple[VLM, dict]:
    """Config and renamed weights of a transformers LLaVA checkpoint (the 4.x layout
    `vision_tower.* / multi_modal_projector.* / language_model.model.*` and the
    newer `model.vision_tower.* / model.language_model.* / lm_head.*`)."""
    require(raw, ("vision_config", "text_config"))
    strategy = raw.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"config.json: vision_feature_select_strategy {strategy!r}; expected 'default' or 'full'")
    layer = raw.get("vision_feature_layer", -2)
    # Several layers: HF concatenates them on the channels, i.e. a multilevel concat connector.
    layers = list(layer) if isinstance(layer, (list, tuple)) else None
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
    cfg = VLMConfig(vision=vision, llm=llm, image_token_id=image_id, select_layer=layers[-1] if layers else layer,
                    vision_feature="patch" if strategy == "default" else "full", projector_act=act,
                    projector_bias=raw.get("multimodal_projector_bias", True),
                    connector="multilevel" if layers else "mlp", select_layers=layers)
    model = VLM(cfg)
    vision_hf, state = {}, {}
    for key, tensor in hf_state.items():
        part, rest = llava_names.split_hf_name(key)
        if part == "vision":  # renamed (and reshaped) by the vision tower's own conversion
            vision_hf[rest] = tensor
            continue
        try:
            state[llava_names.from_hf(key, vision, cfg.connector)] = tensor
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
