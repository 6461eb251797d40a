"""What a training run starts from: separate vision + LLM parts, the connector choices
of VLMConfig, several encoder layers from HF LLaVA, precomputed image features."""
import pytest
import torch

from fastvlm.models.llm import LLMConfig
from fastvlm.models.vision import VisionConfig
from fastvlm.models.vlm import VLM, VLMConfig

transformers = pytest.importorskip("transformers")
IMG = 99


def _vision_config():
    return transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, image_size=28, patch_size=7, projection_dim=16)


def _text_config():
    return transformers.LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)


def _ids(tokens: int, images: int = 2) -> torch.Tensor:
    return torch.tensor([([3, 4] + [IMG] * tokens + [5]) * images])


def test_hf_llava_with_several_feature_layers_matches(tmp_path, seed):
    cfg = transformers.LlavaConfig(vision_config=_vision_config(), text_config=_text_config(), image_token_id=IMG,
                                   vision_feature_layer=[-3, -1], vision_feature_select_strategy="default")
    hf = transformers.LlavaForConditionalGeneration(cfg).float().eval()
    hf.save_pretrained(tmp_path)
    ours = VLM.from_pretrained(tmp_path).eval()
    assert ours.config.connector == "multilevel" and ours.feature_layers == [-3, -1]
    ids, pixels = _ids(16), torch.randn(2, 3, 28, 28)
    want = hf(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(ours(ids, pixels), want, rtol=1e-4, atol=1e-5)


def test_from_parts_loads_both_towers(tmp_path, seed):
    vision = transformers.CLIPVisionModel(_vision_config()).eval()
    llm = transformers.LlamaForCausalLM(_text_config()).eval()
    vision.save_pretrained(tmp_path / "vision")
    llm.save_pretrained(tmp_path / "llm")
    model = VLM.from_parts(tmp_path / "vision", tmp_path / "llm", image_token_id=IMG, select_layer=-2).eval()
    text = torch.tensor([[1, 7, 8, 9, 2]])
    torch.testing.assert_close(model(text), llm(input_ids=text).logits, rtol=1e-4, atol=1e-5)
    pixels = torch.randn(1, 3, 28, 28)
    (ours,) = model.vision_tower(pixels, select_layers=[-2])
    theirs = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert model.image_tokens == 16 and model(_ids(16, 1), pixels).shape == (1, 19, 100)


def _tiny(**options) -> VLM:
    vision = VisionConfig.siglip(image_size=32, patch_size=4, hidden_size=32, num_layers=2, num_heads=2,
                                 intermediate_size=64)
    llm = LLMConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2)
    return VLM(VLMConfig(vision=vision, llm=llm, image_token_id=IMG, **options)).eval()


@pytest.mark.parametrize("options, tokens", [
    ({}, 64),
    ({"token_reduction": "pixel_shuffle"}, 16),
    ({"token_reduction": "avg_pool"}, 16),
    ({"connector": "multilevel", "select_layers": [0, -1], "multilevel_mode": "sum"}, 64),
    ({"connector": "multilevel", "select_layers": [-2, -1], "token_reduction": "pixel_shuffle"}, 16),
    ({"connector": "resampler", "resampler_queries": 8}, 8),
])
def test_connector_choices_and_precomputed_features(options, tokens, seed):
    model = _tiny(**options)
    assert model.image_tokens == tokens
    ids, pixels = _ids(tokens), torch.randn(2, 3, 32, 32)
    logits = model(ids, pixels)
    assert logits.shape == (1, ids.shape[1], 100) and torch.isfinite(logits).all()
    features = model.vision_tower(pixels, select_layers=model.feature_layers)  # e.g. from a FeatureCache
    assert torch.equal(model(ids, image_features=features), logits)


def test_connector_config_errors():
    with pytest.raises(ValueError, match="^connector"):
        _tiny(connector="qformer")
    with pytest.raises(ValueError, match="^select_layers: several layers"):
        _tiny(select_layers=[-1, -2])
    with pytest.raises(ValueError, match="^token_reduction: the resampler"):
        _tiny(connector="resampler", token_reduction="avg_pool")
