"""LoRA: LoRALinear, apply_lora, merge/unmerge, PEFT-format adapters (both directions)."""
import copy
import json
import math
import os

import pytest
import torch
from torch import nn

from fastvlm.train.lora import (
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_layers,
    lora_parameter_count,
    merge,
    save_adapter,
    unmerge,
)
from tests.lora_models import ALL_PROJ, TinyVLM, randomize_adapters, tiny_llama
from tests.utils import assert_close


def float64_logits(model, ids):
    return copy.deepcopy(model).double()(ids).logits


def test_lora_linear_matches_float64_formula(seed):
    base = nn.Linear(37, 29)
    layer = LoRALinear(base, r=5, alpha=7.0)
    assert torch.equal(layer.lora_B, torch.zeros(29, 5))  # fresh adapter is a no-op
    bound = 1 / math.sqrt(37)  # kaiming_uniform(a=sqrt(5)) on [r, in]
    assert 0 < layer.lora_A.abs().max() <= bound
    layer.lora_B.data.normal_()
    x = torch.randn(3, 4, 37)

    def formula(x, w, b, a, bb):
        return x @ w.T + b + (7.0 / 5) * (x @ a.T) @ bb.T
    params = (base.weight, base.bias, layer.lora_A, layer.lora_B)
    want = formula(x.double(), *(p.detach().double() for p in params))
    assert_close(layer(x), want, formula(x, *(p.detach() for p in params)))


def test_rslora_scaling():
    assert LoRALinear(nn.Linear(8, 8), r=16, alpha=8.0, rslora=True).scaling == pytest.approx(2.0)
    assert LoRALinear(nn.Linear(8, 8), r=16, alpha=8.0).scaling == pytest.approx(0.5)


def test_apply_lora_freezes_and_counts_llama():
    model = tiny_llama(seed=0)  # structure only: the weights do not matter
    apply_lora(model, ALL_PROJ, r=4, alpha=8, trainable=["lm_head"])
    c = model.config
    h, i, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = 4 * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))
    expected_lora = c.num_hidden_layers * per_layer
    assert lora_parameter_count(model) == expected_lora
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == expected_lora + c.vocab_size * h
    assert all("lora_" in n or n.startswith("lm_head.") for n in trainable)
    assert len(lora_layers(model)) == 7 * c.num_hidden_layers


def test_regex_targets_and_trainable_connector():
    model = TinyVLM()
    apply_lora(model, r"vision_tower\.[02]|q_proj", r=2, alpha=4, trainable="connector")
    assert set(lora_layers(model)) == {"vision_tower.0", "vision_tower.2", "q_proj"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "lora_" not in n} == {f"connector.{k}.{w}" for k in (0, 2)
                                                         for w in ("weight", "bias")}
    assert not model.down_proj.weight.requires_grad and not model.norm.weight.requires_grad


def test_regex_trainable_saves_outermost_module_names():
    model = TinyVLM()
    apply_lora(model, "q_proj", r=2, alpha=4, trainable=r"connector(\.\d+)?")
    assert model.lora_config.trainable == ["connector"]
    assert all(p.requires_grad for p in model.connector.parameters())


@pytest.mark.parametrize("kwargs, arg", [
    (dict(targets="q_proj", r=0), "r:"),
    (dict(targets="q_proj", r=-2), "r:"),
    (dict(targets="q_proj,nonexistent_proj", r=4), "targets:.*nonexistent_proj"),
    (dict(targets="connector", r=4), "targets:.*nn.Linear"),
    (dict(targets="q_proj", r=4, trainable="projector_xyz"), "trainable:.*projector_xyz"),
    (dict(targets="q_proj", r=4, alpha=0), "alpha:"),
    (dict(targets="q_proj", r=4, trainable=r"conn.*tor\.[5-9]"), "trainable:"),
    (dict(targets="q_proj[", r=4), "targets:.*regex"),
    (dict(targets=[], r=4), "targets:"),
])
def test_bad_config_raises_naming_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        apply_lora(TinyVLM(), **kwargs)


def test_merge_unmerge_round_trip(seed):
    model = TinyVLM().eval()
    apply_lora(model, "q_proj,down_proj", r=3, alpha=6)
    randomize_adapters(model)
    x = torch.randn(5, 12)
    lora = model.q_proj
    w0 = lora.base_layer.weight.detach().clone()
    y, y64 = model(x), copy.deepcopy(model).double()(x.double())  # y: unmerged fp32, the baseline
    merge(model)
    assert lora.merged and not torch.equal(lora.base_layer.weight, w0)
    assert_close(model(x), y64, y, name="merged")
    unmerge(model)
    # W + ΔW - ΔW in fp32 is W up to two roundings: bound by that plain torch expression
    delta = (lora.lora_B @ lora.lora_A).detach() * lora.scaling
    assert_close(lora.base_layer.weight, w0, (w0 + delta) - delta, name="unmerged weight")
    assert_close(model(x), y64, y, name="unmerged")


def test_save_load_own_format(tmp_path, seed):
    model = TinyVLM().eval()
    apply_lora(model, "q_proj,down_proj", r=3, alpha=6, trainable="connector", rslora=True)
    randomize_adapters(model)
    with torch.no_grad():
        model.connector[0].weight.add_(1.0)
    save_adapter(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp left
    fresh = TinyVLM().eval()
    # same frozen base as `model`; adapter and connector differ until loaded
    base_sd = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    fresh.load_state_dict(base_sd)
    with torch.no_grad():
        fresh.connector[0].weight.zero_()
    load_adapter(fresh, str(tmp_path))
    x = torch.randn(4, 12)
    assert torch.equal(fresh(x), model(x))  # the same weights, exactly
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_rslora"] is True


def _peft_model(model, **kw):
    from peft import LoraConfig, get_peft_model
    return get_peft_model(model, LoraConfig(**kw))


def test_peft_loads_our_adapter(tmp_path, seed):
    from peft import PeftModel

    ours = tiny_llama(seed)
    ref = tiny_llama(seed)
    apply_lora(ours, ALL_PROJ, r=4, alpha=16, trainable="lm_head", rslora=True)
    randomize_adapters(ours)
    with torch.no_grad():
        ours.lm_head.weight.mul_(1.5)
    save_adapter(ours, str(tmp_path))
    peft_model = PeftModel.from_pretrained(ref, str(tmp_path)).eval()
    ids = torch.randint(0, 128, (2, 9))
    want = peft_model(ids).logits  # PEFT in fp32: the baseline
    assert (want - tiny_llama(seed)(ids).logits).abs().max() > 1e-2  # the adapter does something
    assert_close(ours(ids).logits, float64_logits(peft_model, ids), want)


def test_we_load_peft_adapter(tmp_path, seed):
    peft_model = _peft_model(tiny_llama(seed), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             modules_to_save=["lm_head"]).eval()
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(str(tmp_path))
    ours = load_adapter(tiny_llama(seed), str(tmp_path))
    assert set(lora_layers(ours)) == {f"model.layers.{i}.{m}" for i in range(2)
                                      for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    ids = torch.randint(0, 128, (2, 9))
    assert_close(ours(ids).logits, float64_logits(peft_model, ids), peft_model(ids).logits)


def test_load_adapter_rejects_wrong_model(tmp_path):
    model = TinyVLM()
    apply_lora(model, "q_proj", r=2, alpha=2)
    save_adapter(model, str(tmp_path))
    with pytest.raises(ValueError, match="targets:"):
        load_adapter(nn.Sequential(nn.Linear(3, 3)), str(tmp_path))
