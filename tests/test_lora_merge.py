"""Merging adapters gives a plain model that saves and loads (fastvlm.VLM and transformers)."""
import copy

import pytest
import torch

from fastvlm.models.vlm import VLM
from fastvlm.train.lora import apply_lora, lora_layers, merge, merge_and_unload
from fastvlm.train.quant import apply_qlora
from tests.llava_models import llava_batch, llava_pair
from tests.lora_models import ALL_PROJ, TinyVLM, randomize_adapters, tiny_llama
from tests.utils import assert_close


def _adapted_vlm(seed, tmp_path):
    _, model = llava_pair(seed, tmp_path / "hf")
    apply_lora(model, ALL_PROJ + ",out_proj,fc1,fc2", r=4, alpha=8, trainable="multi_modal_projector")
    randomize_adapters(model)
    return model


def _plain_keys(model):
    return {k.replace(".base_layer", "") for k in model.state_dict() if "lora_" not in k}


def test_merged_vlm_saves_and_loads_with_equal_logits(seed, tmp_path):
    model = _adapted_vlm(seed, tmp_path)
    ids, pixels = llava_batch()
    want = model(ids, pixels)
    want64 = copy.deepcopy(model).double()(ids, pixels.double())
    keys = _plain_keys(model)
    merged = merge_and_unload(model)
    assert not lora_layers(merged) and set(merged.state_dict()) == keys
    got = merged(ids, pixels)
    # x(W + sBA) rounds differently from xW + s(xA)B: within a few times fp32's own error
    assert_close(got, want64, baseline=want, name="merged logits")
    merged.save_pretrained(tmp_path / "merged")
    again = VLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(again(ids, pixels), got)  # the same weights: bit-identical


def test_saving_a_model_with_adapters_names_the_fix(seed, tmp_path):
    model = _adapted_vlm(seed, tmp_path)
    merge(model)  # in place: the LoRA layers (and their keys) stay
    with pytest.raises(ValueError, match="model: has LoRA layers.*merge_and_unload"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_merge_and_unload_transformers_round_trip(seed, tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_llama(seed=seed % 1000)
    keys = set(model.state_dict())
    apply_lora(model, ALL_PROJ, r=4, alpha=8)
    randomize_adapters(model)
    ids = torch.randint(0, 128, (2, 9))
    want = model(ids).logits
    merged = merge_and_unload(model)
    assert set(merged.state_dict()) == keys and getattr(merged, "lora_config", None) is None
    torch.testing.assert_close(merged(ids).logits, want, rtol=1e-4, atol=1e-5)
    merged.save_pretrained(tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(again(ids).logits, merged(ids).logits)
    apply_lora(merged, "q_proj", r=2, alpha=2)  # a plain model again: adapters can be added anew


def test_merge_and_unload_refuses_nf4_bases():
    model = TinyVLM()
    apply_qlora(model, "q_proj", r=2, alpha=2)
    with pytest.raises(ValueError, match="model: LoRA layers.*NF4"):
        merge_and_unload(model)
    assert lora_layers(model)  # left as it was
