"""Load local Hugging Face vision checkpoints into fastvlm's VisionEncoder.

Supported layouts (config.json `model_type`):
- ``clip_vision_model`` (CLIPVisionModel) and ``clip`` (a full CLIPModel, as in
  openai/clip-vit-large-patch14-336 that LLaVA uses; only its vision tower is read);
- ``siglip_vision_model`` / ``siglip`` likewise;
- ``dinov2`` and ``dinov2_with_registers``.
Weights from model.safetensors, a sharded model.safetensors.index.json, or
pytorch_model.bin. The final LayerNorm and SigLIP's pooling head are not part of
the encoder (features are hidden states, as in transformers' `hidden_states`), so
their keys are accepted and skipped; any other unexpected or missing key is an error.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from fastvlm.models.vision_config import VisionConfig
from fastvlm.ops.activations import activation_from_hf
from fastvlm.utils.config import require
from fastvlm.utils.io import read_json, read_tensors

FULL_MODEL_TYPES = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}
DROPOUTS = ("attention_dropout", "dropout", "hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate")
VISION_MODEL_TYPES = ("clip", "clip_vision_model", "siglip", "siglip_vision_model", "dinov2",
                      "dinov2_with_registers")


def _activation(hf: dict) -> str:
    return activation_from_hf(hf.get("hidden_act", "gelu"), "hidden_act")


def config_from_hf(hf: dict) -> VisionConfig:
    """VisionConfig from a transformers config.json dict (vision model or full CLIP/SigLIP)."""
    model_type = hf.get("model_type")
    if model_type in FULL_MODEL_TYPES:
        require(hf, ("vision_config",))
        hf, model_type = hf["vision_config"], FULL_MODEL_TYPES[model_type]
    if model_type not in VISION_MODEL_TYPES:
        raise ValueError(f"config.json: model_type {model_type!r} not supported; expected one of "
                         f"{', '.join(VISION_MODEL_TYPES)}")
    require(hf, ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "layer_norm_eps") + (("mlp_ratio",) if model_type.startswith("dinov2") else ("intermediate_size",)))
    sizes = dict(image_size=hf["image_size"], patch_size=hf["patch_size"], hidden_size=hf["hidden_size"],
                 num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                 num_channels=hf.get("num_channels", 3), layer_norm_eps=hf["layer_norm_eps"],
                 dropout=float(max(hf.get(k) or 0.0 for k in DROPOUTS)))
    if model_type == "clip_vision_model":
        return VisionConfig.clip(intermediate_size=hf["intermediate_size"], act=_activation(hf), **sizes)
    if model_type == "siglip_vision_model":
        return VisionConfig.siglip(intermediate_size=hf["intermediate_size"], act=_activation(hf), **sizes)
    if model_type in ("dinov2", "dinov2_with_registers"):
        if hf.get("use_swiglu_ffn"):
            raise ValueError("config.json: DINOv2 with a SwiGLU MLP (use_swiglu_ffn) is not supported")
        registers = hf.get("num_register_tokens", 0) if model_type == "dinov2_with_registers" else 0
        return VisionConfig.dinov2(intermediate_size=int(hf["hidden_size"] * hf["mlp_ratio"]),
                                   qkv_bias=hf.get("qkv_bias", True), num_register_tokens=registers,
                                   interpolate_antialias=model_type == "dinov2_with_registers",
                                   act=_activation(hf), **sizes)
    raise AssertionError(model_type)  # every type of VISION_MODEL_TYPES is handled above


# (HF name pattern, fastvlm name) per family; {i} is the block index.
CLIP_SIGLIP_NAMES = [
    ("embeddings.patch_embedding.weight", "patch_embed.weight"),
    ("embeddings.patch_embedding.bias", "patch_embed.bias"),
    ("embeddings.class_embedding", "class_token"),
    ("embeddings.position_embedding.weight", "pos_embed"),
    ("pre_layrnorm.weight", "pre_norm.weight"),
    ("pre_layrnorm.bias", "pre_norm.bias"),
    ("encoder.layers.{i}.layer_norm1.{p}", "blocks.{i}.norm1.{p}"),
    ("encoder.layers.{i}.self_attn.{proj}.{p}", "blocks.{i}.attn.{proj}.{p}"),
    ("encoder.layers.{i}.layer_norm2.{p}", "blocks.{i}.norm2.{p}"),
    ("encoder.layers.{i}.mlp.{fc}.{p}", "blocks.{i}.mlp.{fc}.{p}"),
]
CLIP_SIGLIP_SKIPPED = [r"post_layernorm\..*", r"head\..*", r"embeddings\.position_ids"]
DINOV2_NAMES = [
    ("embeddings.patch_embeddings.projection.{p}", "patch_embed.{p}"),
    ("embeddings.cls_token", "class_token"),
    ("embeddings.register_tokens", "registers"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("encoder.layer.{i}.norm1.{p}", "blocks.{i}.norm1.{p}"),
    # transformers 5's module names first: names are written with the first rule that fits
    ("encoder.layer.{i}.attention.{proj5}.{p}", "blocks.{i}.attn.{proj5}.{p}"),
    ("encoder.layer.{i}.attention.attention.{dproj}.{p}", "blocks.{i}.attn.{dproj}.{p}"),  # checkpoints, 4.x
    ("encoder.layer.{i}.attention.output.dense.{p}", "blocks.{i}.attn.out_proj.{p}"),
    ("encoder.layer.{i}.layer_scale1.lambda1", "blocks.{i}.scale1.scale"),
    ("encoder.layer.{i}.norm2.{p}", "blocks.{i}.norm2.{p}"),
    ("encoder.layer.{i}.mlp.{fc}.{p}", "blocks.{i}.mlp.{fc}.{p}"),
    ("encoder.layer.{i}.layer_scale2.lambda1", "blocks.{i}.scale2.scale"),
]
DINOV2_SKIPPED = [r"layernorm\..*", r"embeddings\.mask_token"]
FIELDS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)", "proj": r"(?P<proj>[qkv]_proj|out_proj)",
          "fc": r"(?P<fc>fc[12])"}
# Fields named differently on the two sides: HF value -> fastvlm value.
RENAMED_FIELDS = {"dproj": {"query": "q_proj", "key": "k_proj", "value": "v_proj"},
                  "proj5": {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "out_proj"}}


def _compile(names, inverse=False):
    """[(regex over one side's names, the other side's template)]; `inverse`: fastvlm -> HF."""
    side = {f: rf"(?P<{f}>{'|'.join(values.values() if inverse else values)})"
            for f, values in RENAMED_FIELDS.items()}
    rules = []
    for hf_name, ours in names:
        source, target = (ours, hf_name) if inverse else (hf_name, ours)
        pattern = re.escape(source).replace(r"\{", "{").replace(r"\}", "}").format(**FIELDS, **side)
        rules.append((re.compile(pattern + "$"), target))
    return rules


def _apply(rules, name: str, inverse: bool) -> str | None:
    for pattern, template in rules:
        match = pattern.match(name)
        if match:
            fields = match.groupdict()
            for f, values in RENAMED_FIELDS.items():
                if f in fields:
                    fields[f] = {v: k for k, v in values.items()}[fields[f]] if inverse else values[fields[f]]
            return template.format(**fields)
    return None


# Hub checkpoints saved by transformers < 5 prefix the vision tower with "vision_model.".
RULES = {"clip": (_compile(CLIP_SIGLIP_NAMES), CLIP_SIGLIP_SKIPPED, "vision_model."),
         "siglip": (_compile(CLIP_SIGLIP_NAMES), CLIP_SIGLIP_SKIPPED, "vision_model."),
         "dinov2": (_compile(DINOV2_NAMES), DINOV2_SKIPPED, "")}
INVERSE_RULES = {"clip": _compile(CLIP_SIGLIP_NAMES, inverse=True),
                 "siglip": _compile(CLIP_SIGLIP_NAMES, inverse=True),
                 "dinov2": _compile(DINOV2_NAMES, inverse=True)}


def fastvlm_name(hf_name: str, config: VisionConfig) -> str | None:
    """fastvlm's name of an HF vision-tower parameter (with or without the tower's
    "vision_model." prefix); None for parameters the encoder does not have (final norm,
    pooling head). Raises KeyError for a name of no known parameter."""
    rules, skipped, prefix = RULES[config.family]
    short = hf_name[len(prefix):] if prefix and hf_name.startswith(prefix) else hf_name
    ours = _apply(rules, short, inverse=False)
    if ours is not None:
        return ours
    if re.fullmatch("|".join(skipped), short):
        return None
    raise KeyError(hf_name)


def hf_name(name: str, config: VisionConfig) -> str:
    """The name transformers 5 gives a fastvlm encoder parameter (its module layout:
    no "vision_model." prefix). Raises KeyError for a name of no known parameter."""
    theirs = _apply(INVERSE_RULES[config.family], name, inverse=True)
    if theirs is None:
        raise KeyError(name)
    return theirs


def convert_state_dict(hf_state: dict[str, torch.Tensor], config: VisionConfig, full_model: bool = False):
    """Rename an HF state dict to fastvlm names; returns (state, unexpected HF keys).

    `full_model`: the checkpoint is a CLIPModel/SiglipModel, whose text tower and
    projections are skipped."""
    prefix = RULES[config.family][2]
    state, unexpected = {}, []
    for name, tensor in hf_state.items():
        if full_model and not (prefix and name.startswith(prefix)):  # text tower, projections, logit scale
            continue
        try:
            ours = fastvlm_name(name, config)
        except KeyError:
            unexpected.append(name)
            continue
        if ours is not None:
            state[ours] = tensor
    # HF keeps these with a leading batch dim or as an embedding table.
    for key in ("pos_embed", "registers"):
        if key in state:
            state[key] = state[key].reshape(-1, config.hidden_size)
    if "class_token" in state:
        state["class_token"] = state["class_token"].reshape(config.hidden_size)
    return state, unexpected


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").is_file():
        return read_tensors(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        state = {}
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"path: {index} has no weight_map")
        for shard in sorted(set(weight_map.values())):
            state.update(read_tensors(path / shard))
        return state
    if (path / "pytorch_model.bin").is_file():
        return read_tensors(path / "pytorch_model.bin")
    raise ValueError(f"path: no model.safetensors, model.safetensors.index.json or pytorch_model.bin in {path}")


def read_hf_vision(path, **overrides) -> tuple[VisionConfig, dict[str, torch.Tensor], list[str]]:
    """(config, state dict under fastvlm names, unexpected HF keys) of a local checkpoint
    directory; `overrides` replace config fields, e.g. interpolate_pos=True.
    VisionEncoder.from_pretrained builds the encoder from them."""
    path = Path(path)
    hf = read_json(path / "config.json")
    if hf.get("model_type") not in VISION_MODEL_TYPES:
        raise ValueError(f"path: {path} holds a {hf.get('model_type')!r} model, not a vision encoder; "
                         f"expected config.json model_type one of {', '.join(VISION_MODEL_TYPES)}")
    config = config_from_hf(hf)
    if overrides:
        config = config.replace(**overrides)
    state, unexpected = convert_state_dict(read_weights(path), config,
                                           full_model=hf.get("model_type") in FULL_MODEL_TYPES)
    return config, state, unexpected
