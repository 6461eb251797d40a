"""Every Hugging Face config field that changes the math is implemented or refused.

A table of (model, field values): each row builds a tiny random transformers
model from that config, saves it with save_pretrained and loads it with
fastvlm's from_pretrained. "Implemented" rows must give transformers' logits
(fastvlm in fp32 against transformers in float64, within a small multiple of
transformers' own fp32 error, tests/utils.py's rule); "refused" rows must
raise a ValueError naming the field, at load time or at the first call that
would compute something different (dropout in training).

Fields of transformers 5.23's Llama / Qwen2 / Mistral / LLaVA / CLIP / SigLIP /
DINOv2 configs not in the table do not change the forward pass: initializer_*,
use_cache, pad/bos/eos_token_id, projection_dim, vision_use_head (SigLIP's
pooling head is not a feature), layerscale_value (an init), apply_layernorm /
reshape_hidden_states / out_features (backbone outputs), use_mask_token.
"""
import json

import pytest
import torch

from fastvlm.models.llm import LLM
from fastvlm.models.vision import VisionEncoder
from fastvlm.models.vlm import VLM
from tests.hf_models import IMG, randomize, tiny_llava_config
from tests.utils import assert_close

transformers = pytest.importorskip("transformers")

TEXT = dict(vocab_size=120, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
TEXT_CONFIGS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}
SEQ = 42


def text_config(model_type, **fields):
    return getattr(transformers, TEXT_CONFIGS[model_type])(**{**TEXT, **fields})


def check_logits(hf_model, ours, hf_inputs: dict, ours_args: tuple):
    """fastvlm (fp32) against transformers in float64, bounded by transformers' own fp32 error."""
    with torch.no_grad():
        base = hf_model(**hf_inputs).logits
        want = hf_model.double()(**{k: v.double() if v.is_floating_point() else v
                                    for k, v in hf_inputs.items()}).logits
        got = ours(*ours_args)
    assert_close(got, want, base, dtype=torch.float32, name="logits")


# ---- the decoder LLMs ------------------------------------------------------------------------
LLM_IMPLEMENTED = [
    ("llama", {"hidden_act": "gelu"}),
    ("llama", {"hidden_act": "gelu_pytorch_tanh"}),
    ("llama", {"hidden_act": "gelu_new"}),
    ("llama", {"hidden_act": "relu"}),
    ("llama", {"mlp_bias": True}),
    ("llama", {"attention_bias": True}),
    ("llama", {"head_dim": 16}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"rms_norm_eps": 1e-2}),
    ("llama", {"pretraining_tp": 2}),  # transformers 5 no longer splits the matmuls: same math
    ("llama", {"attention_dropout": 0.1}),  # eval mode
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
               "max_position_embeddings": 16}),  # SEQ > 16: the NTK base grows
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                   "rope_theta": 500000.0}}),
    ("qwen2", {}),
    ("qwen2", {"use_sliding_window": False, "sliding_window": 4}),  # off: ignored, as transformers does
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}),  # no layer slides
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),  # the last layer slides
    ("qwen2", {"use_sliding_window": True, "sliding_window": 5,
               "layer_types": ["sliding_attention", "full_attention"]}),
    ("qwen2", {"tie_word_embeddings": True, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    ("mistral", {"sliding_window": None}),
    ("mistral", {"sliding_window": SEQ}),  # the window holds the whole sequence
    ("mistral", {"sliding_window": 4}),
    ("mistral", {"sliding_window": 1}),  # each token sees itself only
    ("mistral", {"head_dim": 16, "sliding_window": None}),
    ("mistral", {"attention_bias": True, "mlp_bias": True, "sliding_window": None}),  # Mistral has neither
]
LLM_REFUSED = [
    ("llama", {"hidden_act": "gelu_fast"}, "hidden_act"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}}, "rope"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0,
                                   "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ("llama", {"attention_dropout": 0.1}, "attention_dropout"),  # training
]


def saved(hf_model, tmp_path):
    """`hf_model` with random biases and norms, saved by transformers into tmp_path."""
    hf_model = randomize(hf_model.float().eval())
    hf_model.save_pretrained(tmp_path)
    return hf_model


def _hf_llm(model_type, fields, tmp_path):
    return saved(transformers.AutoModelForCausalLM.from_config(text_config(model_type, **fields)), tmp_path)


@pytest.mark.parametrize("model_type,fields", LLM_IMPLEMENTED, ids=[f"{m}-{f}" for m, f in LLM_IMPLEMENTED])
def test_llm_field_implemented(model_type, fields, tmp_path, seed):
    hf = _hf_llm(model_type, fields, tmp_path)
    ours = LLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, TEXT["vocab_size"], (2, SEQ))
    check_logits(hf, ours, {"input_ids": ids}, (ids,))


@pytest.mark.parametrize("model_type,fields,field", LLM_REFUSED, ids=[f"{m}-{f}" for m, f, _ in LLM_REFUSED])
def test_llm_field_refused(model_type, fields, field, tmp_path):
    _hf_llm(model_type, fields, tmp_path)
    with pytest.raises(ValueError, match=field):
        ours = LLM.from_pretrained(tmp_path).train()
        ids = torch.randint(0, TEXT["vocab_size"], (1, SEQ))
        ours(ids, labels=ids)


# ---- LLaVA -------------------------------------------------------------------------------------
def _llava_inputs(tokens_per_image):
    ids = torch.tensor([[5, 6] + [IMG] * tokens_per_image + [7, 8, 9] + [IMG] * tokens_per_image + [10]])
    return ids, torch.randn(2, 3, 28, 28)


SIGLIP = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
          "num_attention_heads": 4, "image_size": 28, "patch_size": 14}
LLAVA_IMPLEMENTED = [  # (LLaVA fields, text config fields, vision config fields, tokens per image)
    ({}, {"hidden_act": "gelu"}, {}, 4),
    ({"projector_hidden_act": "gelu_pytorch_tanh"}, {}, {}, 4),
    ({"projector_hidden_act": "quick_gelu"}, {}, {}, 4),
    ({"projector_hidden_act": "silu"}, {}, {}, 4),
    ({"multimodal_projector_bias": False}, {}, {}, 4),
    ({"image_seq_length": 4}, {}, {}, 4),  # the processor's count only
    ({"vision_feature_layer": [-3, -1]}, {}, {}, 4),
    ({"vision_feature_layer": [-2, 0], "vision_feature_select_strategy": "full"}, {}, {}, 5),
    ({"vision_feature_select_strategy": "full"}, {}, {}, 5),
    ({"tie_word_embeddings": True}, {}, {}, 4),
    ({}, {"tie_word_embeddings": True}, {}, 4),
    ({}, {"model_type": "qwen2"}, {}, 4),
    ({}, {"model_type": "mistral", "sliding_window": None}, {}, 4),
    ({}, {"model_type": "mistral", "sliding_window": 3}, {}, 4),  # shorter than an image
    ({}, {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}, {}, 4),
    ({}, {}, {"hidden_act": "gelu", "layer_norm_eps": 1e-2}, 4),
    ({}, {}, {"attention_dropout": 0.1}, 4),  # eval mode
    ({"vision_feature_select_strategy": "full"}, {}, SIGLIP, 4),
]
LLAVA_REFUSED = [  # (LLaVA fields, text fields, vision fields, field named, train?)
    ({"vision_feature_select_strategy": "bogus"}, {}, {}, "vision_feature_select_strategy", False),
    ({"vision_feature_select_strategy": "default"}, {}, SIGLIP, "vision_feature_select_strategy", False),
    ({"projector_hidden_act": "relu"}, {}, {}, "projector_hidden_act", False),
    ({}, {"hidden_act": "gelu_fast"}, {}, "hidden_act", False),
    ({}, {}, {"attention_dropout": 0.1}, "attention_dropout", True),
    ({}, {}, {"hidden_act": "gelu_fast"}, "hidden_act", False),
]


def _save_llava(fields, text, vision, tmp_path):
    """A tiny LLaVA saved by transformers; fields transformers itself would refuse are
    written into config.json afterwards."""
    text = dict(text)
    text_type = text.pop("model_type", "llama")
    vision = dict(vision)
    vision_type = vision.pop("model_type", None)
    strategy = fields.get("vision_feature_select_strategy")
    safe = {**fields, "vision_feature_select_strategy": "default"} if strategy == "bogus" else fields
    cfg = tiny_llava_config(text_overrides=text, vision_overrides=vision, **safe)
    if text_type != "llama":
        cfg.text_config = text_config(text_type, **{**dict(vocab_size=120), **text})
    if vision_type == "siglip_vision_model":
        cfg.vision_config = transformers.SiglipVisionConfig(**vision)
    hf = saved(transformers.LlavaForConditionalGeneration(cfg), tmp_path)
    if strategy == "bogus":
        raw = json.loads((tmp_path / "config.json").read_text())
        raw["vision_feature_select_strategy"] = "bogus"
        (tmp_path / "config.json").write_text(json.dumps(raw))
    return hf


@pytest.mark.parametrize("fields,text,vision,tokens", LLAVA_IMPLEMENTED,
                         ids=[f"{f}-{t}-{v.get('model_type', v)}" for f, t, v, _ in LLAVA_IMPLEMENTED])
def test_llava_field_implemented(fields, text, vision, tokens, tmp_path, seed):
    hf = _save_llava(fields, text, vision, tmp_path)
    ours = VLM.from_pretrained(tmp_path).eval()
    ids, pixels = _llava_inputs(tokens)
    check_logits(hf, ours, {"input_ids": ids, "pixel_values": pixels}, (ids, pixels))


@pytest.mark.parametrize("fields,text,vision,field,train", LLAVA_REFUSED,
                         ids=[f"{f}-{t}-{v.get('model_type', v)}" for f, t, v, _, _ in LLAVA_REFUSED])
def test_llava_field_refused(fields, text, vision, field, train, tmp_path):
    _save_llava(fields, text, vision, tmp_path)
    ids, pixels = _llava_inputs(4)
    with pytest.raises(ValueError, match=field):
        ours = VLM.from_pretrained(tmp_path).train(train)
        ours(ids, pixels, ids.masked_fill(ids == IMG, -100))


# ---- vision towers alone ------------------------------------------------------------------------
VISION_IMPLEMENTED = [
    ("CLIPVisionConfig", {"hidden_act": "gelu"}),
    ("CLIPVisionConfig", {"hidden_act": "gelu_new", "layer_norm_eps": 1e-3}),
    ("SiglipVisionConfig", {"hidden_act": "gelu"}),
    ("SiglipVisionConfig", {"vision_use_head": False}),
    ("Dinov2Config", {"qkv_bias": False}),
    ("Dinov2Config", {"mlp_ratio": 3, "layerscale_value": 0.5}),
    ("Dinov2Config", {"hidden_act": "gelu_pytorch_tanh", "drop_path_rate": 0.1}),  # eval mode
    ("Dinov2WithRegistersConfig", {"num_register_tokens": 2}),
]
VISION_REFUSED = [
    ("Dinov2Config", {"use_swiglu_ffn": True}, "use_swiglu_ffn", False),
    ("Dinov2Config", {"drop_path_rate": 0.1}, "drop_path_rate", True),
    ("Dinov2Config", {"hidden_dropout_prob": 0.1}, "hidden_dropout_prob", True),
    ("CLIPVisionConfig", {"attention_dropout": 0.1}, "attention_dropout", True),
    ("CLIPVisionConfig", {"hidden_act": "gelu_fast"}, "hidden_act", False),
]
VISION_SIZES = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=28, patch_size=14)
VISION_MODELS = {"CLIPVisionConfig": "CLIPVisionModel", "SiglipVisionConfig": "SiglipVisionModel",
                 "Dinov2Config": "Dinov2Model", "Dinov2WithRegistersConfig": "Dinov2WithRegistersModel"}


def _save_vision(config_cls, fields, tmp_path):
    sizes = dict(VISION_SIZES) if config_cls.startswith("Dinov2") else {**VISION_SIZES, "intermediate_size": 64}
    return saved(getattr(transformers, VISION_MODELS[config_cls])(getattr(transformers, config_cls)(
        **{**sizes, **fields})), tmp_path)


@pytest.mark.parametrize("config_cls,fields", VISION_IMPLEMENTED, ids=[f"{c}-{f}" for c, f in VISION_IMPLEMENTED])
def test_vision_field_implemented(config_cls, fields, tmp_path, seed):
    hf = _save_vision(config_cls, fields, tmp_path)
    ours = VisionEncoder.from_pretrained(tmp_path).eval()
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        base = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        want = hf.double()(pixel_values=pixels.double(), output_hidden_states=True).hidden_states[-2]
        (got,) = ours(pixels, select_layers=[-2])
    assert_close(got, want, base, dtype=torch.float32, name="hidden states")


@pytest.mark.parametrize("config_cls,fields,field,train", VISION_REFUSED,
                         ids=[f"{c}-{f}" for c, f, _, _ in VISION_REFUSED])
def test_vision_field_refused(config_cls, fields, field, train, tmp_path):
    _save_vision(config_cls, fields, tmp_path)
    with pytest.raises(ValueError, match=field):
        ours = VisionEncoder.from_pretrained(tmp_path).train(train)
        ours(torch.randn(1, 3, 28, 28), select_layers=[-1])
