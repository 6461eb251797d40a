"""fastvlm VLM -> Hugging Face LLaVA: the inverse of ``VLM.from_pretrained``'s conversion.

``to_hf_llava(model)`` gives the ``config.json`` dict and the state dict of a
``transformers.LlavaForConditionalGeneration`` (transformers 5 key layout:
``model.vision_tower.* / model.multi_modal_projector.linear_{1,2}.* /
model.language_model.* / lm_head.*``) computing the same logits. The vision tower
is renamed with the very tables the importer uses (fastvlm.models.hf_vision's
CLIP/SigLIP/DINOv2 name lists), read right to left. LoRA layers are merged into
their base weights on the way out (an NF4 base is dequantized first: the merged
weight is the one the model multiplies by), without changing the model.

``image_processor_config`` and ``processor_config`` describe fastvlm's image
preprocessing and image-token expansion in the terms of transformers'
CLIP/Siglip/Bit image processors and ``LlavaProcessor``.

What HF LLaVA cannot express is refused with a ValueError naming the setting:
the resampler connector, COMM's summed multi-level connector, token reduction,
a non-causal attention layout (HF runs causal attention; ``allow_causal=True``
exports anyway, with a warning, and the logits then differ), an LLM with an
output-projection bias but no q/k/v bias, a Qwen2 LLM with MLP biases, and
register tokens dropped by the "patch" feature selection (HF drops only the first token).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from fastvlm.models import hf_vision
from fastvlm.models.llava_names import PROJECTOR_NAMES, to_hf
from fastvlm.nn.lora import LoRALinear, dequantized_weight
from fastvlm.ops.activations import HF_ACTIVATIONS

VISION_MODEL_TYPES = {"clip": "clip_vision_model", "siglip": "siglip_vision_model", "dinov2": "dinov2"}
# fastvlm's activation name -> the HF name the importer maps to it (first one wins: gelu_tanh -> gelu_pytorch_tanh).
TO_HF_ACTIVATION = {}
for _hf, _ours in HF_ACTIVATIONS.items():
    TO_HF_ACTIVATION.setdefault(_ours, _hf)
PROJECTOR_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu",
                         "silu": "silu"}
IMAGE_PROCESSORS = {"clip": "CLIPImageProcessor", "siglip": "SiglipImageProcessor", "dinov2": "BitImageProcessor"}


def vision_state_to_hf(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """VisionEncoder state dict -> HF vision model names (the importer's table read backwards,
    fastvlm.models.hf_vision.hf_name) and shapes."""
    out = {}
    for name, tensor in state.items():
        try:
            out[hf_vision.hf_name(name, config)] = tensor
        except KeyError:
            raise ValueError(f"model: vision tower parameter {name!r} has no Hugging Face {config.family} "
                             "name") from None
    # Weights the importer skips because features are hidden states (the final LayerNorm,
    # DINOv2's mask token) still exist in the HF model: neutral values, so nothing is left
    # to random init and from_pretrained reports no missing key.
    c = config.hidden_size
    final_norm = "layernorm" if config.family == "dinov2" else "post_layernorm"
    out[f"{final_norm}.weight"], out[f"{final_norm}.bias"] = torch.ones(c), torch.zeros(c)
    if config.family == "dinov2":
        out["embeddings.mask_token"] = torch.zeros(1, c)
    # DINOv2 keeps its class token, registers and positions with leading batch dims.
    if config.family == "dinov2":
        for key in ("embeddings.cls_token", "embeddings.register_tokens", "embeddings.position_embeddings"):
            if key in out:
                out[key] = out[key].reshape(1, -1, config.hidden_size)
    return out


def merged_state_dict(module: nn.Module, merge_lora: bool = True) -> dict[str, torch.Tensor]:
    """`module`'s state dict with every LoRALinear folded into a plain Linear's weight/bias
    (base + s·BA, in float32 then cast back to the base's dtype); the module is not changed.
    ``merge_lora=False``: the base weights alone (the model a PEFT adapter of them applies to)."""
    state = dict(module.state_dict())
    for name, layer in module.named_modules():
        if not isinstance(layer, LoRALinear):
            continue
        prefix = f"{name}." if name else ""
        for key in [k for k in state if k.startswith((prefix + "base_layer.", prefix + "lora_"))]:
            del state[key]
        base = layer.base_layer
        with torch.no_grad():
            if layer.quantized:
                weight, dtype = dequantized_weight(base), base.compute_dtype or torch.float32
            else:
                weight, dtype = base.weight, base.weight.dtype
            if layer.merged and not merge_lora:
                raise ValueError(f"model: LoRA layer {name!r} is merged into its base; unmerge it to export the base")
            if merge_lora and not layer.merged:
                weight = weight.float() + layer.delta_weight().float()
            state[prefix + "weight"] = weight.to(dtype).detach()
            if base.bias is not None:
                state[prefix + "bias"] = base.bias.detach()
    return state


def _text_config(llm, tokenizer_ids: dict) -> dict:
    c = llm.config
    if c.o_bias and not c.qkv_bias:
        raise ValueError("model: an LLM with an o_proj bias but no q/k/v bias has no Hugging Face "
                         "(Llama / Qwen2) equivalent")
    qwen2 = c.qkv_bias and not c.o_bias
    if qwen2 and c.mlp_bias:
        raise ValueError("model: Qwen2 (q/k/v bias without o_proj bias) has no MLP biases in transformers; "
                         "mlp_bias cannot be exported")
    rope = dict(c.rope_scaling)
    rope.setdefault("rope_type", rope.pop("type", "default"))
    text = {"model_type": "qwen2" if qwen2 else "llama", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim, "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps,
            "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": c.tie_word_embeddings,
            "rope_parameters": {**rope, "rope_theta": c.rope_theta},
            # transformers 4.x reads these two instead of rope_parameters
            "rope_theta": c.rope_theta, "rope_scaling": rope if rope["rope_type"] != "default" else None,
            **tokenizer_ids}
    if qwen2:
        sliding = [c.layer_window(i) is not None for i in range(c.num_hidden_layers)]
        # transformers 4.x reads max_window_layers (the layers from it on slide), 5.x layer_types
        first = sliding.index(True) if any(sliding) else c.num_hidden_layers
        if not all(sliding[first:]):
            warnings.warn(f"model: sliding_layers {c.sliding_layers} are not the last layers; transformers 5 "
                          "reads them from layer_types, but 4.x would slide every layer from "
                          f"max_window_layers={first} on", stacklevel=3)
        text.update(use_sliding_window=any(sliding), sliding_window=c.sliding_window, max_window_layers=first,
                    layer_types=["sliding_attention" if s else "full_attention" for s in sliding])
    elif c.sliding_window is not None:  # Mistral: Llama's layers, every one sliding
        if c.qkv_bias or c.mlp_bias:
            raise ValueError("model: a sliding-window LLM with q/k/v or MLP biases has no Hugging Face "
                             "(Mistral / Qwen2) equivalent")
        if c.sliding_layers is not None:
            raise ValueError(f"model: sliding_layers {c.sliding_layers} (not every layer) need Qwen2's layer "
                             "types, and so its q/k/v biases; Mistral slides in every layer")
        text.update(model_type="mistral", sliding_window=c.sliding_window)
    else:
        text.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
    return text


def _vision_config(v) -> dict:
    vision = {"model_type": VISION_MODEL_TYPES[v.family], "hidden_size": v.hidden_size,
              "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "image_size": v.image_size,
              "patch_size": v.patch_size, "num_channels": v.num_channels, "layer_norm_eps": v.layer_norm_eps,
              "hidden_act": TO_HF_ACTIVATION[v.act]}
    if v.family == "dinov2":
        if v.intermediate_size % v.hidden_size:
            raise ValueError(f"model: DINOv2 needs intermediate_size a multiple of hidden_size (mlp_ratio), got "
                             f"{v.intermediate_size} / {v.hidden_size}")
        vision.update(mlp_ratio=v.intermediate_size // v.hidden_size, qkv_bias=v.qkv_bias, layerscale_value=1.0)
        if v.num_register_tokens:
            vision.update(model_type="dinov2_with_registers", num_register_tokens=v.num_register_tokens)
    else:
        vision["intermediate_size"] = v.intermediate_size
    if v.family == "siglip":
        vision["vision_use_head"] = False  # the pooling head is not part of a LLaVA tower
    return vision


def check_exportable(model, allow_causal: bool = False) -> None:
    """Raise a ValueError for what HF LLaVA cannot express (see the module docstring)."""
    cfg = model.config
    if cfg.connector not in PROJECTOR_NAMES:
        raise ValueError(f"connector: HF LLaVA has only the mlp2x_gelu projector; {cfg.connector!r} cannot be "
                         "exported (use --format fastvlm)")
    if cfg.connector == "multilevel" and cfg.multilevel_mode != "concat":
        raise ValueError(f"multilevel_mode: HF LLaVA concatenates several layers; {cfg.multilevel_mode!r} cannot "
                         "be exported")
    if cfg.token_reduction is not None:
        raise ValueError(f"token_reduction: HF LLaVA feeds every patch token; {cfg.token_reduction!r} cannot be "
                         "exported")
    if cfg.projector_act not in PROJECTOR_ACTIVATIONS:
        raise ValueError(f"projector_act: {cfg.projector_act!r} has no Hugging Face name")
    v = cfg.vision
    if v.family not in VISION_MODEL_TYPES:
        raise ValueError(f"vision: family {v.family!r} has no Hugging Face vision model")
    if cfg.vision_feature == "patch" and v.num_prefix_tokens > 1:
        raise ValueError(f"vision_feature: 'patch' drops {v.num_prefix_tokens} prefix tokens (class + registers); "
                         "HF LLaVA's 'default' strategy drops only the first one")
    if v.interpolate_pos and v.family != "dinov2":
        warnings.warn("vision: interpolate_pos is on; HF CLIP/SigLIP towers accept only "
                      f"{v.image_size}x{v.image_size} images", stacklevel=3)
    if cfg.attention_kind != "causal":
        message = (f"attention_kind: the model was trained with {cfg.attention_kind!r} attention; HF LLaVA runs "
                   "causal attention, so its logits differ")
        if not allow_causal:
            raise ValueError(message + " (pass allow_causal=True / --allow-causal to export anyway)")
        warnings.warn(message, stacklevel=3)


def select_strategy(model) -> str:
    """HF's vision_feature_select_strategy: 'default' drops the class token, 'full' keeps all."""
    v = model.config.vision
    return "default" if model.config.vision_feature == "patch" and v.num_prefix_tokens == 1 else "full"


def to_hf_llava(model, *, allow_causal: bool = False, token_ids: dict | None = None, vocab_size: int | None = None,
                merge_lora: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, state dict) of the LlavaForConditionalGeneration equal to `model`.

    `token_ids`: bos/eos/pad ids for the text config (from the tokenizer). `vocab_size`:
    grow the embedding and LM head to this many rows, for a tokenizer that added tokens
    past the LLM's vocabulary (Vicuna's <image> is id 32000 of 32000): fastvlm never looks
    those ids up (image placeholders are overwritten), HF does, so they get zero rows, and
    their logits are 0 (suppress them at generation: see `added_token_ids`). `merge_lora=False`:
    LoRA layers contribute their base weights only (see `merged_state_dict`)."""
    check_exportable(model, allow_causal)
    cfg = model.config
    llm_vocab = cfg.llm.vocab_size
    vocab_size = llm_vocab if vocab_size is None else vocab_size
    if vocab_size < llm_vocab:
        raise ValueError(f"vocab_size: {vocab_size} is smaller than the LLM's vocabulary ({llm_vocab})")
    if cfg.image_token_id >= vocab_size:
        raise ValueError(f"vocab_size: the image token id {cfg.image_token_id} lies outside the exported "
                         f"vocabulary of {vocab_size}; pass vocab_size > {cfg.image_token_id}")
    layers = cfg.select_layers if cfg.connector == "multilevel" else cfg.select_layer
    config = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
              "vision_config": _vision_config(cfg.vision),
              "text_config": _text_config(model.language_model, dict(token_ids or {})),
              "image_token_id": cfg.image_token_id, "image_token_index": cfg.image_token_id,
              "image_seq_length": model.image_tokens,
              "projector_hidden_act": PROJECTOR_ACTIVATIONS[cfg.projector_act],
              "vision_feature_select_strategy": select_strategy(model),
              "vision_feature_layer": list(layers) if isinstance(layers, (list, tuple)) else layers,
              "multimodal_projector_bias": cfg.projector_bias,
              "tie_word_embeddings": cfg.llm.tie_word_embeddings}
    state = {f"model.vision_tower.{k}": t
             for k, t in vision_state_to_hf(merged_state_dict(model.vision_tower, merge_lora), cfg.vision).items()}
    for prefix in ("multi_modal_projector.", "language_model."):
        for key, tensor in merged_state_dict(model.get_submodule(prefix[:-1]), merge_lora).items():
            if key == "lm_head.weight" and cfg.llm.tie_word_embeddings:
                continue  # HF ties it to the embedding
            try:
                state[to_hf(prefix + key, cfg.vision, cfg.connector)] = tensor
            except KeyError:
                raise ValueError(f"model: parameter {prefix + key!r} has no place in HF LLaVA") from None
    if vocab_size > llm_vocab:
        config["text_config"]["vocab_size"] = vocab_size
        for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            if key in state:
                extra = state[key].new_zeros(vocab_size - llm_vocab, state[key].shape[1])
                state[key] = torch.cat([state[key], extra])
    # safetensors refuses tensors that share memory (tied weights were dropped above).
    return config, {k: v.detach().contiguous().cpu() for k, v in state.items()}


def added_token_ids(model, vocab_size: int) -> list[int]:
    """Ids past the LLM's own vocabulary (zero rows in the export), for generation's suppress_tokens."""
    return list(range(model.config.llm.vocab_size, vocab_size))


def _class_exists(name: str) -> bool:
    try:
        import transformers
    except ImportError:
        return False
    return hasattr(transformers, name)


def image_processor_config(preprocessor, family: str) -> dict:
    """preprocessor_config.json for transformers' PIL image processor of `family` that gives
    the same pixel values as fastvlm's ImagePreprocessor `preprocessor`."""
    name = IMAGE_PROCESSORS[family]
    # transformers 5 names its PIL processors *Pil (the plain name may pick the torchvision one).
    name = name + "Pil" if _class_exists(name + "Pil") else name
    config = {"image_processor_type": name, "do_resize": True, "resample": int(preprocessor.resample),
              "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": list(preprocessor.mean), "image_std": list(preprocessor.std), "do_convert_rgb": True}
    if preprocessor.resize == "square":
        config["size"] = {"height": preprocessor.size, "width": preprocessor.size}
    else:
        config["size"] = {"shortest_edge": preprocessor.size}
    config["do_center_crop"] = preprocessor.crop_size is not None
    if preprocessor.crop_size is not None:
        config["crop_size"] = {"height": preprocessor.crop_size, "width": preprocessor.crop_size}
    return config


def processor_config(model, image_token: str) -> dict:
    """processor_config.json of a LlavaProcessor that expands each image token to the run
    length fastvlm uses (patches, plus the prefix tokens the feature selection keeps). Its chat
    template goes in chat_template.jinja, where transformers 5 reads it."""
    v = model.config.vision
    config = {"processor_class": "LlavaProcessor", "patch_size": v.patch_size,
              "vision_feature_select_strategy": select_strategy(model), "image_token": image_token,
              "num_additional_image_tokens": v.num_prefix_tokens}
    return config
