"""PEFT adapters both ways between fastvlm.VLM and transformers' LLaVA: an adapter trained
in either loads in the other with equal logits (LLM and vision-tower adapters, a trained
projector, both key layouts), or fails with a ValueError."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastvlm.train.lora import apply_lora, load_adapter, lora_layers, save_adapter
from tests.llava_models import llava_batch, llava_pair, peft_load
from tests.lora_models import ALL_PROJ
from tests.utils import assert_close

VISION_PROJ = "q_proj,k_proj,v_proj,out_proj,fc1,fc2"


@pytest.fixture
def pair(tmp_path, seed):
    return llava_pair(seed, tmp_path / "hf")


def _perturb(model, which=("lora_B", "multi_modal_projector")):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(w in name for w in which) and "original_module" not in name:
                p.add_(torch.randn_like(p) * 0.2)


def _hf_logits(hf, ids, pixels):
    return hf(input_ids=ids, pixel_values=pixels).logits


@torch.no_grad()
def _assert_same_logits(ours, hf_model, ids, pixels):
    """fastvlm's logits within a few times transformers' own fp32 error of the float64 truth."""
    want = _hf_logits(hf_model, ids, pixels)
    want64 = _hf_logits(copy.deepcopy(hf_model).double(), ids, pixels.double())
    assert_close(ours(ids, pixels), want64, baseline=want, name="logits")


def test_fastvlm_adapter_loads_in_peft_on_transformers(pair, tmp_path):
    hf, ours = pair
    hf_copy = copy.deepcopy(hf)  # PEFT wraps hf in place
    base = _hf_logits(hf, *llava_batch())
    apply_lora(ours, llm=ALL_PROJ, vision=VISION_PROJ, r=4, alpha=8, trainable="connector", rslora=True)
    _perturb(ours)
    save_adapter(ours, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["model.multi_modal_projector"]
    assert len(cfg["target_modules"]) == len(lora_layers(ours))
    peft_model = peft_load(hf, tmp_path / "adapter")
    ids, pixels = llava_batch()
    assert (_hf_logits(peft_model, ids, pixels) - base).abs().max() > 0.1  # the adapter does something
    _assert_same_logits(ours, peft_model, ids, pixels)
    # fastvlm's own load_adapter on the transformers model reads the same names
    theirs = load_adapter(hf_copy, tmp_path / "adapter")
    assert torch.equal(_hf_logits(theirs, ids, pixels), _hf_logits(peft_model, ids, pixels))


@pytest.mark.parametrize("target_modules", [["q_proj", "v_proj", "fc1", "down_proj"],
                                            r".*language_model.*\.(q_proj|o_proj)|.*vision_tower.*\.fc2"])
def test_peft_adapter_on_transformers_loads_in_fastvlm(pair, tmp_path, target_modules):
    from peft import LoraConfig, get_peft_model

    hf, ours = pair
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules,
                                               modules_to_save=["multi_modal_projector"])).eval()
    _perturb(peft_model)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    load_adapter(ours, tmp_path / "adapter")
    n_peft = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
    assert len(lora_layers(ours)) == n_peft and ours.lora_config.trainable == ["multi_modal_projector"]
    ids, pixels = llava_batch()
    _assert_same_logits(ours, peft_model, ids, pixels)


def _to_4x_layout(key):
    """A transformers 5 PEFT key as transformers 4.x PEFT wrote it."""
    for new, old in (("base_model.model.model.language_model.", "base_model.model.language_model.model."),
                     ("base_model.model.model.vision_tower.", "base_model.model.vision_tower.vision_model."),
                     ("base_model.model.model.multi_modal_projector.", "base_model.model.multi_modal_projector."),
                     ("base_model.model.lm_head.", "base_model.model.language_model.lm_head.")):
        if key.startswith(new):
            return old + key[len(new):]
    raise AssertionError(key)


def test_transformers_4x_layout_adapter_loads_in_fastvlm(pair, tmp_path):
    from peft import LoraConfig, get_peft_model

    hf, ours = pair
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "fc2"],
                                               modules_to_save=["multi_modal_projector", "lm_head"])).eval()
    _perturb(peft_model, ("lora_B", "multi_modal_projector", "lm_head"))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file({_to_4x_layout(k): v for k, v in load_file(path).items()}, path)
    load_adapter(ours, tmp_path / "adapter")
    assert sorted(ours.lora_config.trainable) == ["language_model.lm_head", "multi_modal_projector"]
    ids, pixels = llava_batch()
    _assert_same_logits(ours, peft_model, ids, pixels)


def test_round_trip_in_fastvlm_and_peft_on_fastvlm(pair, tmp_path):
    """fastvlm -> fastvlm through the transformers names, and PEFT wrapping a fastvlm.VLM
    (its ModulesToSaveWrapper around the projector) still encodes images."""
    from peft import LoraConfig, get_peft_model

    _, ours = pair
    fresh, plain = copy.deepcopy(ours), copy.deepcopy(ours)
    apply_lora(ours, llm="q_proj,v_proj", vision="fc1", r=4, alpha=8, trainable="connector")
    _perturb(ours)
    save_adapter(ours, tmp_path / "adapter")
    load_adapter(fresh, tmp_path / "adapter")
    ids, pixels = llava_batch()
    assert torch.equal(fresh(ids, pixels), ours(ids, pixels))
    peft_on_ours = get_peft_model(plain, LoraConfig(r=2, target_modules=["q_proj"],
                                                   modules_to_save=["multi_modal_projector"]))
    assert torch.isfinite(peft_on_ours(ids, pixels)).all()


@pytest.mark.parametrize("trainable", ["language_model", "vision_tower"])
def test_saving_a_trained_module_transformers_cannot_hold_fails(pair, tmp_path, trainable):
    _, ours = pair
    apply_lora(ours, llm="q_proj", r=2, alpha=2, trainable=trainable)
    with pytest.raises(ValueError, match="trainable:.*not one module"):
        save_adapter(ours, tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_adapter_for_modules_fastvlm_lacks_fails(pair, tmp_path):
    from peft import LoraConfig, get_peft_model

    hf, ours = pair
    peft_model = get_peft_model(hf, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["post_layernorm"]))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match="adapter:.*post_layernorm"):
        load_adapter(ours, tmp_path / "adapter")
    assert not lora_layers(ours)


def _hf_vision_model(kind):
    import transformers

    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7)
    if kind == "clip":
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(intermediate_size=48, **tiny))
    if kind == "siglip":
        return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(intermediate_size=48, **tiny))
    if kind == "dinov2":
        return transformers.Dinov2Model(transformers.Dinov2Config(mlp_ratio=2, **tiny))
    config = transformers.Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2, **tiny)
    return transformers.Dinov2WithRegistersModel(config)


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2", "dinov2_with_registers"])
def test_vision_names_map_both_ways_for_every_family(kind):
    """Every encoder parameter has its transformers name, and that name maps back: the
    one conversion table read in both directions."""
    from fastvlm.models import hf_vision
    from fastvlm.models.vision import VisionEncoder

    hf = _hf_vision_model(kind)
    config = hf_vision.config_from_hf(hf.config.to_dict())
    hf_names = {k.removeprefix("vision_model.") for k in hf.state_dict()}
    for name in VisionEncoder(config).state_dict():
        theirs = hf_vision.hf_name(name, config)
        assert theirs in hf_names, (name, theirs)
        assert hf_vision.fastvlm_name(theirs, config) == name
