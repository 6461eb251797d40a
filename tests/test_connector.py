"""Connector modules: checkpoint compatibility, multi-level inputs, token
reduction and the resampler, against plain-torch equivalents in float64."""
import copy
import math

import pytest
import torch
from torch import nn

from fastvlm.nn import FusedMLPConnector, MultiLevelConnector, ResamplerConnector
from fastvlm.nn.connector import QuickGELU
from fastvlm.ops.fused_mlp import activation_reference
from fastvlm.ops.token_reduction import reduce_tokens
from tests.utils import assert_close

BACKENDS = ["reference", "triton"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton on CPU only under the interpreter


def grads(module, inputs, out, grad):
    leaves = [*module.parameters(), *[x for x in inputs if x.requires_grad]]
    return torch.autograd.grad(out, leaves, grad.to(out.dtype))


def assert_all_close(gots, wants, baselines, what):
    for i, (got, want, base) in enumerate(zip(gots, wants, baselines)):
        assert_close(got, want, base, name=f"{what} {i}")


@pytest.mark.parametrize("act_module, name", [(nn.GELU(), "gelu"), (nn.GELU("tanh"), "gelu_tanh"),
                                              (QuickGELU(), "quick_gelu"), (nn.SiLU(), "silu")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_llava_projector_state_dict_loads_unchanged(seed, act_module, name, backend):
    seq = nn.Sequential(nn.Linear(40, 56), act_module, nn.Linear(56, 24)).to(DEVICE)
    fused = FusedMLPConnector(40, 56, 24, activation=name, backend=backend, device=DEVICE)
    assert list(fused.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    fused.load_state_dict(seq.state_dict())  # strict
    x = torch.randn(2, 9, 40, device=DEVICE, requires_grad=True)
    seq64, x64 = copy.deepcopy(seq).double(), x.detach().double().requires_grad_()
    out, plain, expect = fused(x), seq(x), seq64(x64)  # plain: the same Sequential in fp32, the baseline
    assert_close(out, expect, plain)
    g = torch.randn_like(expect)
    assert_all_close(grads(fused, [x], out, g), grads(seq64, [x64], expect, g), grads(seq, [x], plain, g),
                     "gradient")
    clone = FusedMLPConnector.from_sequential(seq, backend=backend)
    assert clone.activation == name and torch.equal(clone(x), out)


def test_from_sequential_rejects_unknown_layers():
    with pytest.raises(ValueError, match="activation: no fused equivalent of ReLU"):
        FusedMLPConnector.from_sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="seq: expected"):
        FusedMLPConnector.from_sequential(nn.Sequential(nn.Linear(4, 4), nn.GELU()))


def multi_level_plain(module, features, dtype=torch.float64):
    """The module's function written out in plain torch in `dtype` (on `module` itself,
    cast in place), concat materialised."""
    m = module.to(dtype)
    xs = [f.to(dtype) for f in features]
    if m.norms is not None:
        xs = [n(x) for n, x in zip(m.norms, xs)]
    if m.reduce is not None:
        xs = [reduce_tokens(x, m.reduce, m.grid) for x in xs]
    if m.mode == "sum":
        hidden = sum(p(x) for p, x in zip(m.proj, xs))
    else:
        hidden = m.proj(torch.cat(xs, -1))
    return m.out(activation_reference(hidden, m.activation))


@pytest.mark.parametrize("mode", ["sum", "concat"])
@pytest.mark.parametrize("reduce", [None, "pixel_shuffle", "avg_pool"])
def test_multi_level_connector(seed, mode, reduce):
    """Four layers of a 24-wide encoder plus one 16-wide encoder on a 4x4 grid."""
    widths = [24, 24, 24, 24, 16]
    module = MultiLevelConnector(widths, 40, 20, mode=mode, reduce=reduce, backend="triton", device=DEVICE)
    for p in module.parameters():  # LayerNorm starts at 1/0: make it a real test
        nn.init.normal_(p, std=0.3)
    feats = [torch.randn(2, 16, k, device=DEVICE, requires_grad=True) for k in widths]
    out = module(feats)
    assert out.shape == (2, 16 if reduce is None else 4, 20)
    ref_module = MultiLevelConnector(widths, 40, 20, mode=mode, reduce=reduce, device=DEVICE)
    ref_module.load_state_dict(module.state_dict())
    plain_module = copy.deepcopy(ref_module)
    ref_feats = [f.detach().double().requires_grad_() for f in feats]
    plain_feats = [f.detach().clone().requires_grad_() for f in feats]
    expect = multi_level_plain(ref_module, ref_feats)
    plain = multi_level_plain(plain_module, plain_feats, torch.float32)
    assert_close(out, expect, plain)
    g = torch.randn_like(expect)
    assert_all_close(grads(module, feats, out, g), grads(ref_module, ref_feats, expect, g),
                     grads(plain_module, plain_feats, plain, g), "gradient")


def test_multi_level_bad_input():
    module = MultiLevelConnector([8, 6], 10)
    with pytest.raises(ValueError, match="features: expected a list of 2 tensors"):
        module([torch.randn(3, 8)])
    with pytest.raises(ValueError, match="mode: expected"):
        MultiLevelConnector([8], 10, mode="stack")


def resampler_plain(m, x, pad, dtype=torch.float64):
    """Cross-attention written out with an explicit softmax, in `dtype`."""
    m = copy.deepcopy(m).to(dtype)
    x = x.to(dtype)
    b, t, _ = x.shape
    kv = m.ln_kv(m.kv_proj(x))
    keys = kv + m.key_positions(t, kv)
    q = m.q_proj(m.ln_q(m.query))
    h = m.num_heads
    qh = q.unflatten(-1, (h, -1)).transpose(0, 1)  # [h, Q, d]
    kh = m.k_proj(keys).unflatten(-1, (h, -1)).transpose(1, 2)  # [B, h, T, d]
    vh = m.v_proj(kv).unflatten(-1, (h, -1)).transpose(1, 2)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])
    scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    attn = torch.softmax(scores, -1) @ vh
    return m.proj(m.ln_post(m.o_proj(attn.transpose(1, 2).flatten(2))))


def test_resampler_fixed_budget_and_reference(seed):
    module = ResamplerConnector(20, 32, num_queries=7, num_heads=4)
    x = torch.randn(3, 16, 20)
    pad = torch.zeros(3, 16, dtype=torch.bool)
    pad[1, 11:] = True
    out = module(x, key_padding_mask=pad)
    assert out.shape == (3, 7, 32)
    assert_close(out, resampler_plain(module, x, pad), resampler_plain(module, x, pad, torch.float32))
    # padded tokens do not reach the output (their softmax weights are exactly 0); the budget
    # is the same for any T
    x2 = x.clone()
    x2[1, 11:] = torch.randn(5, 20) * 100
    assert torch.equal(module(x2, key_padding_mask=pad)[1], out[1])
    assert module(torch.randn(2, 36, 20)).shape == (2, 7, 32)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


def test_resampler_bad_input():
    module = ResamplerConnector(20, 32, num_queries=4, num_heads=4)
    with pytest.raises(ValueError, match=r"x: expected \[B, T, 20\]"):
        module(torch.randn(16, 20))
    with pytest.raises(ValueError, match="x: 15 tokens are not a square grid"):
        module(torch.randn(1, 15, 20))
    with pytest.raises(ValueError, match="key_padding_mask: expected bool"):
        module(torch.randn(1, 16, 20), key_padding_mask=torch.zeros(1, 16))
