"""fastvlm.integrations.transformers.patch on tiny random models of every family:
logits and every parameter gradient equal the unpatched eager model's, within the
error-analysis bound (float64 model = reference, unpatched fp32 eager = baseline),
unpadded, padded and packed; rules that matter are checked to matter (a wrong mask
moves the result past the bound)."""
from __future__ import annotations

import functools

import pytest
import torch

from fastvlm.integrations import hf_attention, hf_modules
from fastvlm.integrations.transformers import patch, unpatch
from tests import hf_patch_models as H
from tests.utils import assert_close, error_bound

FAMILIES = list(H.FAMILIES)
LENGTHS = {"unpadded": ((2, 3), (2, 3)), "padded": ((1, 2), (3, 3)), "packed": ((1, 2), (3, 3), (2, 2))}


def cast(inputs: dict, dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def qwen_positions(model, group):
    """Packed M-RoPE position ids [3, 1, N]: each sample's own, concatenated (3 rows,
    so a segment starts where all three are 0)."""
    rows = []
    for s in group:
        pos, _ = model.model.get_rope_index(s["input_ids"][None], s["mm_token_type_ids"][None],
                                            image_grid_thw=s.get("image_grid_thw"),
                                            video_grid_thw=s.get("video_grid_thw"))
        rows.append(pos)
    return torch.cat(rows, -1)


def inputs_for(name, model, group, layout):
    if layout == "packed":
        b = H.batch(group, "packed")
        if H.FAMILIES[name].kind == "qwen":
            b["position_ids"] = qwen_positions(model, group)
        return b
    return H.batch(group, "padded")


def forward_pieces(model, name, group, layout, separate=False):
    """Per-sample logits [n_i, V]: from one call on the layout, or (separate) one call
    per sample, the reference for a packed row."""
    dtype = next(model.parameters()).dtype
    if separate:
        return [model(**cast(H.batch([s], "padded"), dtype)).logits[0] for s in group]
    out = model(**cast(inputs_for(name, model, group, layout), dtype)).logits
    return [out[r, cols] for r, cols in H.live_positions(group, layout)]


def scalar(pieces, weights):
    return sum((p * w.to(p.dtype)).sum() for p, w in zip(pieces, weights))


def run(model, name, group, layout, weights, separate=False):
    """(logits of live tokens concatenated, {param name: grad}) of sum(logits * weights)."""
    model.zero_grad(set_to_none=True)
    pieces = forward_pieces(model, name, group, layout, separate)
    scalar(pieces, weights).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat(pieces).detach(), grads


def check_against_reference(name, seed, patched, group, layout, weights, wrong=None):
    """Patched fp32 vs the float64 unpatched eager model (reference) with the fp32 unpatched
    eager model as baseline. `wrong`: a callable giving logits of a deliberately wrong
    mask, which must land outside the bound."""
    ref_model = H.build(name, seed, torch.float64)
    base_model = H.build(name, seed, torch.float32)
    # padded and packed rows are referenced by each sample run alone: what padding and
    # packing must not change (and fp64 eager gives NaN on Gemma 3's padding-only windows)
    separate = layout != "unpadded"
    ref_logits, ref_grads = run(ref_model, name, group, layout, weights, separate)
    base_logits, base_grads = run(base_model, name, group, layout, weights, separate)
    got_logits, got_grads = run(patched, name, group, layout, weights)
    assert_close(got_logits, ref_logits, base_logits, torch.float32, name="logits")
    assert set(got_grads) == set(ref_grads), set(got_grads) ^ set(ref_grads)
    for key, ref in ref_grads.items():
        scale = float(ref.norm()) or float(ref_model.get_parameter(key).detach().norm())
        assert_close(got_grads[key], ref, base_grads[key], torch.float32, scale=scale, name=f"grad {key}")
    if wrong is not None:
        bad = wrong()
        err = float((bad.double() - ref_logits).norm())
        assert err > error_bound(base_logits, ref_logits, torch.float32), "the rule under test made no difference"


def patched_model(name, seed):
    model = H.build(name, seed, torch.float32)
    return patch(model)


def one_segment_logits(name, model, group):
    """The packed row's logits with its samples' positions but one segment (they see each other)."""
    b = inputs_for(name, model, group, "packed")
    b.pop("token_type_ids", None)  # one segment's prefix would not be one run
    with torch.no_grad():
        return model(**b, segment_ids=torch.zeros_like(b["input_ids"])).logits[0]


@pytest.mark.parametrize("layout", ["unpadded", "padded", "packed"])
@pytest.mark.parametrize("name", FAMILIES)
def test_patched_equals_eager(name, layout, seed):
    model = patched_model(name, seed)
    group = H.samples(name, model, seed + 1, LENGTHS[layout])
    gen = torch.Generator().manual_seed(seed + 2)
    weights = [torch.randn(len(s["input_ids"]), H.VOCAB, generator=gen, dtype=torch.float64) for s in group]

    wrong = None
    if layout == "packed":  # the same positions, but one segment: the samples see each other
        wrong = functools.partial(one_segment_logits, name, model, group)
    elif H.FAMILIES[name].kind in ("gemma3", "paligemma"):  # images / prefix attend causally only
        def wrong():
            b = inputs_for(name, model, group, layout)
            b.pop("token_type_ids")
            with torch.no_grad():
                out = model(**b).logits
            return torch.cat([out[r, c] for r, c in H.live_positions(group, layout)])
    check_against_reference(name, seed, model, group, layout, weights, wrong)


def test_qwen3_video_packed_with_images(seed):
    """A Qwen3-VL video (two temporal slices, each after its timestamp token, so its grid is
    split per slice by get_rope_index) packed between two image samples of other grids, with
    each sample's own M-RoPE ids: every sample's logits and all gradients as run alone."""
    model = patched_model("qwen3_vl", seed)
    gen = torch.Generator().manual_seed(seed + 1)
    group = [H.make_sample("qwen3_vl", model, gen, 1, 2, 0), H.qwen3_video_sample(model, gen, 2, 3),
             H.make_sample("qwen3_vl", model, gen, 2, 2, 2)]
    weights = [torch.randn(len(s["input_ids"]), H.VOCAB, generator=gen, dtype=torch.float64) for s in group]
    check_against_reference("qwen3_vl", seed, model, group, "packed", weights,
                            functools.partial(one_segment_logits, "qwen3_vl", model, group))


def test_onevision_multi_image_packed_with_single_images(seed):
    """LLaVA-OneVision: a two-image sample (base tiles only) packed between single-image
    samples (anyres grids, unpadded), `batch_num_images` per sample: every sample's logits
    and all gradients as run alone."""
    name = "llava_onevision"
    model = patched_model(name, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    group = [H.make_sample(name, model, gen, 1, 2, 0), H.onevision_multi_image_sample(model, gen, 2, 3),
             H.make_sample(name, model, gen, 2, 2, 2)]
    for s in (group[0], group[2]):
        s["batch_num_images"] = torch.tensor([1])
    weights = [torch.randn(len(s["input_ids"]), H.VOCAB, generator=gen, dtype=torch.float64) for s in group]
    check_against_reference(name, seed, model, group, "packed", weights,
                            functools.partial(one_segment_logits, name, model, group))


def test_packed_uses_one_fastvlm_call_per_layer(monkeypatch, seed):
    """The packed row goes through multimodal_attention in every layer (the sliding one with
    its window), one segment per sample, even though use_cache defaults to True in train mode."""
    model = patched_model("gemma3", seed).train()
    group = H.samples("gemma3", model, seed + 1, LENGTHS["packed"])
    layouts = []
    real = hf_attention.multimodal_attention
    monkeypatch.setattr(hf_attention, "multimodal_attention", lambda q, k, v, layout, **kw: (
        layouts.append(layout), real(q, k, v, layout, **kw))[1])
    model(**inputs_for("gemma3", model, group, "packed"))
    assert [lay.window for lay in layouts] == [model.config.text_config.sliding_window, None]
    for lay in layouts:
        assert int(lay.segment_ids[0].max()) == len(group) - 1 and lay.kind == "image_bidirectional"


def test_unpatch_restores_modules_and_outputs(seed):
    model = H.build("qwen2_vl", seed)
    group = H.samples("qwen2_vl", model, seed + 1)
    inputs = H.batch(group)
    before = model(**inputs).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    patch(model)
    assert model.config.text_config._attn_implementation == "fastvlm"
    assert type(model.model.visual.merger.mlp).__name__ == "HFFusedProjector"
    assert list(model.state_dict()) == list(state)
    unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert model.config.text_config._attn_implementation == "eager"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(model(**inputs).logits, before)
    with pytest.raises(ValueError, match="not patched"):
        unpatch(model)


def test_qwen3_mergers_run_fused(seed, monkeypatch):
    """Qwen3-VL's merger and deepstack merger run their MLP on fused_mlp (their numbers are
    test_patched_equals_eager's); connector=False and unpatch leave them as transformers has them."""
    model = H.build("qwen3_vl", seed)
    inputs = H.batch(H.samples("qwen3_vl", model, seed + 1))
    calls = []
    real = hf_modules.fused_mlp
    monkeypatch.setattr(hf_modules, "fused_mlp", lambda *a, **kw: (calls.append(a[0].shape), real(*a, **kw))[1])
    mergers = [model.model.visual.merger, *model.model.visual.deepstack_merger_list]
    patch(model, connector=False)
    model(**inputs)
    assert not calls and not any("forward" in m.__dict__ for m in mergers)
    unpatch(model)
    patch(model)
    model(**inputs)
    tokens = int(inputs["image_grid_thw"].prod(-1).sum()) // 4
    assert calls == [(tokens, 4 * 32)] * len(mergers)
    unpatch(model)
    assert not any("forward" in m.__dict__ for m in mergers)


def test_state_dict_keys_unchanged_and_loadable(seed):
    model = H.build("llava", seed)
    keys = list(model.state_dict())
    patch(model)
    assert list(model.state_dict()) == keys
    other = H.build("llava", seed + 1)
    patch(other)
    other.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("name", ["paligemma", "gemma3"])
def test_upstream_packed_masks_are_wrong_ours_are_not(name, seed):
    """transformers' own packed masks (no attention mask and use_cache=False, so it detects
    the packing from position_ids) let PaliGemma's prefix attend across samples and Gemma 3's
    sliding layers see another sample's tokens: the unpatched packed row differs from the
    samples run alone, the patched row does not."""
    base = H.build(name, seed)
    group = H.samples(name, base, seed + 1, LENGTHS["packed"])
    with torch.no_grad():
        ref = torch.cat(forward_pieces(H.build(name, seed, torch.float64), name, group, "packed", separate=True))
        alone = torch.cat(forward_pieces(base, name, group, "packed", separate=True))
        inputs = inputs_for(name, base, group, "packed")
        upstream = base(**inputs, use_cache=False).logits[0]
        ours = patch(base)(**inputs).logits[0]
    assert_close(ours, ref, alone, torch.float32, name="patched packed logits")
    assert float((upstream.double() - ref).norm()) > error_bound(alone, ref, torch.float32)


@pytest.mark.parametrize("layout", ["unpadded", "padded", "packed"])
def test_paligemma_prefix_in_several_runs(layout, seed):
    """token_type_ids whose prefix (0) is not one run, e.g. [0 ... 0, 1, 1, 0], which
    transformers accepts: every type-0 token sees every type-0 token of its sample, the rest
    is causal. No interval rule says that, so the forward runs on transformers' dense mask
    (with packed samples kept apart): the unpatched numbers, logits and gradients."""
    model = patched_model("paligemma", seed)
    group = H.samples("paligemma", model, seed + 1, ((1, 3), (2, 3), (1, 3))[: 3 if layout == "packed" else 2])
    for s in group:
        s["token_type_ids"] = s["token_type_ids"].clone()
        s["token_type_ids"][-1] = 0  # the last answer token joins the prefix
    gen = torch.Generator().manual_seed(seed + 2)
    weights = [torch.randn(len(s["input_ids"]), H.VOCAB, generator=gen, dtype=torch.float64) for s in group]

    def wrong():  # the same rows with the last token back in the suffix: it must matter
        b = inputs_for("paligemma", model, group, layout)
        b["token_type_ids"] = b["token_type_ids"].clone()
        for r, cols in H.live_positions(group, layout):
            b["token_type_ids"][r, cols.stop - 1] = 1
        with torch.no_grad():
            out = model(**b).logits
        return torch.cat([out[r, c] for r, c in H.live_positions(group, layout)])

    check_against_reference("paligemma", seed, model, group, layout, weights, wrong)


def test_segment_ids_that_cannot_apply_are_refused(seed):
    """segment_ids with a prepared (4-D) attention_mask, or continuing a filled cache, used to
    be dropped without a word (packed samples then attended to each other): both refused,
    naming the arguments."""
    model = patched_model("llava", seed).eval()
    group = H.samples("llava", model, seed + 1, LENGTHS["packed"])
    b = H.batch(group, "packed")
    seg = torch.cat([torch.full((len(s["input_ids"]),), i) for i, s in enumerate(group)])[None]
    n = seg.shape[1]
    with pytest.raises(ValueError, match="segment_ids: cannot be combined with a prepared attention_mask"):
        model(**b, attention_mask=torch.ones(1, 1, n, n, dtype=torch.bool).tril(), segment_ids=seg)
    with torch.no_grad():
        past = model(**b, segment_ids=seg, use_cache=True).past_key_values
    step = {"input_ids": torch.tensor([[3]]), "past_key_values": past, "position_ids": torch.tensor([[n]])}
    with pytest.raises(ValueError, match="segment_ids: packed segments apply to a forward from position 0"):
        model(**step, segment_ids=torch.zeros(1, 1, dtype=torch.long))


def test_bad_segment_ids_are_refused(seed):
    """Float segment ids, ids below -1, and a segment boundary inside an image's run of
    placeholder tokens (from segment_ids or from position_ids restarts): clear errors."""
    model = patched_model("llava", seed).eval()
    group = H.samples("llava", model, seed + 1, LENGTHS["packed"])
    b = H.batch(group, "packed")
    b.pop("position_ids")
    seg = torch.cat([torch.full((len(s["input_ids"]),), i) for i, s in enumerate(group)])[None]
    with pytest.raises(ValueError, match="segment_ids: expected an integer tensor, got dtype torch.float32"):
        model(**b, segment_ids=seg.float())
    with pytest.raises(ValueError, match=r"segment_ids: ids must be >= -1 \(-1 marks padding\), got -2"):
        model(**b, segment_ids=torch.where(seg == 1, -2, seg))
    image = (b["input_ids"][0] == H.IMAGE).nonzero().squeeze(1)
    split = int(image[1])  # a new segment from the image's second token on
    bad = torch.where(torch.arange(seg.shape[1]) >= split, seg + 1, seg)
    with pytest.raises(ValueError, match=f"segment_ids: a segment boundary inside a run of image tokens "
                                         f"\\(row 0, token {split}\\)"):
        model(**b, segment_ids=bad)
    positions = torch.cat([torch.arange(split), torch.arange(seg.shape[1] - split)])[None]
    with pytest.raises(ValueError, match="position_ids: a segment boundary inside a run of image tokens"):
        model(**b, position_ids=positions)
