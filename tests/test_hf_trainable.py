"""fastvlm.integrations.hf_trainable.HFVLM through the batch path the trainer uses
(HFProcessorDataset -> HFPackedCollator / HFPaddedCollator -> batch_inputs -> forward):
per family, a packed row's loss and every parameter gradient equal those of the samples
run one at a time (float64, bound from plain PyTorch's float32 error); the rules that
matter (Qwen's per-sample M-RoPE) are checked to matter; parameter groups, final hidden
states + head, save / load."""
from __future__ import annotations

import functools
import json
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from fastvlm.data.formats import read_samples
from fastvlm.data.hf_collate import HFPackedCollator, HFPaddedCollator
from fastvlm.data.hf_processor import HFProcessorDataset
from fastvlm.integrations.hf_blank_image import blank_image_term
from fastvlm.integrations.hf_load import load_patched
from fastvlm.integrations.hf_trainable import HFVLM
from fastvlm.integrations.transformers import patch
from tests import hf_patch_models as H
from tests import hf_processors as P
from tests.test_hf_data import IMAGE_SIZES, RECORDS, usable
from tests.utils import assert_close, assert_close_float64, error_bound

# the families tests/hf_processors.py builds a processor for here (SmolVLM's needs num2words)
FAMILIES = [n for n in H.FAMILIES if P.buildable(n)]
# Gemma's RMSNorm computes in float32 whatever the model's dtype, so a float64 Gemma 3 /
# PaliGemma carries float32 rounding (its weight gradients sum over tokens in float32):
# bounded by plain PyTorch's float32 error there, float64's elsewhere.
FLOAT32_INSIDE = {"gemma3", "paligemma"}


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    """family -> the items of RECORDS through its processor (model-independent)."""
    root = tmp_path_factory.mktemp("hftrain")
    P.write_images(root / "img", IMAGE_SIZES, seed=1)
    (root / "data.json").write_text(json.dumps(RECORDS))
    out = {}
    for name in FAMILIES:
        ds = HFProcessorDataset(read_samples(root / "data.json"), root / "img", P.build_processor(name))
        out[name] = [ds[i] for i in usable(name)]
    return out


def model(name, seed, dtype):
    """The family's tiny model, patched, in HFVLM. Matrices transformers initialises to zero
    (Gemma 3's mm_input_projection_weight, which would make every image invisible) are
    drawn at random, so that image order and content reach the loss."""
    hf = H.build(name, seed, torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / p.shape[0] ** 0.5)
    return HFVLM(patch(hf.to(dtype)))


def inputs_of(vlm, batch) -> dict:
    """batch_inputs without the labels: the forward gives the model's output (logits)."""
    inputs = vlm.batch_inputs(batch, "cpu")
    del inputs["labels"]
    return inputs


def loss_and_grads(vlm, batches):
    """The mean loss over the supervised tokens of all `batches` (each batch's mean weighted
    by its token count) and every parameter's gradient of it."""
    vlm.zero_grad(set_to_none=True)
    total = sum(b["supervised_tokens"] for b in batches)
    loss = sum(vlm(**vlm.batch_inputs(b, "cpu")) * (b["supervised_tokens"] / total) for b in batches)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in vlm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("name", FAMILIES)
def test_batch_equals_samples_one_at_a_time(items, name, layout, seed):
    group = items[name]
    collate = HFPackedCollator(0, sum(len(it["input_ids"]) for it in group) + 3) if layout == "packed" \
        else HFPaddedCollator(0)
    batch = collate(group)
    alone = [HFPaddedCollator(0)([it]) for it in group]
    got_loss, got_grads = loss_and_grads(model(name, seed, torch.float64), [batch])
    ref_model = model(name, seed, torch.float64)
    ref_loss, ref_grads = loss_and_grads(ref_model, alone)
    base_loss, base_grads = loss_and_grads(model(name, seed, torch.float32), alone)
    close = functools.partial(assert_close, dtype=torch.float32) if name in FLOAT32_INSIDE else assert_close_float64
    close(got_loss[None], ref_loss[None], base_loss[None], name="loss",
          scale=float(ref_loss) * batch["supervised_tokens"])
    assert set(got_grads) == set(ref_grads)
    for key, ref in ref_grads.items():
        scale = float(ref.norm()) or float(ref_model.get_parameter(key).detach().norm())
        close(got_grads[key], ref, base_grads[key], name=f"grad {key}", scale=scale)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_positions_are_each_samples_own_mrope(items, name, seed):
    """The packed row's positions are get_rope_index of each sample alone; 1-D restarting
    positions instead (what a text-only packer gives) move the loss past the bound."""
    group = items[name]
    batch = HFPackedCollator(0, sum(len(it["input_ids"]) for it in group))(group)
    vlm = model(name, seed, torch.float64)
    inputs = inputs_of(vlm, batch)
    start = 0
    for it in group:
        n = len(it["input_ids"])
        own, _ = vlm.hf.model.get_rope_index(it["input_ids"][None], it["token_inputs"]["mm_token_type_ids"][None],
                                             it["vision_inputs"].get("image_grid_thw"))
        assert torch.equal(inputs["position_ids"][:, 0, start:start + n], own[:, 0])
        start += n
    live = batch["attention_mask"].bool()
    with torch.no_grad():
        right = vlm(**inputs).logits[live]
        wrong = vlm(**{**inputs, "position_ids": batch["position_ids"]}).logits[live]
        base = model(name, seed, torch.float32)(**inputs).logits[live]
    assert float((wrong - right).norm()) > error_bound(base, right, torch.float32)


@pytest.mark.parametrize("name", FAMILIES)
def test_final_hidden_and_head_give_the_models_logits(items, name, seed):
    """head(final_hidden) is the unpatched-path logits of the same packed inputs, and the
    fused loss is their cross-entropy on the shifted labels."""
    group = items[name]
    batch = HFPackedCollator(0, sum(len(it["input_ids"]) for it in group) + 2)(group)
    vlm = model(name, seed, torch.float64)
    inputs = inputs_of(vlm, batch)
    with torch.no_grad():
        logits = vlm(**inputs).logits
        hidden = vlm.final_hidden(**inputs)
        from_head = vlm.output_head()(hidden)
        loss = vlm(**inputs, labels=batch["labels"])
    live = batch["attention_mask"].bool()
    assert hidden.shape[:2] == batch["input_ids"].shape
    torch.testing.assert_close(from_head[live], logits[live], rtol=0, atol=1e-12)
    shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), shifted.flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_parameter_groups_partition_the_model(name, seed):
    vlm = model(name, seed, torch.float32)
    groups = vlm.parameter_groups()
    names = {id(p): n for n, p in vlm.hf.named_parameters()}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(names)
    assert all(groups.values()), {k: len(v) for k, v in groups.items()}
    by_group = {g: {names[id(p)] for p in ps} for g, ps in groups.items()}
    # Idefics3 / SmolVLM name their decoder text_model, their tower vision_model, their
    # pixel-shuffle projection connector
    assert all("language_model" in n or "text_model" in n or "lm_head" in n for n in by_group["llm"])
    assert all(n.startswith(("model.vision_tower", "model.visual", "model.vision_model")) and "merger" not in n
               for n in by_group["vision"])
    # Qwen3-VL's deepstack_merger_list is connector too
    assert all("projector" in n or "merger" in n or "mm_" in n or "image_newline" in n
               or n.startswith("model.connector.") for n in by_group["connector"])


@pytest.mark.parametrize("name", FAMILIES)
def test_blank_image_runs_what_an_image_runs(items, name, seed):
    """hf_blank_image (what a text-only training micro-batch adds under FSDP) on the family's
    minimal input: exactly 0, with zero gradients on exactly the parameters outside the LLM
    that a sample's image (through the family's processor) gives gradients to: the same
    tower blocks and projector, so the same FSDP gathers and gradient reductions."""
    vlm = model(name, seed, torch.float32)
    item = next(it for it in items[name] if it["num_images"] == 1)
    vlm(**vlm.batch_inputs(HFPaddedCollator(0)([item]), "cpu")).backward()
    llm = {id(p) for p in vlm.parameter_groups()["llm"]}
    image_path = {n for n, p in vlm.named_parameters() if p.grad is not None and id(p) not in llm}
    vlm.zero_grad(set_to_none=True)
    term = blank_image_term(vlm.hf)
    term.backward()
    grads = {n: p.grad for n, p in vlm.named_parameters() if p.grad is not None}
    assert term.item() == 0 and image_path and set(grads) == image_path
    assert not any(g.any() for g in grads.values())


def test_save_and_load_round_trip(items, tmp_path, seed):
    """save_pretrained writes the family's own format; loading it (by the config's class,
    patched) gives the same loss."""
    vlm = model("qwen2_vl", seed, torch.float64)
    batch = HFPaddedCollator(0)(items["qwen2_vl"])
    vlm.save_pretrained(tmp_path / "out")
    again = HFVLM.from_pretrained(tmp_path / "out", torch.float64)
    with torch.no_grad():
        assert torch.equal(again(**again.batch_inputs(batch, "cpu")), vlm(**vlm.batch_inputs(batch, "cpu")))


def test_refusals(tmp_path, seed):
    with pytest.raises(ValueError, match="model: not patched by fastvlm"):
        HFVLM(H.build("llava", seed))
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in H.LLAMA.items() if k != "model_type"})).save_pretrained(
        tmp_path / "llama")
    with pytest.raises(ValueError, match=r"path: the checkpoint is a LlamaForCausalLM .*supported: .*"
                                         r"LlavaForConditionalGeneration"):
        load_patched(tmp_path / "llama", torch.float32)


def test_peft_wrapped_model(items, seed):
    """HFVLM over a PeftModel (LoRA on the decoder's attention): the same inputs and, at
    initialisation (B = 0), the same loss; the adapters train and sit in the llm group."""
    plain = model("qwen2_vl", seed, torch.float64)
    wrapped = HFVLM(get_peft_model(model("qwen2_vl", seed, torch.float64).model,
                                   LoraConfig(r=2, target_modules=["q_proj", "v_proj"])))
    batch = HFPackedCollator(0, sum(len(it["input_ids"]) for it in items["qwen2_vl"]))(items["qwen2_vl"])
    inputs = inputs_of(wrapped, batch)
    assert inputs.keys() == inputs_of(plain, batch).keys()
    loss = wrapped(**inputs, labels=batch["labels"])
    with torch.no_grad():
        torch.testing.assert_close(loss, plain(**inputs, labels=batch["labels"]), rtol=1e-14, atol=0)
    loss.backward()
    lora = {id(p) for n, p in wrapped.named_parameters() if "lora_" in n}
    assert lora and all(p.grad is not None for n, p in wrapped.named_parameters() if "lora_B" in n)
    assert lora <= {id(p) for p in wrapped.parameter_groups()["llm"]}
    llm = re.compile(wrapped.GROUP_PATTERNS["llm"])
    assert all(llm.fullmatch(n) for n, p in wrapped.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("name", list(H.FAMILIES))
def test_group_patterns_are_the_parameter_groups(name, seed):
    """GROUP_PATTERNS (first match wins, what the optimizer reads) put each parameter in the
    group parameter_groups() does."""
    vlm = model(name, seed, torch.float32)
    want = {id(p): g for g, ps in vlm.parameter_groups().items() for p in ps}
    compiled = {g: re.compile(p) for g, p in vlm.GROUP_PATTERNS.items()}
    got = {id(p): next(g for g, rx in compiled.items() if rx.fullmatch(n)) for n, p in vlm.named_parameters()}
    assert got == want
