"""Sliding-window layouts (AttentionLayout(window=w), Gemma 3's sliding layers): the mask is
the kind's mask with keys w or more positions before the query dropped, derived here
independently; the block maps (torch, C++) classify its tiles exactly; the reference and the
Triton kernels (interpreter) compute attention under it; the patched Gemma 3 runs its
sliding layers on fastvlm attention."""
from __future__ import annotations

import random

import pytest
import torch

from fastvlm.integrations import hf_attention
from fastvlm.ops import AttentionLayout
from fastvlm.ops.attention import attention_reference
from tests import hf_patch_models as H
from tests.layouts import all_kinds, random_metadata, tile_classes_from_dense
from tests.test_attention_triton import check_against_reference, make_inputs, run_kernels
from tests.test_hf_patch import LENGTHS, patched_model
from tests.test_hf_patch import check_against_reference as check_model


def windowed(rng, batch, n, kind, split, window):
    seg, img, pre = random_metadata(rng, batch, n, kind)
    plain = AttentionLayout(seg, img, pre, kind, split_softmax=split)
    return plain, AttentionLayout(seg, img, pre, kind, split_softmax=split, window=window)


def expected_dense(plain: AttentionLayout, window: int) -> torch.Tensor:
    pos = torch.arange(plain.seq_len)
    return plain.dense() & (pos[None, :] > pos[:, None] - window)[None]


@pytest.mark.parametrize("kind,split", all_kinds())
def test_window_mask_and_block_maps(kind, split, seed):
    rng = random.Random(seed)
    for _ in range(3):
        n, window = rng.randint(10, 90), rng.randint(1, 24)
        plain, layout = windowed(rng, 2, n, kind, split, window)
        want = expected_dense(plain, window)
        assert torch.equal(layout.dense(), want)
        assert layout.allowed_pairs() == int(want.sum())
        for bq, bk in ((16, 16), (16, 32), (8, 4)):
            classes = tile_classes_from_dense(want, bq, bk)
            for backend in ("reference", "cpp"):
                assert torch.equal(layout.block_map(bq, bk, backend=backend).tile_classes(), classes), backend
    # a window at least as long as every segment changes nothing: only then is it plain causal
    assert not layout.is_packed_causal or window >= layout.varlen_segments()[2]


@pytest.mark.parametrize("kind,split", all_kinds())
def test_with_window_derives_the_same_layout(kind, split, seed):
    """layout.with_window(w) is AttentionLayout(..., window=w) of the same metadata, built once
    per window and kept (every sliding layer of a forward shares it), and undone by None."""
    rng = random.Random(seed)
    window = rng.randint(1, 24)
    plain, layout = windowed(rng, 2, rng.randint(10, 90), kind, split, window)
    derived = plain.with_window(window)
    assert derived is plain.with_window(window) and plain.with_window(None) is plain
    assert (derived.window, derived.kind, derived.split_softmax) == (window, kind, split)
    assert torch.equal(derived.dense(), layout.dense())
    assert derived.with_window(None).window is None and torch.equal(derived.with_window(None).dense(), plain.dense())


def test_window_rejects_bad_values():
    seg = torch.zeros(1, 4, dtype=torch.int32)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="window"):
            AttentionLayout(seg, window=bad)
        with pytest.raises(ValueError, match="window"):  # True == 1 as a key of its cache: checked first
            AttentionLayout(seg, window=1).with_window(bad)


@pytest.mark.parametrize("kind,split", all_kinds())
def test_window_reference_attention(kind, split, seed):
    rng = random.Random(seed)
    plain, layout = windowed(rng, 2, rng.randint(20, 70), kind, split, rng.randint(2, 16))
    q, k, v = (torch.randn(2, h, layout.seq_len, 16, dtype=torch.float64) for h in (4, 2, 2))
    dense = attention_reference(q, k, v, layout, scale=0.25, impl="dense")
    blockwise = attention_reference(q, k, v, layout, scale=0.25, impl="blockwise", block=8)
    torch.testing.assert_close(blockwise, dense, rtol=1e-10, atol=1e-10)
    narrower = attention_reference(q, k, v, plain, scale=0.25, impl="dense")
    if not torch.equal(plain.dense(), layout.dense()):  # segments shorter than the window change nothing
        assert not torch.allclose(narrower, dense)


@pytest.mark.parametrize("kind,split", [("image_bidirectional", False), ("causal", False), ("mmca", True)])
def test_window_triton_kernels(kind, split, seed):
    rng = random.Random(seed)
    _, layout = windowed(rng, 2, 77, kind, split, rng.randint(3, 40))
    q, k, v, dout = make_inputs(2, 4, 2, 77, 32, torch.float32)
    results = run_kernels(q, k, v, dout, layout, 32 ** -0.5)
    check_against_reference(layout, q, k, v, dout, results, 32 ** -0.5)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_gemma3_sliding_layers_on_fastvlm_attention(layout, seed, monkeypatch):
    """Every Gemma 3 layer, sliding ones included, runs multimodal_attention, and the model
    equals the eager one (logits and every gradient, float64 reference)."""
    model = patched_model("gemma3", seed)
    group = H.samples("gemma3", model, seed + 1, LENGTHS[layout])
    windows = []
    real = hf_attention.multimodal_attention
    monkeypatch.setattr(hf_attention, "multimodal_attention", lambda q, k, v, lay, **kw: (
        windows.append(lay.window), real(q, k, v, lay, **kw))[1])
    gen = torch.Generator().manual_seed(seed + 2)
    weights = [torch.randn(len(s["input_ids"]), H.VOCAB, generator=gen, dtype=torch.float64) for s in group]
    check_model("gemma3", seed, model, group, layout, weights)
    assert sorted(windows, key=str) == sorted([None, model.config.text_config.sliding_window], key=str)
