"""Chunked contrastive losses: forward and backward against the float64 definition,
the B x B logits never held, and the pooling heads."""
import math

import pytest
import torch

from fastvlm.models.llm import LLM, LLMConfig
from fastvlm.models.vision import VisionConfig, VisionEncoder
from fastvlm.nn.contrastive import (
    ContrastiveHeads,
    contrastive_loss,
    contrastive_loss_reference,
    loss_from_logits,
    text_states,
)
from fastvlm.utils.activation_memory import LiveTensorBytes
from tests.utils import assert_close


def _pairs(b, d, dtype=torch.float64):
    """Matching pairs: each caption embedding is its image's plus noise (so the loss is not flat)."""
    x = torch.randn(b, d, dtype=torch.float64)
    return x, (x + 3.0 * torch.randn(b, d, dtype=torch.float64))


def _loss_and_grads(fn, x, y, scale, bias, dtype, **kw):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, y, scale) + ((bias,) if bias is not None else ())]
    loss = fn(leaves[0], leaves[1], logit_scale=leaves[2], logit_bias=leaves[3] if bias is not None else None, **kw)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


def _scalar_floor_scales(x, y, scale, bias, kind, chunk):
    """Floor scales for the three scalars (loss, d log t, d b), from error analysis.

    Any fp32 implementation rounds each logit l_ij by about u |l_ij|. To first order that
    moves the loss by sum |G_ij| u |l_ij| (G = dloss/dl) and the scalar gradients
    (sum G_ij l_ij and sum G_ij) by at most sum (|G_ij| + |l_ij|) u |l_ij| and
    sum u |l_ij| |dG/dl| <= sum u |l_ij|, since |dG_ij/dl| <= 1 for both losses. The
    plain-PyTorch baseline can be far luckier than that on a given input (its matching
    logit minus the row max is exactly 0), so these are the floors, not its error.

    Then the sums themselves: a chunked pass adds ceil(B / chunk) partial sums one after
    another, each a reduction over chunk x B terms, and recursive summation of terms s_k
    errs by at most (its depth) u sum |s_k| (Higham). The loss's terms are all >= 0, so
    sum |s_k| is the loss; the scalar gradients sum G_ij (l_ij - b) and G_ij. With chunk 1
    that depth is B, which the one-reduction baseline never pays."""
    x, y = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(y, dim=-1)
    b = x.shape[0]
    depth = math.ceil(b / chunk) + math.ceil(math.log2(min(chunk, b) * b))
    t = scale.clamp(max=math.log(100.0)).exp() if kind == "softmax" else scale.exp()
    sims = t * x @ y.T
    logits = sims.clone().requires_grad_()
    loss = loss_from_logits(logits, kind, bias)
    (g,) = torch.autograd.grad(loss, logits)
    size = logits.abs().detach() / b  # G carries the 1/B; so does its sensitivity
    logits, g = logits.detach(), g.abs()
    return [float((g * logits.abs()).sum() + depth * loss.detach().abs()),
            float(((g + size) * logits.abs()).sum() + depth * (g * sims.abs()).sum()),
            float(size.sum() + depth * g.sum())]


def _embedding_floor_scales(x, y, scale, bias, kind):
    """Floor scales for d image_emb and d text_emb, from the same first-order analysis: a
    logit rounded by u |l_ij| moves G_ij by at most u |l_ij| / B, and the rounded products
    G_ij t y_j add u |G_ij| t |y_j|; so d x_i (unit-normalised) moves by at most
    u t sum_j (|G_ij| + |l_ij| / B) |y_j|, and the normalisation divides by |x_i|. Their
    gradients cancel (softmax in both directions), so plain PyTorch's own error on an
    input can be far below that."""
    xn, yn = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(y, dim=-1)
    t = scale.clamp(max=math.log(100.0)).exp() if kind == "softmax" else scale.exp()
    logits = (t * xn @ yn.T).requires_grad_()
    (g,) = torch.autograd.grad(loss_from_logits(logits, kind, bias), logits)
    weight = g.abs() + logits.abs().detach() / logits.shape[0]
    dx = t * (weight @ yn.abs()) / x.norm(dim=-1, keepdim=True)
    dy = t * (weight.T @ xn.abs()) / y.norm(dim=-1, keepdim=True)
    return float(dx.norm()), float(dy.norm())


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
@pytest.mark.parametrize("b,chunk,dtype", [(37, 8, torch.float32), (16, 16, torch.float32), (5, 64, torch.float32),
                                           (24, 1, torch.float32), (29, 8, torch.bfloat16)])
def test_chunked_matches_float64_definition(kind, b, chunk, dtype, seed):
    x, y = _pairs(b, 24)
    scale = torch.tensor(math.log(10.0) if kind == "sigmoid" else math.log(1 / 0.07)) + 0.3 * torch.randn(())
    bias = -10.0 + torch.randn(()) if kind == "sigmoid" else None
    # The float64 reference sees the inputs as the tested dtype holds them.
    x, y, scale = (t.to(dtype).double() for t in (x, y, scale))
    bias = bias.to(dtype).double() if bias is not None else None
    ref64 = _loss_and_grads(contrastive_loss_reference, x, y, scale, bias, torch.float64, kind=kind)
    base32 = _loss_and_grads(contrastive_loss_reference, x, y, scale, bias, dtype, kind=kind)
    got = _loss_and_grads(contrastive_loss, x, y, scale, bias, dtype, kind=kind, chunk=chunk)
    floor = _scalar_floor_scales(x, y, scale.double(), bias, kind, chunk)
    scales = [floor[0], *_embedding_floor_scales(x, y, scale.double(), bias, kind), floor[1], floor[2]]
    names = ["loss", "d image_emb", "d text_emb", "d logit_scale", "d logit_bias"]
    for name, g, r, p, sc in zip(names, got, ref64, base32, scales):
        assert g.dtype == dtype
        assert_close(g, r, p, scale=None if sc is None else max(sc, float(r.double().norm())), name=name)


def test_defaults_are_siglip_init_and_match_definition(seed):
    x, y = _pairs(9, 8)
    got = contrastive_loss(x, y, chunk=4)
    want = contrastive_loss_reference(x, y, logit_scale=math.log(10.0), logit_bias=-10.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    # A perfectly matched, well separated batch has a small loss; a shuffled one a large one.
    eye = torch.eye(6, dtype=torch.float64)
    assert contrastive_loss(eye, eye, logit_scale=math.log(20.0), logit_bias=-10.0) < 1e-3
    assert contrastive_loss(eye, eye.roll(1, 0), logit_scale=math.log(20.0), logit_bias=-10.0) > 9.0


def test_softmax_temperature_clamped_at_100(seed):
    x, y = _pairs(7, 8)
    big = torch.tensor(math.log(500.0), requires_grad=True)
    loss = contrastive_loss(x, y, "softmax", logit_scale=big, chunk=3)
    torch.testing.assert_close(loss, contrastive_loss_reference(x, y, "softmax", logit_scale=math.log(100.0)))
    loss.backward()
    assert big.grad == 0  # past the clamp the temperature gets no gradient, as in CLIP


class PeakBytes(LiveTensorBytes):
    """The largest number of bytes alive at once among tensors created inside the block."""

    def __init__(self):
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.peak = max(self.peak, self.live_bytes())
        return out


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_forward_and_backward_never_hold_the_logits(kind, seed):
    b, d, chunk = 512, 8, 16
    x, y = (t.float().requires_grad_() for t in _pairs(b, d))
    logits_bytes = b * b * 4

    def step(fn, **kw):
        with PeakBytes() as meter:
            loss = fn(x, y, kind, **kw)
            saved = meter.live_bytes()
            loss.backward()
        x.grad = y.grad = None
        return saved, meter.peak

    saved, peak = step(contrastive_loss, chunk=chunk)
    ref_saved, ref_peak = step(contrastive_loss_reference)
    assert ref_saved >= logits_bytes and ref_peak >= logits_bytes  # the meter sees a B x B matrix
    # What a chunked pass may hold: a few chunk x B blocks plus O(B D) embeddings and gradients.
    budget = 6 * chunk * b * 4 + 8 * b * d * 4
    assert budget < logits_bytes / 2
    assert saved <= 4 * b * d * 4, f"forward left {saved} bytes alive"
    assert peak <= budget, f"peak {peak} bytes > {budget} (the full logits are {logits_bytes})"


def test_bad_input_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="kind"):
        contrastive_loss(x, x, "triplet")
    with pytest.raises(ValueError, match="text_emb"):
        contrastive_loss(x, x[:3])
    with pytest.raises(ValueError, match="chunk"):
        contrastive_loss(x, x, chunk=0)
    with pytest.raises(ValueError, match="logit_bias"):
        contrastive_loss(x, x, "softmax", logit_bias=-10.0)
    with pytest.raises(ValueError, match="image_emb"):
        contrastive_loss(x[0], x[0])
    with pytest.raises(ValueError, match="image_pool"):
        ContrastiveHeads(8, 8, 4, image_pool="max")
    heads = ContrastiveHeads(8, 8, 4, image_pool="cls")
    with pytest.raises(ValueError, match="class token"):
        heads.image_embedding(torch.randn(2, 5, 8), num_prefix_tokens=0)
    with pytest.raises(ValueError, match="at least one real token"):
        heads.text_embedding(torch.randn(2, 3, 8), torch.tensor([[1, 1, 0], [0, 0, 0]]))


def test_heads_pool_as_documented(seed):
    heads = ContrastiveHeads(6, 5, 4).double()
    vis = torch.randn(3, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(heads.image_embedding(vis, 2), heads.image_proj(vis[:, 2:].mean(1)))
    heads.image_pool = "cls"
    torch.testing.assert_close(heads.image_embedding(vis, 2), heads.image_proj(vis[:, 0]))
    txt = torch.randn(2, 4, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    want = torch.stack([txt[0, :3].mean(0), txt[1, 0]])
    torch.testing.assert_close(heads.text_embedding(txt, mask), heads.text_proj(want))
    assert heads.logit_scale.item() == pytest.approx(math.log(10.0)) and heads.logit_bias.item() == -10.0
    clip = ContrastiveHeads(6, 5, 4, kind="softmax")
    assert clip.logit_bias is None and clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


@pytest.mark.parametrize("source", ["embeddings", "llm"])
def test_heads_train_both_towers(source, seed):
    """A few steps on a tiny encoder and LLM: the loss falls and every trained part gets a gradient."""
    vision = VisionEncoder(VisionConfig.clip(image_size=16, patch_size=8, hidden_size=16, num_layers=1, num_heads=2,
                                             intermediate_size=32))
    llm = LLM(LLMConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, max_position_embeddings=16))
    heads = ContrastiveHeads(16, 16, 8)
    pixels = torch.randn(6, 3, 16, 16)
    ids = torch.randint(0, 32, (6, 5))
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[0, 3:] = False  # padding is pooled out and, for the LLM, its own segment
    if source == "llm":  # the padded tokens do not change the real tokens' states
        other = ids.clone()
        other[0, 3:] = (other[0, 3:] + 1) % 32
        torch.testing.assert_close(text_states(llm, ids, mask, "llm")[0, :3],
                                   text_states(llm, other, mask, "llm")[0, :3])
    params = list(vision.parameters()) + list(llm.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = heads(vision, pixels, llm, ids, mask, text_source=source, chunk=4)
        opt.zero_grad()
        loss.backward()
        if not losses:
            assert heads.logit_bias.grad is not None and vision.patch_embed.weight.grad.abs().sum() > 0
            assert llm.model.embed_tokens.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses
