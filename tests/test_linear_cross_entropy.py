"""Chunked / fused linear + cross-entropy vs the naive head, in float64."""
import copy

import pytest
import torch
from torch import nn

from fastvlm.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from tests.utils import assert_close, assert_close_float64, lm_head_benchmark_smoke


class LoRAHead(nn.Module):
    """A LoRA-wrapped head: the adapter must change the loss."""

    def __init__(self, base: nn.Linear, r=4):
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.randn(r, base.in_features, dtype=base.weight.dtype) * 0.1)
        self.b = nn.Parameter(torch.randn(base.out_features, r, dtype=base.weight.dtype) * 0.1)

    def forward(self, x):
        return self.base(x) + (x @ self.a.t()) @ self.b.t()


def _data(b, t, h, v, dtype, ignore_frac=0.4):
    hidden = torch.randn(b, t, h, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, v, (b, t))
    labels[torch.rand(b, t) < ignore_frac] = -100
    return hidden, labels


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


def _leaves(tensors, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


def _reference_run(hidden, head, labels, dtype, **kw):
    """The naive head on copies of hidden and head in dtype: the loss and its gradients
    with respect to hidden and the head's parameters."""
    (h,) = _leaves([hidden], dtype)
    head = copy.deepcopy(head).to(dtype) if isinstance(head, nn.Module) else head.to(dtype)
    params = [h, *(head.parameters() if isinstance(head, nn.Module) else [])]
    loss = linear_cross_entropy_reference(h, head, labels, **kw)
    return [loss, *_grads(loss, params)]


def _assert_all_close(gots, wants, bases, hidden, labels, head_rows, dtype=None, check=assert_close):
    """Loss and gradients. The loss is one number summed from H products per logit, V logits
    per logsumexp and T tokens: its floor scales with |loss| times H + V + T (a sum of n
    terms is off by at most ~n roundings of its magnitude), not with one rounding of it."""
    terms = hidden.shape[-1] + head_rows + labels.numel()
    for i, (got, want, base) in enumerate(zip(gots, wants, bases)):
        kw = {} if dtype is None else {"dtype": dtype}
        if i == 0:
            kw["scale"] = terms * float(want.detach().abs())
        check(got, want, base, **kw, name="loss" if i == 0 else f"grad {i}")


@pytest.mark.parametrize("backend", ["fused", "checkpointed"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_naive_head_fp64(backend, reduction, bias, seed):
    hidden, labels = _data(2, 37, 24, 101, torch.float64)
    head = nn.Linear(24, 101, bias=bias, dtype=torch.float64)
    params = [hidden, *head.parameters()]
    got = linear_cross_entropy(hidden, head, labels, reduction=reduction, chunk_size=16, backend=backend)
    want = linear_cross_entropy_reference(hidden, head, labels, reduction=reduction)
    g_out = torch.rand((), dtype=torch.float64) + 0.5  # a non-unit upstream gradient (loss scaling)
    fp32 = _reference_run(hidden, head, labels, torch.float32, reduction=reduction)
    fp32[1:] = [g * g_out.float() for g in fp32[1:]]
    _assert_all_close([got, *_grads(got * g_out, params)], [want, *_grads(want * g_out, params)], fp32,
                      hidden, labels, 101, check=assert_close_float64)


def test_lora_head_is_honoured(seed):
    hidden, labels = _data(2, 29, 16, 64, torch.float32)
    head = LoRAHead(nn.Linear(16, 64))
    got = linear_cross_entropy(hidden, head, labels, chunk_size=8)  # auto -> checkpointed
    want = linear_cross_entropy_reference(hidden, head, labels)
    plain = linear_cross_entropy_reference(hidden, head.base, labels)
    assert not torch.allclose(want, plain)  # the adapter matters...
    params = [hidden, head.a, head.b]  # ...and is not dropped: vs float64, bound by the fp32 reference
    ref64 = _reference_run(hidden, head, labels, torch.float64)[:4]  # loss, hidden, a, b (then the base's)
    _assert_all_close([got, *_grads(got, params)], ref64, [want, *_grads(want, params)], hidden, labels, 64)


def test_bf16_within_tolerance_of_fp32(seed):
    hidden, labels = _data(1, 300, 64, 1000, torch.float32)
    head = nn.Linear(64, 1000, bias=False)
    ref = linear_cross_entropy_reference(hidden, head, labels)
    ref_g = _grads(ref, [hidden, head.weight])
    h16 = hidden.detach().bfloat16().requires_grad_()
    head16 = nn.Linear(64, 1000, bias=False, dtype=torch.bfloat16)
    head16.weight.data.copy_(head.weight.data)
    got = linear_cross_entropy(h16, head16, labels, chunk_size=128)
    assert got.dtype == torch.float32
    assert torch.isfinite(ref) and all(torch.isfinite(g).all() for g in ref_g)
    # vs float64 on the same (bf16) values, bound by the naive head run on them in bf16
    grads = _grads(got, [h16, head16.weight])
    assert all(g.dtype == torch.bfloat16 for g in grads)
    _assert_all_close([got, *grads], _reference_run(h16, head16, labels, torch.float64),
                      _reference_run(h16, head16, labels, torch.bfloat16), h16, labels, 1000, dtype=torch.bfloat16)


def test_frozen_head_and_weight_tensor(seed):
    hidden, labels = _data(3, 11, 8, 20, torch.float64)
    w = torch.randn(20, 8, dtype=torch.float64)  # frozen: no grad requested
    got = linear_cross_entropy(hidden, w, labels, chunk_size=5)
    want = linear_cross_entropy_reference(hidden, w, labels)
    _assert_all_close([got, *_grads(got, [hidden])], [want, *_grads(want, [hidden])],
                      _reference_run(hidden, w, labels, torch.float32), hidden, labels, 20, check=assert_close_float64)


def test_nothing_supervised_gives_zero():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.full((2, 5), -100)
    for backend in ("fused", "checkpointed", "reference"):
        loss = linear_cross_entropy(hidden, nn.Linear(8, 10), labels, backend=backend)
        assert float(loss.detach()) == 0.0
        (g,) = torch.autograd.grad(loss, hidden, allow_unused=True, materialize_grads=True)
        assert torch.all(g == 0)


@pytest.mark.parametrize("call,arg", [
    (lambda h, w, y: linear_cross_entropy(h[0, 0], w, y), "hidden"),
    (lambda h, w, y: linear_cross_entropy(h, w, y.float()), "labels"),
    (lambda h, w, y: linear_cross_entropy(h, w, y[:, :3]), "labels"),
    (lambda h, w, y: linear_cross_entropy(h, w[:, :3], y), "head"),
    (lambda h, w, y: linear_cross_entropy(h, w, y, reduction="max"), "reduction"),
    (lambda h, w, y: linear_cross_entropy(h, w, y, chunk_size=0), "chunk_size"),
    (lambda h, w, y: linear_cross_entropy(h, LoRAHead(nn.Linear(8, 10)), y, backend="fused"), "head"),
])
def test_bad_input_names_the_argument(call, arg):
    h, w, y = torch.randn(2, 5, 8), torch.randn(10, 8), torch.randint(0, 10, (2, 5))
    with pytest.raises(ValueError, match=f"^{arg}"):
        call(h, w, y)


def test_benchmark_smoke(tmp_path):
    lm_head_benchmark_smoke("bench_linear_cross_entropy.py", tmp_path / "ce.json")


def test_qlora_head_is_honoured(seed):
    """A 4-bit (bitsandbytes NF4) lm_head with a LoRA adapter: the chunked loss calls
    the module, so both the quantised weight and the adapter count."""
    from fastvlm.train.quant import apply_qlora, dequantized_weight

    model = nn.Sequential()
    model.lm_head = nn.Linear(32, 96, bias=False)
    apply_qlora(model, "lm_head", r=4, compute_dtype="fp32")
    with torch.no_grad():
        model.lm_head.lora_B.normal_()  # zero-initialised B would hide a dropped adapter
    hidden, labels = _data(2, 19, 32, 96, torch.float32)
    got = linear_cross_entropy(hidden, model.lm_head, labels, chunk_size=8)
    want = linear_cross_entropy_reference(hidden, model.lm_head, labels)
    no_adapter = linear_cross_entropy_reference(hidden, model.lm_head.base_layer, labels)
    assert not torch.allclose(want, no_adapter)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["lm_head.lora_A", "lm_head.lora_B"]
    # float64: the NF4 weight as it is multiplied (dequantized) and the adapter, written out
    lora = model.lm_head
    w64 = dequantized_weight(lora.base_layer).double()
    h64, a64, b64 = _leaves([hidden, lora.lora_A, lora.lora_B], torch.float64)
    ref = linear_cross_entropy_reference(h64, lambda x: x @ w64.T + lora.scaling * (x @ a64.T) @ b64.T, labels)
    _assert_all_close([got, *_grads(got, [hidden, *trainable])], [ref, *_grads(ref, [h64, a64, b64])],
                      [want, *_grads(want, [hidden, *trainable])], hidden, labels, 96)
