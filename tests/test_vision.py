"""VisionEncoder: parity with transformers (tiny random configs), loading, input checks."""
import copy
import json

import pytest
import torch
import transformers

from fastvlm.models.vision import VisionConfig, VisionEncoder
from tests.utils import assert_close, assert_close_rescaled

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            image_size=28, patch_size=7)


def hf_model(kind):
    """A tiny random transformers vision model (eager attention: the plain reference)."""
    if kind == "clip":
        config = transformers.CLIPVisionConfig(**TINY)
        model = transformers.CLIPVisionModel(config)
    elif kind == "siglip":
        config = transformers.SiglipVisionConfig(**TINY)
        model = transformers.SiglipVisionModel(config)
    elif kind == "dinov2":
        tiny = {k: v for k, v in TINY.items() if k != "intermediate_size"}
        config = transformers.Dinov2Config(mlp_ratio=2, layerscale_value=0.5, **tiny)
        model = transformers.Dinov2Model(config)
    else:
        tiny = {k: v for k, v in TINY.items() if k != "intermediate_size"}
        config = transformers.Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2,
                                                        layerscale_value=0.5, **tiny)
        model = transformers.Dinov2WithRegistersModel(config)
    # Random init leaves some parameters at constants (zeros, ones); perturb all so
    # that a swapped or skipped weight cannot go unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.config._attn_implementation = "eager"
    return model.eval()


def hf_hidden_states(model, pixels, **kwargs):
    with torch.no_grad():
        return model(pixels, output_hidden_states=True, **kwargs).hidden_states


def assert_parity(model, ours, pixels, **kwargs):
    """Every hidden state vs the transformers model in float64, bound by it in fp32."""
    base = hf_hidden_states(model, pixels, **kwargs)
    ref = hf_hidden_states(copy.deepcopy(model).double(), pixels.double(), **kwargs)
    with torch.no_grad():
        got = ours(pixels, select_layers=list(range(len(ref))))
    assert len(got) == len(ref) == ours.config.num_layers + 1
    for layer, (a, r, b) in enumerate(zip(got, ref, base)):
        assert_close(a, r, b, name=f"hidden state {layer}")


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2", "dinov2_registers"])
def test_parity_every_layer(kind, tmp_path, seed):
    model = hf_model(kind)
    model.save_pretrained(tmp_path)
    ours = VisionEncoder.from_pretrained(tmp_path)
    assert_parity(model, ours, torch.randn(2, 3, 28, 28))


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2", "dinov2_registers"])
def test_parity_interpolated_positions(kind, tmp_path, seed):
    model = hf_model(kind)
    model.save_pretrained(tmp_path)
    ours = VisionEncoder.from_pretrained(tmp_path, interpolate_pos=True)
    pixels = torch.randn(2, 3, 45, 36)  # 6x5 patches (partial ones dropped) from a 4x4 grid
    kwargs = {} if kind.startswith("dinov2") else {"interpolate_pos_encoding": True}
    assert_parity(model, ours, pixels, **kwargs)


def test_full_clip_model_checkpoint_and_bin_format(tmp_path, seed):
    """LLaVA's openai/clip-vit-large-patch14-336 is a full CLIPModel in pytorch_model.bin
    with a "vision_model." prefix: the text tower is skipped, the vision tower read."""
    vision = hf_model("clip")
    full_config = transformers.CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=50,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=vision.config.to_dict(), projection_dim=8)
    full = transformers.CLIPModel(full_config)
    full.vision_model.load_state_dict(vision.state_dict())
    state = {k: v.contiguous() for k, v in full.state_dict().items()}
    assert any(k.startswith("text_model.") for k in state)
    assert any(k.startswith("vision_model.") for k in state)
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(full_config.to_dict()))
    ours = VisionEncoder.from_pretrained(tmp_path)
    assert_parity(vision, ours, torch.randn(2, 3, 28, 28))


def test_missing_and_unexpected_keys_are_reported(tmp_path, seed):
    from safetensors.torch import load_file, save_file

    hf_model("siglip").save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    missing = next(k for k in state if k.endswith("layers.1.mlp.fc2.weight"))
    del state[missing]
    state["encoder.layers.1.mlp.fc3.weight"] = torch.randn(2)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        VisionEncoder.from_pretrained(tmp_path)
    assert "blocks.1.mlp.fc2.weight" in str(err.value)
    assert "encoder.layers.1.mlp.fc3.weight" in str(err.value)


def test_not_a_checkpoint_dir(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        VisionEncoder.from_pretrained(tmp_path)


def tiny_encoder(family="clip", **changes):
    sizes = dict(image_size=28, patch_size=7, hidden_size=32, num_layers=4, num_heads=4,
                 intermediate_size=48)
    return VisionEncoder(getattr(VisionConfig, family)(**sizes).replace(**changes))


def test_select_layers_stops_after_deepest(seed):
    encoder = tiny_encoder()
    ran = []
    for i, block in enumerate(encoder.blocks):
        block.register_forward_hook(lambda *_, i=i: ran.append(i))
    pixels = torch.randn(2, 3, 28, 28)
    full = encoder(pixels, select_layers=list(range(5)))
    ran.clear()
    picked = encoder(pixels, select_layers=[-3, 1, 0])
    assert ran == [0, 1]
    for got, index in zip(picked, [2, 1, 0]):
        torch.testing.assert_close(got, full[index], rtol=0, atol=0)


@pytest.mark.parametrize("layers", [[5], [-6], [], 1])
def test_select_layers_out_of_range(layers):
    with pytest.raises(ValueError, match="select_layers"):
        tiny_encoder()(torch.randn(1, 3, 28, 28), select_layers=layers)


def test_bad_pixels():
    encoder = tiny_encoder()
    with pytest.raises(ValueError, match="pixel_values: expected 3 channels, got 1"):
        encoder(torch.randn(1, 1, 28, 28))
    with pytest.raises(ValueError, match="interpolate_pos=True"):
        encoder(torch.randn(1, 3, 35, 28))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        encoder(torch.randn(3, 28, 28))
    with pytest.raises(ValueError, match="at least one patch"):
        tiny_encoder(interpolate_pos=True)(torch.randn(1, 3, 6, 28))


def test_config_validation():
    good = tiny_encoder().config
    with pytest.raises(ValueError, match=r"unknown keys \['hiden_size'\]"):
        VisionConfig.from_dict({**good.to_dict(), "hiden_size": 8})
    assert VisionConfig.from_dict(good.to_dict()) == good
    with pytest.raises(ValueError, match="num_heads"):
        good.replace(num_heads=5)
    with pytest.raises(ValueError, match="family"):
        good.replace(family="vit")
    with pytest.raises(ValueError, match="act"):
        good.replace(act="relu6")
    with pytest.raises(ValueError, match="class_token=True"):
        good.replace(class_token=False, num_register_tokens=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, None])
def test_frozen_encoder_builds_no_graph(dtype, seed):
    encoder = tiny_encoder().set_checkpointing("full")
    pixels = torch.randn(2, 3, 28, 28)
    reference = encoder(pixels, select_layers=[-2, -1])
    with torch.no_grad():
        reference64 = copy.deepcopy(encoder).double()(pixels.double(), select_layers=[-2, -1])
    encoder.freeze(dtype=dtype)
    connector = torch.nn.Linear(32, 8, dtype=dtype or torch.float32)
    saved = []
    # Inside a training step: grad enabled, autocast on, saved-tensor hooks watching.
    with torch.enable_grad(), torch.autocast("cpu", dtype=torch.float16), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        features = encoder(pixels, select_layers=[-2, -1])
        assert not saved
        loss = connector(features[0]).float().square().mean()
    expected = dtype or torch.float32
    for f in features:
        assert f.dtype == expected and f.grad_fn is None and not f.requires_grad
    loss.backward()  # features are ordinary tensors the trainable connector can save
    assert connector.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    for f, r, r64 in zip(features, reference, reference64):
        if dtype is None:  # the same fp32 computation, without a graph
            assert torch.equal(f, r.detach())
        else:  # the same computation in bf16: fp32's own error rescaled to bf16's roundoff
            assert_close_rescaled(f, r64, r.detach(), dtype)


def test_encoder_ensemble(seed):
    from PIL import Image

    from fastvlm.models.ensemble import EncoderEnsemble

    siglip = tiny_encoder("siglip")
    dino = VisionEncoder(VisionConfig.dinov2(image_size=42, patch_size=7, hidden_size=24, num_layers=2,
                                             num_heads=3, intermediate_size=48, num_register_tokens=1))
    ensemble = EncoderEnsemble([siglip, dino.freeze(dtype=None)], select_layers=[[-2, -1], [1]])
    images = [Image.fromarray(torch.randint(0, 256, (50 + 9 * i, 61, 3), dtype=torch.uint8).numpy())
              for i in range(2)]
    pixels = ensemble.preprocess(images)
    assert [tuple(p.shape) for p in pixels] == [(2, 3, 28, 28), (2, 3, 42, 42)]
    features = ensemble(pixels)
    assert [[tuple(f.shape) for f in per] for per in features] == [[(2, 16, 32)] * 2, [(2, 38, 24)]]
    torch.testing.assert_close(features[0][0], siglip(pixels[0], select_layers=[-2])[0], rtol=0, atol=0)
    torch.testing.assert_close(features[1][0], dino(pixels[1], select_layers=[1])[0], rtol=0, atol=0)
    assert features[0][1].requires_grad and not features[1][0].requires_grad

    with pytest.raises(ValueError, match="one list per encoder"):
        EncoderEnsemble([siglip, dino], select_layers=[[-1]])
    with pytest.raises(ValueError, match="select_layers"):
        EncoderEnsemble([siglip], select_layers=[[9]])
    with pytest.raises(ValueError, match="list of 2 tensors"):
        ensemble(pixels[0])
    with pytest.raises(ValueError, match="same batch size"):
        ensemble([pixels[0], pixels[1][:1]])
