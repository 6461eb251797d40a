"""The sdpa_cpu backend (torch's CPU flash kernel per segment / query block) vs the
float64 reference: every kind (and mmca split), GQA, odd N, padding, packed rows,
forward and backward, fp32 and bf16; auto picks it on CPU; memory stays O(N * block)."""
import random

import pytest
import torch

from fastvlm.ops import AttentionLayout, attention_cpu, multimodal_attention
from fastvlm.ops.attention import attention_reference
from fastvlm.ops.backend import resolve_backend
from fastvlm.utils.activation_memory import LiveTensorBytes
from tests.layouts import all_kinds, random_layout
from tests.utils import assert_close

DTYPES = [torch.float32, torch.bfloat16]


def _inputs(batch, hq, hkv, n, d, dtype):
    q = torch.randn(batch, hq, n, d, dtype=torch.float64)
    k = torch.randn(batch, hkv, n, d, dtype=torch.float64)
    v = torch.randn(batch, hkv, n, d, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)]


def _fwd_bwd(fn, xs, dout):
    leaves = [t.detach().clone().requires_grad_() for t in xs]
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves, dout.to(out.dtype)))


def check_against_reference(layout, xs, dtype):
    """Output and dq, dk, dv of sdpa_cpu within the bound set by the reference in `dtype`."""
    dout = torch.randn(xs[0].shape, dtype=torch.float64)
    got = _fwd_bwd(lambda q, k, v: multimodal_attention(q, k, v, layout, backend="sdpa_cpu"), xs, dout)
    want = _fwd_bwd(lambda q, k, v: attention_reference(q, k, v, layout, impl="dense"),
                    [t.double() for t in xs], dout)
    base = _fwd_bwd(lambda q, k, v: attention_reference(q, k, v, layout, impl="dense"), xs, dout)
    for name, g, w, b in zip(("out", "dq", "dk", "dv"), got, want, base):
        assert g.dtype == dtype, name
        # dq of a single-key row is 0 exactly: the floor is relative to the output's scale
        assert_close(g, w, b, dtype, scale=float(want[0].norm()) if name != "out" else None, name=name)
    live = layout.segment_ids >= 0
    for name, g in zip(("out", "dq"), got[:2]):  # padding: exactly 0, with zero gradient
        assert torch.equal(g.transpose(1, 2)[~live], torch.zeros_like(g.transpose(1, 2)[~live])), name
    for name, g in zip(("dk", "dv"), got[2:]):  # padding keys are seen by nothing
        assert not g.transpose(1, 2)[~live].any(), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,split", all_kinds())
@pytest.mark.parametrize("block", [37, 256, 1024])
def test_matches_float64_every_kind_gqa_odd_n(kind, split, block, dtype, seed, monkeypatch):
    """Packed rows with padding gaps and images; N odd, not a multiple of any block; block 37
    cuts the non-causal segments into many query blocks with overlapping key ranges, 256 merges
    short samples into shared calls, 1024 makes each whole row one call (the batch one kernel call)."""
    monkeypatch.setattr(attention_cpu, "CPU_QUERY_BLOCK", block)
    layout = random_layout(random.Random(seed), 2, 301, kind, split)
    check_against_reference(layout, _inputs(2, 4, 2, 301, 24, dtype), dtype)


@pytest.mark.parametrize("kind,split", all_kinds())
@pytest.mark.parametrize("block", [37, 1024])
def test_sliding_window(kind, split, block, seed, monkeypatch):
    """A sliding window (Mistral's decoder layers) shorter than most samples: a causal
    segment is no longer plain causal, and each query block's key range starts later."""
    monkeypatch.setattr(attention_cpu, "CPU_QUERY_BLOCK", block)
    rng = random.Random(seed)
    layout = random_layout(rng, 2, 301, kind, split).with_window(rng.randint(1, 80))
    check_against_reference(layout, _inputs(2, 4, 2, 301, 24, torch.float32), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,split", all_kinds())
def test_many_segments_causal_and_long_ones(kind, split, dtype, seed, monkeypatch):
    """A row of many short samples, text-only ones (one causal call each, even under mmca
    split: the image branch must come out 0) and one long sample with images cut into blocks."""
    monkeypatch.setattr(attention_cpu, "CPU_QUERY_BLOCK", 64)
    rng = random.Random(seed)
    lengths = [rng.randint(1, 9) for _ in range(20)] + [333]
    long_start = sum(lengths[:-1])
    spans = [(long_start + 17, 40), (long_start + 100, 1), (long_start + 200, 64)]
    prefixes = [[rng.randint(0, n) for n in lengths]] if kind == "prefix_lm" else None
    layout = AttentionLayout.from_lengths([lengths], sum(lengths) + 5, image_spans=[spans], kind=kind,
                                          prefix_lengths=prefixes, split_softmax=split)
    calls = layout.query_blocks(64)
    covered = torch.zeros(layout.seq_len, dtype=torch.long)
    for _, q0, q1, k0, k1, causal, _ in calls.tolist():
        covered[q0:q1] += 1
        assert causal or q1 - q0 <= 64
        assert k0 >= 0 and k1 <= layout.seq_len
    assert torch.equal(covered[:long_start + 333], torch.ones(long_start + 333, dtype=torch.long))
    assert calls.shape[0] < len(lengths)  # the short samples share calls
    n = layout.seq_len
    check_against_reference(layout, _inputs(1, 6, 2, n, 16, dtype), dtype)


def test_auto_picks_sdpa_cpu_on_cpu(seed):
    assert resolve_backend("multimodal_attention", "auto", "cpu") == "sdpa_cpu"
    layout = random_layout(random.Random(seed), 2, 97, "image_bidirectional")
    q, k, v = _inputs(2, 2, 1, 97, 16, torch.float32)
    forced = multimodal_attention(q, k, v, layout, backend="sdpa_cpu")
    assert torch.equal(multimodal_attention(q, k, v, layout), forced)


def test_forced_on_a_non_cpu_device_explains():
    assert "CPU tensors only" in attention_cpu.serves(torch.device("cuda"))


@pytest.mark.parametrize("kind,split", [("causal", False), ("image_bidirectional", False), ("mmca", True)])
def test_memory_is_n_times_block(kind, split, seed, monkeypatch):
    """No [N, N] tensor: each call's mask is at most [block, N], and what the forward leaves
    for backward (saved tensors + outputs) is a few times q's size, not N x N."""
    n, block = 1030, 128
    monkeypatch.setattr(attention_cpu, "CPU_QUERY_BLOCK", block)
    masks = []
    flash = attention_cpu._flash_fwd

    def recording(*args, attn_mask=None, **kwargs):
        masks.append(0 if attn_mask is None else attn_mask.numel())
        return flash(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(attention_cpu, "_flash_fwd", recording)
    spans = [[(5, 300), (400, 200)]]
    layout = AttentionLayout.from_lengths([[n - 10]], n, image_spans=spans, kind=kind, split_softmax=split)
    layout.query_blocks(block)  # metadata, built once per layout
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 1, n, 16, torch.float32))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        with LiveTensorBytes() as tracker:
            out = multimodal_attention(q, k, v, layout, backend="sdpa_cpu")
    kept = tracker.live_bytes()
    out.sum().backward()
    assert masks and max(masks) <= block * n
    assert max(saved) < n * n // 8
    branches = 2 if split else 1
    assert kept <= (1 + branches) * q.numel() * 4 + branches * q.numel() // 16 * 4 + 4096, kept
