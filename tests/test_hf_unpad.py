"""A packed loss forward of a patched transformers VLM runs its live tokens only
(fastvlm.integrations.hf_unpad): the decoder sees one row of the batch's live tokens, and
the loss and every gradient equal the padded forward's (float64, bound from plain PyTorch's
float32 error); forwards it does not apply to run as given. And a frozen vision tower is
not wrapped in checkpoints (fastvlm.integrations.hf_modules.checkpointed_forward)."""
from __future__ import annotations

import functools

import pytest
import torch

from fastvlm.data.hf_collate import HFPackedCollator
from fastvlm.integrations import hf_modules
from fastvlm.integrations import transformers as fv_hf
from fastvlm.integrations.hf_unpad import drop_padding
from fastvlm.integrations.transformers import patch
from tests import hf_patch_models as H
from tests.test_hf_trainable import FAMILIES, FLOAT32_INSIDE, items, loss_and_grads, model  # noqa: F401
from tests.utils import assert_close, assert_close_float64


def two_padded_rows(group) -> dict:
    """The items in two planned rows of one budget, the shorter row mostly padding."""
    lengths = [len(it["input_ids"]) for it in group]
    budget = max(sum(lengths[:-1]), lengths[-1]) + 5
    return HFPackedCollator(0, budget).collate_planned([group[:-1], group[-1:]])


def decoder_tokens(vlm) -> list[tuple[int, ...]]:
    """The [B, N] of every call of the decoder, recorded as they happen."""
    seen = []
    vlm.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True)
    return seen


def kept_padded(kwargs_model, kwargs, segment_ids):
    return kwargs, segment_ids


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_loss_forward_runs_live_tokens_only(items, name, seed, monkeypatch):  # noqa: F811
    batch = two_padded_rows(items[name])
    live = int(batch["attention_mask"].sum())
    assert batch["row_tokens"] - live >= 5
    got_model = model(name, seed, torch.float64)
    seen = decoder_tokens(got_model)
    got_loss, got_grads = loss_and_grads(got_model, [batch])
    assert seen == [(1, live)]
    monkeypatch.setattr(fv_hf, "drop_padding", kept_padded)  # the padded forward, as before
    ref_model = model(name, seed, torch.float64)
    seen = decoder_tokens(ref_model)
    ref_loss, ref_grads = loss_and_grads(ref_model, [batch])
    assert seen == [(2, batch["row_tokens"] // 2)]
    base_loss, base_grads = loss_and_grads(model(name, seed, torch.float32), [batch])
    close = functools.partial(assert_close, dtype=torch.float32) if name in FLOAT32_INSIDE else assert_close_float64
    close(got_loss[None], ref_loss[None], base_loss[None], name="loss", scale=float(ref_loss) * live)
    assert set(got_grads) == set(ref_grads)
    for key, ref in ref_grads.items():
        scale = float(ref.norm()) or float(ref_model.get_parameter(key).detach().norm())
        close(got_grads[key], ref, base_grads[key], name=f"grad {key}", scale=scale)


def test_forwards_it_does_not_apply_to_run_as_given(items, seed):  # noqa: F811
    """No positions, per-token outputs asked for, a padding token predicting a target, no
    padding at all: the inputs come back unchanged."""
    vlm = model("qwen2_5_vl", seed, torch.float32)
    batch = two_padded_rows(items["qwen2_5_vl"])
    inputs = vlm.batch_inputs(batch, "cpu")
    seg = inputs.pop("segment_ids")
    out, out_seg = drop_padding(vlm.hf, inputs, seg)
    assert out["input_ids"].shape == (1, batch["real_tokens"]) and out_seg.shape == (1, batch["real_tokens"])
    assert int(out_seg.max()) + 1 == batch["num_samples"]
    no_positions = {k: v for k, v in inputs.items() if k != "position_ids"}
    targeted_padding = {**inputs, "labels": torch.where(seg >= 0, inputs["labels"], 7)}
    no_padding = {**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])}
    cases = {"no position_ids": (no_positions, seg), "hidden states": ({**inputs, "output_hidden_states": True}, seg),
             "padding with a target": (targeted_padding, seg), "no segment_ids": (inputs, None),
             "no padding": (no_padding, torch.where(seg >= 0, seg, 0))}
    for case, (kwargs, segment_ids) in cases.items():
        out, out_seg = drop_padding(vlm.hf, kwargs, segment_ids)
        assert out is kwargs and out_seg is segment_ids, case


@pytest.mark.parametrize("name", ["qwen2_5_vl", "gemma3"])
def test_frozen_tower_runs_without_checkpoints(name, seed, monkeypatch):
    """A frozen tower on pixels records no graph: its layers run plain, not under the
    policy's checkpoint (whose dispatch mode would cost time on every op); a trainable one
    is checkpointed layer by layer."""
    calls = []

    def counting(fn, *args, **kwargs):
        calls.append(fn)
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(hf_modules, "checkpoint", counting)
    hf = patch(H.build(name, seed).train(), checkpointing="full")
    inputs = H.batch(H.samples(name, hf, seed + 1))
    hf.requires_grad_(False)
    hf.get_decoder().requires_grad_(True)
    hf(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert calls == []
    tower = hf.get_submodule(fv_hf.family_of(hf).vision)
    tower.requires_grad_(True)
    hf(**inputs, labels=inputs["input_ids"]).loss.backward()
    layers = [m for m in tower.modules() if hf_modules.checkpointed_forward in
              [getattr(m.__dict__.get("forward"), "func", None)]]
    assert len(calls) == len(layers) > 0
