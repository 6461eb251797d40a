"""Reference multimodal_attention vs float64 SDPA with the dense mask, values and gradients."""
import random

import pytest
import torch
import torch.nn.functional as F

from fastvlm.ops import AttentionLayout, multimodal_attention
from fastvlm.ops.attention import attention_reference
from tests.layouts import all_kinds, attention_grads_in_dtype, attention_in_dtype, random_layout
from tests.utils import assert_close, assert_close_float64


def _inputs(b, hq, hkv, n, d, dtype=torch.float64):
    q = torch.randn(b, hq, n, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, n, d, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, n, d, dtype=dtype, requires_grad=True)
    return q, k, v


def _sdpa_branch(q, k, v, mask, scale):
    """float64 SDPA restricted to rows that have a key (SDPA gives NaN on empty rows)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    live = mask.any(-1)  # [B, N]
    safe = mask | ~live[..., None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe[:, None], scale=scale)
    return torch.where(live[:, None, :, None], out, 0)


def _expected(q, k, v, layout, scale):
    masks = layout.dense_split() if layout.split_softmax else (layout.dense(),)
    return sum(_sdpa_branch(q, k, v, m, scale) for m in masks)


def _grads(out, seed_grad, *xs):
    return torch.autograd.grad(out, xs, seed_grad)


def _in_float32(q, k, v, layout, scale, seed_grad):
    """Plain PyTorch attention on float32 copies, and its gradients: the float32 error that
    bounds two float64 computations' difference (see assert_close_float64)."""
    return attention_grads_in_dtype(*(t.detach().float() for t in (q, k, v)), seed_grad.float(), layout, scale)


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
@pytest.mark.parametrize("kind,split", all_kinds())
def test_reference_matches_sdpa_float64(impl, kind, split, seed):
    rng = random.Random(seed)
    for hq, hkv in ((4, 4), (4, 2), (3, 1)):
        n = rng.randint(20, 90)
        layout = random_layout(rng, 2, n, kind, split)
        d = rng.choice([8, 16, 24])
        q, k, v = _inputs(2, hq, hkv, n, d)
        scale = d ** -0.5
        out = attention_reference(q, k, v, layout, scale=scale, impl=impl, block=16)
        ref = _expected(q, k, v, layout, scale)
        g = torch.randn_like(out)
        got = (out, *_grads(out, g, q, k, v))
        want = (ref, *_grads(ref, g, q, k, v))
        for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, want, _in_float32(q, k, v, layout, scale, g)):
            assert_close_float64(a, b, c, name=f"{name} ({hq}/{hkv} heads)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_low_precision_inputs(dtype, seed):
    """Half inputs are computed in fp32 and returned in their own dtype: within a few times
    what plain fp32 attention rounded to that dtype is off by (for fp32 inputs: fp32's own
    error), with fp32's floor: the result is one rounding of an fp32 value."""
    rng = random.Random(seed)
    layout = random_layout(rng, 1, 77, "image_bidirectional")
    q, k, v = (t.detach() for t in _inputs(1, 2, 2, 77, 32))
    for impl in ("dense", "blockwise"):
        out = attention_reference(q.to(dtype), k.to(dtype), v.to(dtype), layout, impl=impl, block=32)
        assert out.dtype == dtype
        ref = _expected(q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double(), layout, 32 ** -0.5)
        fp32 = attention_in_dtype(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), layout, 32 ** -0.5)
        assert_close(out, ref, fp32.to(dtype), torch.float32, name=impl)


def test_rows_without_keys_give_zero_and_no_nan():
    # Padding rows, and an mmca split-softmax text query with no earlier image key.
    seg = torch.tensor([[0, 0, 0, 0, -1, -1]])
    img = torch.tensor([[-1, 0, 0, -1, -1, -1]])
    layout = AttentionLayout(seg, img, kind="mmca", split_softmax=True)
    for impl in ("dense", "blockwise"):
        q, k, v = _inputs(1, 2, 2, 6, 8)
        out = attention_reference(q, k, v, layout, impl=impl, block=4)
        assert torch.isfinite(out).all()
        assert torch.all(out[0, :, 4:] == 0)
        out.sum().backward()
        for t in (q, k, v):
            assert torch.isfinite(t.grad).all()
        assert torch.all(q.grad[0, :, 4:] == 0)
        assert torch.all(k.grad[0, :, 4:] == 0) and torch.all(v.grad[0, :, 4:] == 0)
        # Row 0 is text with no earlier image key: its image branch adds nothing.
        # One key (itself): a softmax weight of exactly 1.
        assert torch.equal(out[0, :, 0], v[0, :, 0].detach())


def test_public_op_dispatches_and_validates(seed):
    layout = AttentionLayout.from_lengths([5, 7], 13, kind="causal")
    q, k, v = _inputs(1, 4, 2, 13, 16, torch.float32)
    out = multimodal_attention(q, k, v, layout, backend="reference")
    assert torch.equal(out, attention_reference(q, k, v, layout))  # the reference itself
    with pytest.raises(ValueError, match="backend"):
        multimodal_attention(q, k, v, layout, backend="nope")


@pytest.mark.parametrize("mutate,arg", [
    (lambda q, k, v, L: (q[0], k, v, L), "q"),
    (lambda q, k, v, L: (q, k.repeat(1, 2, 1, 1)[:, :3], v.repeat(1, 2, 1, 1)[:, :3], L), "k"),  # 4 vs 3 heads
    (lambda q, k, v, L: (q, k, v[..., :8], L), "k, v"),
    (lambda q, k, v, L: (q, k.half(), v.half(), L), "k, v"),
    (lambda q, k, v, L: (q, k, v, AttentionLayout.from_lengths([4, 4])), "layout"),
    (lambda q, k, v, L: (q, k, v, "causal"), "layout"),
    (lambda q, k, v, L: (q.int(), k, v, L), "q"),
])
def test_bad_input_names_the_argument(mutate, arg):
    layout = AttentionLayout.from_lengths([5, 7], 13)
    q, k, v = (t.detach() for t in _inputs(1, 4, 2, 13, 16, torch.float32))
    with pytest.raises(ValueError, match=f"^{arg}"):
        multimodal_attention(*mutate(q, k, v, layout))


def test_auto_goes_blockwise_for_large_inputs(monkeypatch, seed):
    """Above the size threshold the reference walks the block map (O(N * block) memory)."""
    import fastvlm.ops.attention as attn

    rng = random.Random(seed)
    layout = random_layout(rng, 1, 300, "mmca", True)
    q, k, v = _inputs(1, 2, 1, 300, 16)
    monkeypatch.setattr(attn, "DENSE_MAX_ELEMENTS", 0)

    def no_dense(*args):
        raise AssertionError("dense path taken")

    monkeypatch.setattr(attn, "_dense_attention", no_dense)
    out = multimodal_attention(q, k, v, layout)
    g = torch.randn_like(out)
    assert_close_float64(out, _expected(q, k, v, layout, 16 ** -0.5), _in_float32(q, k, v, layout, 16 ** -0.5, g)[0])
