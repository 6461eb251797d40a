"""supported_families() and load_patched(): tiny models saved to a directory load with
their own transformers class, patched, with the unpatched model's logits; anything else
is a clear error naming the argument (and, for a class, the supported list)."""
from __future__ import annotations

import pytest
import torch

from fastvlm.integrations.hf_load import load_patched
from fastvlm.integrations.transformers import UnsupportedModelError, family_of, patch_notes, supported_families
from tests import hf_patch_models as H
from tests.test_hf_patch import cast
from tests.utils import assert_close


def test_supported_families_are_the_tested_ones(seed):
    """Every supported class has a tiny model in tests/hf_patch_models.py (and so every
    parametrised patch test), and every tiny model's class is listed, with its model_type."""
    listed = {f.class_name: f for f in supported_families()}
    built = {}
    for name in H.FAMILIES:
        model = H.build(name, seed)
        built[type(model).__name__] = model
        assert family_of(model).name == listed[type(model).__name__].name
    assert set(listed) == set(built)
    for cls, model in built.items():
        assert listed[cls].model_type == model.config.model_type
    assert len({f.name for f in listed.values()}) == len(listed)


@pytest.mark.parametrize("name", ["qwen3_vl", "idefics3", "smolvlm", "llava_onevision"])
def test_load_patched_equals_unpatched(name, seed, tmp_path):
    H.build(name, seed).save_pretrained(tmp_path)
    model = load_patched(tmp_path, torch.float32)
    assert "_fastvlm_patch" in model.__dict__ and type(model).__name__ in {f.class_name for f in supported_families()}
    assert model.config.get_text_config()._attn_implementation == "fastvlm"
    inputs = H.batch(H.samples(name, model, seed + 1, ((2, 3), (3, 1))))
    with torch.no_grad():
        got = model(**inputs).logits
        ref = H.build(name, seed, torch.float64).eval()(**cast(inputs, torch.float64)).logits
        base = H.build(name, seed).eval()(**inputs).logits
    assert_close(got, ref, base, torch.float32, name="loaded patched logits")


def test_load_patched_dtype_and_options(seed, tmp_path):
    H.build("llava_onevision", seed).save_pretrained(tmp_path)
    model = load_patched(tmp_path, "bfloat16", connector=False, checkpointing=None)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert type(model.model.multi_modal_projector).__name__ == "LlavaOnevisionMultiModalProjector"
    assert not patch_notes(model)
    fused = load_patched(tmp_path, torch.float32)
    assert type(fused.model.multi_modal_projector).__name__ == "HFFusedProjector"


def test_load_patched_refuses_bad_input(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = tmp_path / "llm"
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in H.LLAMA.items() if k != "model_type"})).save_pretrained(llm)
    with pytest.raises(UnsupportedModelError, match=r"path: the checkpoint is a LlamaForCausalLM \(model_type "
                                                    r"'llama'\).*supported: .*Qwen3VLForConditionalGeneration "
                                                    r"\(Qwen3-VL\).*SmolVLMForConditionalGeneration"):
        load_patched(llm, torch.float32)
    with pytest.raises(FileNotFoundError, match="path: .*missing is not a transformers model directory"):
        load_patched(tmp_path / "missing", torch.float32)
    with pytest.raises(ValueError, match="dtype: expected one of float32, float16, bfloat16, float64"):
        load_patched(llm, "fp8")
    with pytest.raises(ValueError, match="patch_options: unknown option.* vision_lora; patch.. takes attention, "
                                         "connector, checkpointing, fused_loss"):
        load_patched(llm, torch.float32, vision_lora=True)
