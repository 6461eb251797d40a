"""Fused LoRA linear (Triton) vs the float64 reference: forward, backward, dispatch.

Without a GPU the kernels run in Triton's interpreter (fp32 / fp16 only: its
bf16 dot is wrong); bf16 and large shapes are GPU-marked.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastvlm.ops.backend import resolve_backend
from fastvlm.ops.lora_linear import MAX_FUSED_RANK, lora_linear, lora_linear_reference
from fastvlm.nn.lora import LoRALinear

# max |err| / max |ref|: fp32 dots run in IEEE fp32; fp16 operands round to 2^-11
# and u = x Aᵀ is rounded to fp16 before multiplying by B, as torch's own chain does.
RTOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
SHAPES = [(1, 1, 1, 1), (37, 45, 70, 5), (16, 16, 16, 16), (50, 33, 97, 8), (5, 130, 19, 3)]  # M, N, K, r
SMALL_BLOCKS = (16, 16, 16)  # several tiles and ragged edges at these sizes


def rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def make(m, n, k, r, dtype, device="cpu", bias=True):
    x, w = torch.randn(m, k, device=device), torch.randn(n, k, device=device) / k ** 0.5
    a, b = torch.randn(r, k, device=device) / k ** 0.5, torch.randn(n, r, device=device)
    bb = torch.randn(n, device=device) if bias else None
    return [t.to(dtype) if t is not None else None for t in (x, w, bb, a, b)]


def reference64(x, w, bias, a, b, s):
    x, w, a, b = (t.double() for t in (x, w, a, b))
    return x @ w.T + (0 if bias is None else bias.double()) + s * (x @ a.T) @ b.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_kernel_vs_float64(shape, dtype, bias, seed):
    from fastvlm.kernels.lora_linear import lora_forward

    m, n, k, r = shape
    x, w, bb, a, b = make(m, n, k, r, dtype, bias=bias)
    # outputs are strided views into NaN-poisoned buffers: the pad must stay untouched
    y_buf = torch.full((m, n + 3), float("nan"), dtype=dtype)
    u_buf = torch.full((m, r + 2), float("nan"), dtype=dtype)
    y, u = lora_forward(x, w, bb, a, b, 0.75, y=y_buf[:, :n], u=u_buf[:, :r], blocks=SMALL_BLOCKS)
    assert rel_err(y, reference64(x, w, bb, a, b, 0.75)) < RTOL[dtype]
    assert rel_err(u, x.double() @ a.double().T) < RTOL[dtype]
    assert y_buf[:, n:].isnan().all() and u_buf[:, r:].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_dx_kernel_vs_float64(shape, dtype, seed):
    from fastvlm.kernels.lora_linear import lora_backward_dx

    m, n, k, r = shape
    _, w, _, a, b = make(m, n, k, r, dtype)
    g = torch.randn(m, n).to(dtype)
    dx_buf = torch.full((m, k + 1), float("nan"), dtype=dtype)
    du_buf = torch.full((m, r + 1), float("nan"), dtype=dtype)
    dx, du = lora_backward_dx(g, w, a, b, 0.5, dx=dx_buf[:, :k], du=du_buf[:, :r], blocks=SMALL_BLOCKS)
    g64 = g.double()
    du64 = 0.5 * g64 @ b.double()
    assert rel_err(du, du64) < RTOL[dtype]
    assert rel_err(dx, g64 @ w.double() + du64 @ a.double()) < RTOL[dtype]
    assert dx_buf[:, k:].isnan().all() and du_buf[:, r:].isnan().all()


def int64_offsets_check():
    """Runs in a subprocess (see the test below); returns the names of wrong outputs.

    x, y, u, gy, dx, du get a row stride S that fits int32 while 2 * S does not: the
    products rm * stride of an [M, K] tensor with M * K > 2^31 on a GPU (131k tokens x
    14336 features). The interpreter wraps int32 like the GPU, so unwidened offsets
    land ~4 GiB away. The ~4.3 GiB buffers are committed only where the views touch."""
    from fastvlm.kernels.lora_linear import lora_backward_dx, lora_forward

    torch.manual_seed(0)
    m, n, k, r = 3, 33, 40, 5
    x, w, bb, a, b = make(m, n, k, r, torch.float16)
    gy = torch.randn(m, n).to(torch.float16)
    want = (*lora_forward(x, w, bb, a, b, 0.75, blocks=SMALL_BLOCKS),
            *lora_backward_dx(gy, w, a, b, 0.5, blocks=SMALL_BLOCKS))
    stride = 2 ** 30 + 64  # row 2 starts at 2^31 + 128 elements
    src = torch.empty(2 * stride + 256, dtype=torch.float16)
    dst = torch.empty(2 * stride + 256, dtype=torch.float16)

    def view(buf, like, offset):
        v = buf.as_strided(like.shape, (stride, 1), offset)
        v.copy_(like)  # only these elements' pages are committed
        return v

    x2, gy2 = view(src, x, 0), view(src, gy, 64)
    y2, u2, dx2, du2 = (view(dst, torch.full_like(t, float("nan")), o)
                        for t, o in ((want[0], 0), (want[1], 48), (want[2], 64), (want[3], 112)))
    got = (*lora_forward(x2, w, bb, a, b, 0.75, y=y2, u=u2, blocks=SMALL_BLOCKS),
           *lora_backward_dx(gy2, w, a, b, 0.5, dx=dx2, du=du2, blocks=SMALL_BLOCKS))
    return [name for name, g, e in zip(("y", "u", "dx", "du"), got, want) if not torch.equal(g, e)]


def test_offsets_past_int32_range():
    """Row offsets are int64 (a GPU-only wrap at realistic M * K). In a subprocess: an
    unwidened offset may SIGSEGV, which must fail this test, not kill the session."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = "import json; from tests.test_lora_kernel import int64_offsets_check as f; print(json.dumps(f()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_autograd_matches_float64(dtype, seed):
    x, w, bb, a, b = make(2 * 21, 40, 36, 6, dtype)
    x = x.reshape(2, 21, 36).requires_grad_()
    a, b = a.float().requires_grad_(), b.float().requires_grad_()  # fp32 masters, as LoRALinear keeps them
    y = lora_linear(x, w, bb, a, b, 1.5, backend="triton")
    assert y.dtype == dtype and y.shape == (2, 21, 40)
    gy = torch.randn_like(y)
    y.backward(gy)
    ref = [t.detach().double().requires_grad_() for t in (x, a.to(dtype), b.to(dtype))]
    y64 = reference64(ref[0], w, bb, ref[1], ref[2], 1.5)
    y64.backward(gy.double())
    assert rel_err(y, y64) < RTOL[dtype]
    for got, want in zip((x.grad, a.grad, b.grad), ref):
        assert got.dtype == (dtype if got is x.grad else torch.float32)
        assert rel_err(got, want.grad) < RTOL[dtype]


def test_autocast_computes_in_autocast_dtype(seed):
    x, w, bb, a, b = make(19, 24, 40, 4, torch.float32)
    a.requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        got = lora_linear(x, w, bb, a, b, 2.0, backend="triton")
        want = lora_linear_reference(x, w, bb, a, b, 2.0)
    assert got.dtype == want.dtype == torch.float16
    assert rel_err(got, want.double()) < RTOL[torch.float16]
    got.float().sum().backward()
    assert a.grad.dtype == torch.float32 and torch.isfinite(a.grad).all()


def test_lora_linear_module_uses_fused_path(seed):
    base = torch.nn.Linear(33, 27)
    fused, ref = LoRALinear(base, r=4, alpha=8, backend="triton"), LoRALinear(base, r=4, alpha=8,
                                                                             backend="reference")
    ref.load_state_dict(fused.state_dict())
    torch.nn.init.normal_(fused.lora_B)
    ref.lora_B.data.copy_(fused.lora_B)
    x = torch.randn(3, 5, 33, requires_grad=True)
    y1, y2 = fused(x), ref(x)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    y1.square().sum().backward()
    gx, x.grad = x.grad, None
    y2.square().sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.lora_A.grad, ref.lora_A.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.lora_B.grad, ref.lora_B.grad, rtol=1e-4, atol=1e-5)


def test_dispatch(monkeypatch):
    assert resolve_backend("lora_linear", "auto", "cpu") == "reference"
    x, w, bb, a, b = make(4, 6, 8, 2, torch.float32)
    with pytest.raises(ValueError, match="backend:.*frozen"):
        lora_linear(x, w.requires_grad_(), bb, a, b, 1.0, backend="triton")
    with pytest.raises(ValueError, match="backend:.*float64"):
        lora_linear(x.double(), w.detach().double(), None, a.double(), b.double(), 1.0, backend="triton")
    with pytest.raises(ValueError, match="backend:.*ranks up to"):
        r = MAX_FUSED_RANK + 1
        lora_linear(x, w.detach(), bb, torch.randn(r, 8), torch.randn(6, r), 1.0, backend="triton")
    with pytest.raises(ValueError, match="backend:.*empty"):  # auto on CUDA hands it to the reference
        lora_linear(torch.randn(0, 8), w.detach(), bb, a, b, 1.0, backend="triton")
    from fastvlm.kernels import lora_linear as kernels
    monkeypatch.setattr(kernels, "INTERPRETED", False)  # defined without the interpreter: CPU cannot run them
    with pytest.raises(RuntimeError, match="CUDA"):
        lora_linear(x, w.detach(), bb, a, b, 1.0, backend="triton")


# Compiles both kernels to cubin for sm_80 (Triton ships ptxas, no GPU needed) in bf16
# (which the interpreter cannot check) and fp32 (the largest tiles) at the largest fused
# rank: catches lowering errors and checks shared memory fits consumer GPUs (sm_86/89
# compile the same tiles). fp16 lowers as bf16 does; ~30 s with a cold Triton cache.
AOT_SCRIPT = textwrap.dedent("""
    import json, sys, torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastvlm.kernels import lora_linear as L
    out = {}
    for arch in (80,):
        for dt, torch_dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            bm, bn, bk = L._default_blocks(torch_dt)
            const = dict(PRECISION=L._precision(torch_dt), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                         BLOCK_R=L._rank_block(int(sys.argv[1])))
            for fn, extra in ((L._lora_fwd_kernel, dict(HAS_BIAS=True, WRITE_U=True)), (L._lora_bwd_dx_kernel, {})):
                c = {**const, **extra}
                sig = {a: "constexpr" if a in c else "fp32" if a == "scaling" else
                       "i32" if a in "MNKR" or a.startswith("stride") else "*" + dt for a in fn.arg_names}
                k = triton.compile(ASTSource(fn, sig, c), target=GPUTarget("cuda", arch, 32))
                out[f"sm_{arch} {dt} {fn.__name__}"] = k.metadata.shared
    print(json.dumps(out))
""")
SM86_SHARED_LIMIT = 99 * 1024  # opt-in shared memory per block on sm_86 / sm_89 (same tiles as sm_80)


def test_kernels_compile_for_gpus_and_fit_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real @triton.jit functions
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT, str(MAX_FUSED_RANK)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(shared) == 2 * 2
    too_big = {k: v for k, v in shared.items() if v > SM86_SHARED_LIMIT}
    assert not too_big, too_big


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 4096, 4096, 16), (777, 4096, 11008, 64), (4097, 1000, 1024, 8)])
def test_cuda_forward_backward_vs_float64(shape, dtype, seed):
    m, n, k, r = shape
    assert resolve_backend("lora_linear", "auto", "cuda") == "triton"
    x, w, bb, a, b = make(m, n, k, r, dtype, device="cuda")
    x.requires_grad_()
    a, b = a.float().requires_grad_(), b.float().requires_grad_()
    y = lora_linear(x, w, bb, a, b, 2.0)
    gy = torch.randn_like(y)
    y.backward(gy)
    ref = [t.detach().double().requires_grad_() for t in (x, a.to(dtype), b.to(dtype))]
    y64 = reference64(ref[0], w, bb, ref[1], ref[2], 2.0)
    y64.backward(gy.double())
    assert rel_err(y, y64) < RTOL[dtype]
    for got, want in zip((x.grad, a.grad, b.grad), ref):
        assert rel_err(got, want.grad) < RTOL[dtype]
