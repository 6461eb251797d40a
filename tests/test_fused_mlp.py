"""fused_linear_act / fused_mlp: the Triton path against the float64 reference.

CPU runs use the Triton interpreter (fp32/fp16, tiny odd shapes); the
`gpu`-marked tests run bf16 at real projector shapes.
"""
import importlib

import pytest
import torch

from fastvlm.kernels import fused_mlp as kernel
from fastvlm.ops import backend
from fastvlm.ops.fused_mlp import (
    ACTIVATIONS,
    fused_linear_act,
    fused_linear_act_reference,
    fused_mlp,
    fused_mlp_reference,
)
from tests.utils import assert_close, check_op, poisoned

op = importlib.import_module("fastvlm.ops.fused_mlp")  # the module; fastvlm.ops.fused_mlp is the function

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel fails to write shows."""
    def alloc(like, *shape, dtype=None):
        return poisoned(*shape, dtype=dtype or like.dtype, device=like.device)
    monkeypatch.setattr(kernel, "alloc", alloc)


def leaf(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(DEVICE, dtype).requires_grad_()


def check_against_reference(fast_fn, ref_fn, inputs, dtype):
    """Values and the gradients of every input that requires grad, vs float64, each within
    a few times the error of the reference itself (plain PyTorch) run in `dtype`."""
    out = check_op(fast_fn, ref_fn, inputs, dtype=dtype)
    assert out.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_linear_act_matches_reference(seed, activation, dtype):
    recompute = activation in ("gelu", "silu")
    x, w, b = leaf(2, 19, 45, dtype=dtype), leaf(37, 45, dtype=dtype, scale=0.2), leaf(37, dtype=dtype)
    check_against_reference(
        lambda x, w, b: fused_linear_act(x, w, b, activation, recompute=recompute, backend="triton"),
        lambda x, w, b: fused_linear_act_reference(x, w, b, activation), [x, w, b], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_mlp_matches_reference(seed, activation, dtype):
    recompute = activation in ("gelu_tanh", "quick_gelu")
    x = leaf(41, 33, dtype=dtype)
    w1, b1 = leaf(50, 33, dtype=dtype, scale=0.2), leaf(50, dtype=dtype)
    w2, b2 = leaf(35, 50, dtype=dtype, scale=0.2), leaf(35, dtype=dtype)
    check_against_reference(
        lambda *a: fused_mlp(*a, activation, recompute=recompute, backend="triton"),
        lambda *a: fused_mlp_reference(*a, activation), [x, w1, b1, w2, b2], dtype)


def test_no_bias_and_frozen_input(seed):
    """Biases may be None; an input without requires_grad gets no dgrad launch."""
    x = leaf(3, 7, 20, dtype=torch.float32).detach()
    w1, w2 = leaf(24, 20, dtype=torch.float32, scale=0.3), leaf(9, 24, dtype=torch.float32, scale=0.3)
    check_against_reference(lambda *a: fused_mlp(*a, "gelu", backend="triton"),
                            lambda *a: fused_mlp_reference(*a, "gelu"), [x, w1, None, w2, None],
                            torch.float32)


@pytest.mark.parametrize("weights", ["concat", "list"])
@pytest.mark.parametrize("n_inputs", [2, 5])
def test_multi_level_inputs(seed, n_inputs, weights):
    """Several feature tensors (different widths) accumulate in one GEMM; five
    inputs exceed one launch's operand slots and are chained."""
    dtype = torch.float32
    widths = [24, 17, 40, 9, 33][:n_inputs]
    xs = [leaf(2, 11, k, dtype=dtype) for k in widths]
    if weights == "concat":
        w1 = leaf(30, sum(widths), dtype=dtype, scale=0.2)
    else:
        w1 = [leaf(30, k, dtype=dtype, scale=0.2) for k in widths]
    b1, w2, b2 = leaf(30, dtype=dtype), leaf(19, 30, dtype=dtype, scale=0.2), leaf(19, dtype=dtype)
    check_against_reference(lambda *a: fused_mlp(*a, "gelu", backend="triton"),
                            lambda *a: fused_mlp_reference(*a, "gelu"), [xs, w1, b1, w2, b2], dtype)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("reduce", ["pixel_shuffle", "avg_pool"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_token_reduction_folded_into_gemm(seed, reduce, dtype, recompute):
    """A 6x4 patch grid (24 tokens -> 6) read through the 2x2 index map (with recompute
    under avg_pool: pooled once, the pooled tokens kept)."""
    widths = [12, 7]
    xs = [leaf(2, 24, k, dtype=dtype) for k in widths]
    mult = 4 if reduce == "pixel_shuffle" else 1
    w1 = [leaf(26, mult * k, dtype=dtype, scale=0.2) for k in widths]
    b1, w2, b2 = leaf(26, dtype=dtype), leaf(13, 26, dtype=dtype, scale=0.2), leaf(13, dtype=dtype)
    kw = dict(reduce=reduce, grid=(6, 4))
    check_against_reference(lambda *a: fused_mlp(*a, "silu", backend="triton", recompute=recompute, **kw),
                            lambda *a: fused_mlp_reference(*a, "silu", **kw), [xs, w1, b1, w2, b2], dtype)
    x, w = leaf(1, 36, 10, dtype=dtype), leaf(21, 10 * mult, dtype=dtype, scale=0.3)
    check_against_reference(lambda x, w: fused_linear_act(x, w, None, "gelu", reduce=reduce,
                                                          recompute=recompute, backend="triton"),
                            lambda x, w: fused_linear_act_reference(x, w, None, "gelu", reduce=reduce),
                            [x, w], dtype)


def test_avg_pool_recompute_keeps_the_pooled_tokens_only(seed):
    x = torch.randn(2, 24, 16, device=DEVICE)  # a frozen encoder's 6x4 grid of features
    w1, b1 = leaf(40, 16, dtype=torch.float32), leaf(40, dtype=torch.float32)
    w2, b2 = leaf(8, 40, dtype=torch.float32), leaf(8, dtype=torch.float32)
    params = {t.untyped_storage().data_ptr() for t in (w1, b1, w2, b2)}
    found = saved_bytes(lambda: fused_mlp(x, w1, b1, w2, b2, "gelu", reduce="avg_pool", grid=(6, 4),
                                          recompute=True, backend="triton"))
    assert sum(v for k, v in found.items() if k not in params) == x.numel() * 4 // 4  # pooled: M/4 rows


def saved_bytes(fn):
    """Bytes of the non-parameter tensors autograd keeps for backward."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return kept


def test_mlp_keeps_only_the_pre_activation(seed):
    x = torch.randn(64, 16, device=DEVICE)  # a frozen encoder's features
    w1, b1 = leaf(96, 16, dtype=torch.float32), leaf(96, dtype=torch.float32)
    w2, b2 = leaf(8, 96, dtype=torch.float32), leaf(8, dtype=torch.float32)
    params = {t.untyped_storage().data_ptr() for t in (x, w1, b1, w2, b2)}
    hidden_bytes = 64 * 96 * 4

    def kept(**kw):
        found = saved_bytes(lambda: fused_mlp(x, w1, b1, w2, b2, "gelu", **kw))
        return sum(v for k, v in found.items() if k not in params)

    assert kept(backend="reference") == 2 * hidden_bytes  # eager: pre-activation and activation
    assert kept(backend="triton") == hidden_bytes
    assert kept(backend="triton", recompute=True) == 0


def test_leading_dims_and_2d_input(seed):
    w, b = leaf(13, 8, dtype=torch.float32), leaf(13, dtype=torch.float32)
    x3 = torch.randn(2, 3, 4, 8, device=DEVICE)
    y = fused_linear_act(x3, w, b, "silu", backend="triton")
    assert y.shape == (2, 3, 4, 13)
    y2 = fused_linear_act(x3.reshape(-1, 8), w, b, "silu", backend="triton")
    assert torch.equal(y.reshape(-1, 13), y2)


def test_dispatch(seed):
    x, w, b = torch.randn(5, 6, dtype=torch.float64), torch.randn(7, 6, dtype=torch.float64), None
    ref = fused_linear_act_reference(x, w, b, "gelu")
    assert torch.equal(fused_linear_act(x, w, b, "gelu"), ref)  # auto: float64 -> reference
    with pytest.raises(ValueError, match="x: backend='triton'"):
        fused_linear_act(x, w, b, "gelu", backend="triton")
    with pytest.raises(ValueError, match="backend: unknown backend"):
        fused_linear_act(x, w, b, "gelu", backend="cutlass")
    assert op.resolve_backend("fused_mlp", "auto", torch.device("cpu")) == "reference"


@pytest.mark.parametrize("call, match", [
    (lambda x, w, b: fused_linear_act(x[0], w, b), "x: expected"),  # 1-D
    (lambda x, w, b: fused_linear_act(x, w[:, :5], b), "w: expects 5 in-features"),
    (lambda x, w, b: fused_linear_act(x, w, b[:3]), r"b: expected shape \(7,\)"),
    (lambda x, w, b: fused_linear_act(x, w.half(), b), "w: dtype"),
    (lambda x, w, b: fused_linear_act(x.long(), w, b), "x: expected a floating dtype"),
    (lambda x, w, b: fused_linear_act(x, w, b, "relu"), "activation: expected one of"),
    (lambda x, w, b: fused_linear_act([x, x[:, :4]], w, b), "w: expects 6 in-features"),
    (lambda x, w, b: fused_linear_act([x, x[:3]], [w, w], b), r"x\[1\]: leading dims"),
    (lambda x, w, b: fused_linear_act(x, w, b, reduce="avg_pool"), "x: token reduction needs"),
    (lambda x, w, b: fused_linear_act(x[None], w, b, reduce="avg_pool"), "grid: 5 tokens"),
    (lambda x, w, b: fused_mlp(x, w, b, w[:, :5], None), "w2: expects 5 in-features"),
    (lambda x, w, b: fused_mlp(x, w, b, w.t(), b), r"b2: expected shape \(6,\)"),
])
def test_bad_input_names_the_argument(call, match):
    x, w, b = torch.randn(5, 6), torch.randn(7, 6), torch.randn(7)
    with pytest.raises(ValueError, match=match):
        call(x, w, b)


@pytest.mark.gpu
@pytest.mark.parametrize("k, n, out", [(1024, 4096, 4096), (1152, 3584, 3584)])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_bf16_projector_shapes_on_gpu(seed, k, n, out, activation):
    dtype = torch.bfloat16
    x = leaf(2, 576, k, dtype=dtype)
    w1, b1 = leaf(n, k, dtype=dtype, scale=k ** -0.5), leaf(n, dtype=dtype, scale=0.1)
    w2, b2 = leaf(out, n, dtype=dtype, scale=n ** -0.5), leaf(out, dtype=dtype, scale=0.1)
    check_against_reference(lambda *a: fused_mlp(*a, activation), lambda *a: fused_mlp_reference(*a, activation),
                            [x, w1, b1, w2, b2], dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("reduce", [None, "pixel_shuffle", "avg_pool"])
def test_bf16_multi_level_reduced_on_gpu(seed, reduce):
    dtype = torch.bfloat16
    mult = 4 if reduce == "pixel_shuffle" else 1
    xs = [leaf(4, 576, 1024, dtype=dtype) for _ in range(4)] + [leaf(4, 576, 768, dtype=dtype)]
    w1 = [leaf(4096, mult * x.shape[-1], dtype=dtype, scale=(5 * mult * 1024) ** -0.5) for x in xs]
    b1, w2, b2 = leaf(4096, dtype=dtype), leaf(4096, 4096, dtype=dtype, scale=4096 ** -0.5), leaf(4096, dtype=dtype)
    check_against_reference(lambda *a: fused_mlp(*a, "gelu", reduce=reduce),
                            lambda *a: fused_mlp_reference(*a, "gelu", reduce=reduce), [xs, w1, b1, w2, b2], dtype)


@pytest.mark.gpu
def test_autocast_on_gpu(seed):
    x = torch.randn(300, 64, device="cuda")
    w1, b1 = leaf(128, 64, dtype=torch.float32), leaf(128, dtype=torch.float32)
    w2, b2 = leaf(32, 128, dtype=torch.float32), leaf(32, dtype=torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = fused_mlp(x, w1, b1, w2, b2, "gelu")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w1.grad.dtype == torch.float32
    with torch.autocast("cuda", dtype=torch.bfloat16):
        base = fused_mlp_reference(x, w1, b1, w2, b2, "gelu")
    autocast_inputs = (t.detach().bfloat16().double() for t in (x, w1, b1, w2, b2))
    ref = fused_mlp_reference(*autocast_inputs, "gelu")
    assert_close(y, ref, base)


def test_cublaslt_backend_limits():
    x, w1, b1 = torch.randn(4, 16), torch.randn(24, 16), torch.randn(24)
    w2, b2 = torch.randn(8, 24), torch.randn(8)
    with pytest.raises(RuntimeError, match="cuBLASLt runs on CUDA devices only"):
        fused_mlp(x, w1, b1, w2, b2, "gelu_tanh", backend="cublaslt")
    limit = op.cublaslt_limitation
    h = [x.half()], [w1.half()]
    assert limit(*h, b1, b2, "gelu_tanh", None) is None
    assert "gelu_tanh" in limit(*h, b1, b2, "gelu", None)
    assert "one input" in limit([x.half(), x.half()], [w1.half()] * 2, b1, b2, "gelu_tanh", None)
    assert "both biases" in limit(*h, None, b2, "gelu_tanh", None)
    assert "float16/bfloat16" in limit([x], [w1], b1, b2, "gelu_tanh", None)
    assert "multiple of 8" in limit([x.half()], [w1[:20].half()], b1, b2, "gelu_tanh", None)


@pytest.mark.gpu
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("m", [2 * 576, 999])
def test_cublaslt_gelu_tanh_on_gpu(seed, m, recompute):
    """GELU_AUX_BIAS forward and DGELU_BGRAD backward against the float64 reference."""
    dtype = torch.bfloat16
    x = leaf(m, 1024, dtype=dtype)
    w1, b1 = leaf(4096, 1024, dtype=dtype, scale=1024 ** -0.5), leaf(4096, dtype=dtype, scale=0.1)
    w2, b2 = leaf(4096, 4096, dtype=dtype, scale=4096 ** -0.5), leaf(4096, dtype=dtype, scale=0.1)
    check_against_reference(lambda *a: fused_mlp(*a, "gelu_tanh", recompute=recompute, backend="cublaslt"),
                            lambda *a: fused_mlp_reference(*a, "gelu_tanh"), [x, w1, b1, w2, b2], dtype)


@pytest.mark.gpu
def test_cublaslt_recompute_keeps_no_hidden_tensor(seed):
    x = torch.randn(576, 1024, device="cuda", dtype=torch.bfloat16)
    w1, b1 = leaf(4096, 1024, dtype=torch.bfloat16), leaf(4096, dtype=torch.bfloat16)
    w2, b2 = leaf(512, 4096, dtype=torch.bfloat16), leaf(512, dtype=torch.bfloat16)
    params = {t.untyped_storage().data_ptr() for t in (x, w1, b1, w2, b2)}
    for recompute, want in ((False, 576 * 4096 * 2), (True, 0)):
        found = saved_bytes(lambda: fused_mlp(x, w1, b1, w2, b2, "gelu_tanh", recompute=recompute,
                                              backend="cublaslt"))
        assert sum(v for k, v in found.items() if k not in params) == want, recompute


def test_fastest_backend_measures_once_and_skips_failures(monkeypatch):
    monkeypatch.setattr(backend, "FASTEST", {})
    calls = {"slow": 0, "fast": 0}
    clock = [0.0]  # a virtual clock the runners advance: a loaded machine cannot reorder them
    monkeypatch.setattr(backend.time, "perf_counter", lambda: clock[0])

    def runner(name, delay):
        def run():
            calls[name] += 1
            clock[0] += delay
        return run

    def broken():
        raise RuntimeError("no algorithm")

    runners = {"slow": runner("slow", 0.02), "broken": broken, "fast": runner("fast", 0.0)}
    cpu = torch.device("cpu")
    with pytest.warns(RuntimeWarning, match="broken: RuntimeError: no algorithm"):
        assert backend.fastest_backend(("k",), runners, cpu) == "fast"
    measured = dict(calls)
    assert backend.fastest_backend(("k",), runners, cpu) == "fast" and calls == measured  # cached
    with pytest.warns(RuntimeWarning):
        assert backend.fastest_backend(("all broken",), {"a": broken, "b": broken}, cpu) == "a"


@pytest.mark.gpu
def test_auto_picks_a_measured_backend_on_gpu(seed, monkeypatch):
    monkeypatch.setattr(backend, "FASTEST", {})
    dtype = torch.bfloat16
    args = [leaf(300, 256, dtype=dtype), leaf(512, 256, dtype=dtype, scale=0.06), leaf(512, dtype=dtype),
            leaf(128, 512, dtype=dtype, scale=0.04), leaf(128, dtype=dtype)]
    check_against_reference(lambda *a: fused_mlp(*a, "gelu_tanh"), lambda *a: fused_mlp_reference(*a, "gelu_tanh"),
                            args, dtype)
    assert list(backend.FASTEST.values()) in (["triton"], ["cublaslt"])


def test_inference_keeps_nothing(seed, monkeypatch):
    """Under no_grad the forward stores no pre-activation (one output write per GEMM)."""
    x, w1, b1 = (torch.randn(*s, device=DEVICE) for s in ((9, 16), (24, 16), (24,)))
    w2, b2 = torch.randn(8, 24, device=DEVICE), torch.randn(8, device=DEVICE)
    allocated, poisoning = [], kernel.alloc

    def counting_alloc(like, *shape, dtype=None):
        allocated.append(shape)
        return poisoning(like, *shape, dtype=dtype)

    monkeypatch.setattr(kernel, "alloc", counting_alloc)
    with torch.no_grad():
        y = fused_mlp(x, w1, b1, w2, b2, "gelu", backend="triton")
    assert allocated == [(9, 24), (9, 8)]
    ref = fused_mlp_reference(x.double(), w1.double(), b1.double(), w2.double(), b2.double(), "gelu")
    assert_close(y, ref, fused_mlp_reference(x, w1, b1, w2, b2, "gelu"))


def test_empty_batch(seed):
    """No tokens: empty output, zero weight and bias gradients (a zero-length reduction)."""
    x = torch.randn(0, 12, device=DEVICE, requires_grad=True)
    w1, b1 = leaf(16, 12, dtype=torch.float32), leaf(16, dtype=torch.float32)
    w2, b2 = leaf(8, 16, dtype=torch.float32), leaf(8, dtype=torch.float32)
    y = fused_mlp(x, w1, b1, w2, b2, "gelu", backend="triton")
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 12)
    for p in (w1, b1, w2, b2):
        assert torch.equal(p.grad, torch.zeros_like(p))


def test_autocast_casts_inputs_like_linear(seed):
    x = torch.randn(5, 8)
    w1, b1 = leaf(12, 8, dtype=torch.float32).cpu(), leaf(12, dtype=torch.float32).cpu()
    w2, b2 = leaf(4, 12, dtype=torch.float32).cpu(), leaf(4, dtype=torch.float32).cpu()
    for p in (w1, b1, w2, b2):
        p.retain_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused_mlp([x], [w1], b1, w2, b2, "gelu", backend="reference")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in (w1, b1, w2, b2))
