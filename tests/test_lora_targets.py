"""Adapter targets per part of a VLM (llm= / vision=), "connector" as the projector's
name, and optimizer groups for what was adapted (fastvlm.VLM and transformers' LLaVA)."""
import pytest
import torch

from fastvlm.train.lora import apply_lora, lora_layers, tower_roots
from fastvlm.train.optim import param_groups
from fastvlm.train.quant import apply_qlora
from tests.llava_models import llava_pair
from tests.lora_models import ALL_PROJ, TinyVLM

VISION_PROJ = "q_proj,k_proj,v_proj,out_proj,fc1,fc2"
LLM_LINEARS = 7 * 2  # ALL_PROJ in each of the 2 decoder layers
VISION_LINEARS = 6 * 3  # VISION_PROJ in each of the 3 CLIP blocks


@pytest.fixture
def pair(tmp_path, seed):
    return llava_pair(seed, tmp_path)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("which", ["fastvlm", "transformers"])
def test_llm_targets_adapt_the_llm_only_and_connector_trains(pair, which):
    model = pair[0] if which == "transformers" else pair[1]
    roots = tower_roots(model)
    llm_root, vision_root = roots["llm"][0], roots["vision"][0]
    apply_lora(model, llm=ALL_PROJ, r=4, alpha=8, trainable="connector")
    layers = lora_layers(model)
    assert len(layers) == LLM_LINEARS and all(n.startswith(llm_root + ".") for n in layers)
    connector = roots["connector"][0]
    assert model.lora_config.trainable == [connector]
    assert {n for n in _trainable(model) if "lora_" not in n} == {
        n for n, _ in model.named_parameters() if n.startswith(connector + ".")}
    assert not any(n.startswith(vision_root + ".") for n in _trainable(model))
    assert model.lora_config.targets == sorted(layers)  # explicit: saved adapters name what was adapted


@pytest.mark.parametrize("which", ["fastvlm", "transformers"])
def test_vision_targets_reach_every_projection_of_the_tower(pair, which):
    model = pair[0] if which == "transformers" else pair[1]
    vision_root = tower_roots(model)["vision"][0]
    apply_lora(model, vision=VISION_PROJ, r=2, alpha=2)
    layers = lora_layers(model)
    assert len(layers) == VISION_LINEARS and all(n.startswith(vision_root + ".") for n in layers)
    assert {n.rpartition(".")[2] for n in layers} == set(VISION_PROJ.split(","))


def test_both_parts_and_regex_inside_a_part(pair):
    model = pair[1]
    apply_lora(model, llm="q_proj,v_proj", vision=r"blocks\.[01]\.attn\.(q|v)_proj", r=2, alpha=2)
    assert set(lora_layers(model)) == (
        {f"language_model.model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
        | {f"vision_tower.blocks.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")})


def test_param_groups_without_encoder_group_when_encoder_has_no_adapters(pair):
    model = pair[1]
    apply_lora(model, llm=ALL_PROJ, r=4, alpha=8, trainable="connector")
    groups = {g["name"]: g for g in param_groups(model, {"connector": 1e-3, "llm_adapters": 2e-4})}
    assert set(groups) == {"connector", "connector_no_decay", "llm_adapters"}
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)


def test_param_groups_still_require_an_encoder_lr_for_encoder_adapters(pair):
    model = pair[1]
    apply_lora(model, llm=ALL_PROJ, vision=VISION_PROJ, r=4, alpha=8, trainable="connector")
    with pytest.raises(ValueError, match="lrs:.*encoder_adapters"):
        param_groups(model, {"connector": 1e-3, "llm_adapters": 2e-4})
    groups = {g["name"]: g for g in param_groups(model, {"connector": 1e-3, "llm_adapters": 2e-4,
                                                          "encoder_adapters": 2e-5})}
    assert len(groups["encoder_adapters"]["params"]) == 2 * VISION_LINEARS


def test_qlora_takes_part_targets(pair):
    model = pair[1]
    apply_qlora(model, llm="q_proj,down_proj", r=2, alpha=4, trainable="connector", compute_dtype="fp32")
    layers = lora_layers(model)
    assert len(layers) == 4 and all(m.quantized and n.startswith("language_model.") for n, m in layers.items())
    assert model.multi_modal_projector[0].weight.requires_grad


@pytest.mark.parametrize("kwargs, arg", [
    (dict(llm="q_proj"), "llm:.*no llm part"),
    (dict(vision="no_such_proj"), "vision:.*no_such_proj"),
    (dict(vision="q_proj["), "vision:.*regex"),
    (dict(), "targets:.*llm="),
    (dict(targets="q_proj", trainable="language_model"), "trainable:"),
])
def test_part_target_errors_name_the_argument(kwargs, arg):
    model = TinyVLM()  # a vision_tower and a connector, no language_model
    with pytest.raises(ValueError, match=arg):
        apply_lora(model, **kwargs)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_tiny_vlm_keeps_its_own_connector_module():
    model = TinyVLM()
    apply_lora(model, vision=r"[02]", r=2, alpha=2, trainable="connector")
    assert set(lora_layers(model)) == {"vision_tower.0", "vision_tower.2"}
    assert model.lora_config.trainable == ["connector"]
    assert torch.is_tensor(model(torch.randn(2, 12)))
