"""linear_logprob (per-sequence sums of token log-probabilities, chunked, no full logits)
vs the plain float64 log_softmax + gather head.

Error analysis: each logp_s sums n_s token log-probs, each one logit (H products) minus a
logsumexp over V logits, so its rounding error grows with H + V + n_s times |logp_s|; the
gradients are sums of the same terms. The bound is the usual one (tests/utils.py): a small
multiple of plain PyTorch's own error in the same dtype on the same inputs, with the floor
scaled by that number of terms (a vector of a few sums can round almost exactly by chance).
"""
import copy

import pytest
import torch
from torch import nn

from fastvlm.ops import linear_logprob
from fastvlm.ops.linear_logprob import linear_logprob_reference
from tests.test_linear_cross_entropy import LoRAHead
from tests.utils import assert_close, assert_close_float64, lm_head_benchmark_smoke


def _data(shape, h, v, sequences, dtype, ignore_frac=0.3, uncounted_frac=0.2):
    """hidden [*shape, h], labels, and sequence ids in runs (as answers lie in a row), some -1."""
    hidden = torch.randn(*shape, h, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, v, shape)
    labels[torch.rand(shape) < ignore_frac] = -100
    n = labels.numel()
    cuts = torch.sort(torch.randint(0, n, (sequences - 1,))).values
    seq = torch.bucketize(torch.arange(n), cuts, right=True).reshape(shape)
    seq[torch.rand(shape) < uncounted_frac] = -1
    return hidden, labels, seq


def _grads(out, params, grad_out):
    return list(torch.autograd.grad(out, params, grad_out, allow_unused=True, materialize_grads=True,
                                    retain_graph=True))


def _run(fn, hidden, head, dtype):
    """fn on copies of hidden and the head in dtype: (logp, counts, gradients of hidden and the
    head's parameters)."""
    h = hidden.detach().to(dtype).requires_grad_()
    head = copy.deepcopy(head).to(dtype) if isinstance(head, nn.Module) else head.detach().to(dtype)
    params = [h, *(head.parameters() if isinstance(head, nn.Module) else [])]
    return fn(h, head), params


def _check(got, params, wants, labels, h, v, grad_out, check=assert_close, dtype=None, chunks=1):
    """got=(logp, counts) and its gradients against wants=[ref64 run, baseline run]. The weight
    and bias gradients of a chunked run are running sums over ``chunks`` chunk contributions,
    one rounding each (plain PyTorch reduces in one blocked GEMM): the floor scales with it."""
    (ref, ref_params), (base, base_params) = wants
    assert torch.equal(got[1], ref[1]), "token counts"
    terms = h + v + labels.numel()
    kw = {} if dtype is None else {"dtype": dtype}
    check(got[0], ref[0], base[0], scale=terms * float(ref[0].detach().norm()), name="logp", **kw)
    outs = zip(_grads(got[0], params, grad_out.to(got[0].dtype)), _grads(ref[0], ref_params, grad_out.double()),
               _grads(base[0], base_params, grad_out.to(base[0].dtype)))
    for i, (g, r, b) in enumerate(outs):
        check(g, r, b, name=f"grad {i}", scale=chunks * float(r.norm()), **kw)


@pytest.mark.parametrize("backend", ["fused", "checkpointed"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 16, 4096])
def test_matches_plain_head_fp64(backend, bias, chunk_size, seed):
    """Odd sizes, chunks of one token, chunk edges inside sequences, one chunk for all; a
    different upstream gradient per sequence (as a preference loss gives)."""
    hidden, labels, seq = _data((2, 37), 24, 101, 5, torch.float64)
    head = nn.Linear(24, 101, bias=bias, dtype=torch.float64)
    params = [hidden, *head.parameters()]
    got = linear_logprob(hidden, head, labels, seq, 5, chunk_size=chunk_size, backend=backend)
    grad_out = torch.randn(5, dtype=torch.float64)
    ref = _run(lambda h, w: linear_logprob_reference(h, w, labels, seq, 5), hidden, head, torch.float64)
    base = _run(lambda h, w: linear_logprob_reference(h, w, labels, seq, 5), hidden, head, torch.float32)
    chunks = -(-int(got[1].sum()) // chunk_size)
    _check(got, params, [ref, base], labels, 24, 101, grad_out, check=assert_close_float64, chunks=chunks)


def test_reference_is_log_softmax_gather_per_sequence(seed):
    """The reference against a loop over sequences and tokens written out in float64."""
    hidden, labels, seq = _data((53,), 8, 17, 4, torch.float64)
    w, b = torch.randn(17, 8, dtype=torch.float64), torch.randn(17, dtype=torch.float64)
    got, counts = linear_logprob_reference(hidden, lambda x: x @ w.T + b, labels, seq, 4)
    for s in range(4):
        rows = [t for t in range(53) if seq[t] == s and labels[t] != -100]
        want = sum((torch.log_softmax(hidden[t] @ w.T + b, 0)[labels[t]] for t in rows), torch.zeros(()))
        assert int(counts[s]) == len(rows)
        assert torch.allclose(got[s], want.double(), rtol=1e-12, atol=1e-12)


def test_flat_and_batched_hidden_agree_and_outputs_are_written(seed, monkeypatch):
    """[T, D] and [B, N, D] give the same sums; every buffer the op allocates starts as NaN
    (torch.empty / Tensor.new_empty poisoned), so an element it fails to write shows."""
    hidden, labels, seq = _data((3, 19), 16, 40, 6, torch.float32)
    head = nn.Linear(16, 40)
    empty, new_empty = torch.empty, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: new_empty(self, *a, **k).fill_(float("nan")))
    batched = linear_logprob(hidden, head, labels, seq, 6, chunk_size=8)
    flat = linear_logprob(hidden.reshape(-1, 16), head, labels.reshape(-1), seq.reshape(-1), 6, chunk_size=8)
    grad_out = torch.randn(6)
    g_batched = _grads(batched[0], [hidden, head.weight], grad_out)
    g_flat = _grads(flat[0], [hidden, head.weight], grad_out)
    monkeypatch.undo()
    assert torch.equal(batched[0], flat[0]) and torch.equal(batched[1], flat[1])
    assert all(torch.equal(a, b) for a, b in zip(g_batched, g_flat))
    ref = _run(lambda h, w: linear_logprob_reference(h, w, labels, seq, 6), hidden, head, torch.float64)
    base = _run(lambda h, w: linear_logprob_reference(h, w, labels, seq, 6), hidden, head, torch.float32)
    _check(batched, [hidden, *head.parameters()], [ref, base], labels, 16, 40, grad_out)


def test_lora_head_is_honoured(seed):
    hidden, labels, seq = _data((2, 29), 16, 64, 4, torch.float32)
    head = LoRAHead(nn.Linear(16, 64))
    got = linear_logprob(hidden, head, labels, seq, 4, chunk_size=8)  # auto -> checkpointed
    plain = linear_logprob_reference(hidden, head.base, labels, seq, 4)[0]
    assert not torch.allclose(got[0], plain)  # the adapter matters, and is not dropped:
    ref = _run(lambda h, m: linear_logprob_reference(h, m, labels, seq, 4), hidden, head, torch.float64)
    base = _run(lambda h, m: linear_logprob_reference(h, m, labels, seq, 4), hidden, head, torch.float32)
    _check(got, [hidden, *head.parameters()], [ref, base], labels, 16, 64, torch.randn(4))


def test_qlora_head_is_honoured(seed):
    """A 4-bit (NF4) lm_head with a LoRA adapter: both the quantised weight and the adapter count."""
    from fastvlm.train.quant import apply_qlora, dequantized_weight

    model = nn.Sequential()
    model.lm_head = nn.Linear(32, 96, bias=False)
    apply_qlora(model, "lm_head", r=4, compute_dtype="fp32")
    lora = model.lm_head
    with torch.no_grad():
        lora.lora_B.normal_()  # zero-initialised B would hide a dropped adapter
    hidden, labels, seq = _data((2, 19), 32, 96, 3, torch.float32)
    got = linear_logprob(hidden, lora, labels, seq, 3, chunk_size=8)
    assert not torch.allclose(got[0], linear_logprob_reference(hidden, lora.base_layer, labels, seq, 3)[0])
    w64 = dequantized_weight(lora.base_layer).double()

    def head64(a, b):
        return lambda x: x @ w64.T + lora.scaling * (x @ a.T) @ b.T
    leaves = [t.detach().double().requires_grad_() for t in (hidden, lora.lora_A, lora.lora_B)]
    ref = (linear_logprob_reference(leaves[0], head64(*leaves[1:]), labels, seq, 3), leaves)
    base = (linear_logprob_reference(hidden, lora, labels, seq, 3), [hidden, lora.lora_A, lora.lora_B])
    _check(got, [hidden, lora.lora_A, lora.lora_B], [ref, base], labels, 32, 96, torch.randn(3))


@pytest.mark.parametrize("backend", ["fused", "checkpointed"])
def test_bf16_accumulates_in_fp32(backend, seed):
    hidden, labels, seq = _data((1, 150), 64, 500, 4, torch.bfloat16)
    head = nn.Linear(64, 500, bias=False, dtype=torch.bfloat16)
    got = linear_logprob(hidden, head, labels, seq, 4, chunk_size=64, backend=backend)
    assert got[0].dtype == torch.float32
    # vs float64 on the same bf16 values, bound by the plain head run on them in bf16
    ref = _run(lambda h, w: linear_logprob_reference(h, w, labels, seq, 4), hidden, head, torch.float64)
    base = _run(lambda h, w: linear_logprob_reference(h, w, labels, seq, 4), hidden, head, torch.bfloat16)
    grad_out = torch.randn(4)
    _check(got, [hidden, head.weight], [ref, base], labels, 64, 500, grad_out, dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", ["fused", "checkpointed"])
def test_autocast_bf16_hidden_fp32_head(backend, seed):
    """Mixed precision as a training step runs it: bf16 hidden states, an fp32 head, autocast on;
    backward recomputes the logits under the same autocast (without it the GEMM would mix
    bf16 and fp32 operands). Bound: the plain head under the same autocast."""
    hidden, labels, seq = _data((1, 90), 32, 300, 3, torch.bfloat16)
    head = nn.Linear(32, 300)
    grad_out = torch.randn(3)
    with torch.autocast("cpu", torch.bfloat16):
        got = linear_logprob(hidden, head, labels, seq, 3, chunk_size=32, backend=backend)
        base = linear_logprob_reference(hidden, head, labels, seq, 3)
    assert got[0].dtype == torch.float32
    ref = _run(lambda h, w: linear_logprob_reference(h, w, labels, seq, 3), hidden, head, torch.float64)
    params = [hidden, *head.parameters()]
    _check(got, params, [ref, (base, params)], labels, 32, 300, grad_out, dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", ["fused", "checkpointed", "reference"])
def test_empty_and_uncounted_sequences(backend):
    """A sequence with no counted token sums to 0 (count 0); -1 positions never count, even
    with a label; nothing counted at all still gives a graph-attached zero gradient."""
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    labels = torch.randint(0, 10, (2, 6))
    seq = torch.full((2, 6), -1)
    seq[0, :3] = 2
    head = nn.Linear(8, 10)
    logp, counts = linear_logprob(hidden, head, labels, seq, 4, backend=backend)
    assert counts.tolist() == [0, 0, 3, 0]
    assert logp.detach()[[0, 1, 3]].tolist() == [0.0, 0.0, 0.0] and float(logp.detach()[2]) < 0
    (g,) = _grads(logp, [hidden], torch.ones(4))
    assert torch.all(g[0, 3:] == 0) and torch.all(g[1] == 0) and torch.any(g[0, :3] != 0)
    logp, counts = linear_logprob(hidden, head, labels, torch.full((2, 6), -1), 2, backend=backend)
    assert logp.tolist() == [0.0, 0.0] and counts.tolist() == [0, 0]
    (g,) = _grads(logp, [hidden], torch.ones(2))
    assert torch.all(g == 0)


@pytest.mark.parametrize("call,arg", [
    (lambda h, w, y, s: linear_logprob(h[0, 0], w, y, s, 3), "hidden"),
    (lambda h, w, y, s: linear_logprob(h, w, y.float(), s, 3), "labels"),
    (lambda h, w, y, s: linear_logprob(h, w[:, :3], y, s, 3), "head"),
    (lambda h, w, y, s: linear_logprob(h, w, y, s.float(), 3), "sequence_ids"),
    (lambda h, w, y, s: linear_logprob(h, w, y, s[:, :2], 3), "sequence_ids"),
    (lambda h, w, y, s: linear_logprob(h, w, y, s + 1, 3), "sequence_ids"),
    (lambda h, w, y, s: linear_logprob(h, w, y, s - 1, 3), "sequence_ids"),
    (lambda h, w, y, s: linear_logprob(h, w, y, s, -1), "num_sequences"),
    (lambda h, w, y, s: linear_logprob(h, w, y, s, 3, chunk_size=0), "chunk_size"),
    (lambda h, w, y, s: linear_logprob(h, LoRAHead(nn.Linear(8, 10)), y, s, 3, backend="fused"), "head"),
    (lambda h, w, y, s: linear_logprob(h, w, y, s, 3, backend="triton"), "backend"),
])
def test_bad_input_names_the_argument(call, arg):
    h, w, y = torch.randn(2, 5, 8), torch.randn(10, 8), torch.randint(0, 10, (2, 5))
    s = torch.tensor([[0, 0, 1, 1, 2], [2, 2, -1, 0, 1]])
    with pytest.raises(ValueError, match=f"^{arg}"):
        call(h, w, y, s)


def test_benchmark_smoke(tmp_path):
    payload = lm_head_benchmark_smoke("bench_linear_logprob.py", tmp_path / "logprob.json")
    assert payload["env"]["torch"] == torch.__version__
