"""Fused LoRA linear (Triton) vs the float64 reference: forward, backward, dispatch.

Without a GPU the kernels run in Triton's interpreter (fp32 / fp16 only: its
bf16 dot is wrong); bf16 and large shapes are GPU-marked.
"""
import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastvlm.nn.lora import LoRALinear
from fastvlm.ops.backend import resolve_backend
from fastvlm.ops.lora_linear import MAX_FUSED_RANK, lora_linear, lora_linear_reference
from tests.utils import assert_close, check_op, poisoned

SHAPES = [(1, 1, 1, 1), (37, 45, 70, 5), (16, 16, 16, 16), (50, 33, 97, 8), (5, 130, 19, 3)]  # M, N, K, r
SMALL_BLOCKS = (16, 16, 16)  # several tiles and ragged edges at these sizes


def make(m, n, k, r, dtype, device="cpu", bias=True):
    x, w = torch.randn(m, k, device=device), torch.randn(n, k, device=device) / k ** 0.5
    a, b = torch.randn(r, k, device=device) / k ** 0.5, torch.randn(n, r, device=device)
    bb = torch.randn(n, device=device) if bias else None
    return [t.to(dtype) if t is not None else None for t in (x, w, bb, a, b)]


def reference64(x, w, bias, a, b, s):
    x, w, a, b = (t.double() for t in (x, w, a, b))
    return x @ w.T + (0 if bias is None else bias.double()) + s * (x @ a.T) @ b.T


def floor_scale(ref: torch.Tensor, magnitude: torch.Tensor, terms: int) -> float:
    """The floor's scale: ‖ref‖, or, where the terms of its sums cancel, the typical rounding
    error of a sum of `terms` products whose magnitudes sum to `magnitude` (random-walk model:
    √terms roundings of the mean term, i.e. ‖magnitude‖ / √terms). Matters for tiny outputs
    (M = N = K = r = 1: one number, which x·w + b can cancel to ~0)."""
    return max(float(ref.norm()), float(magnitude.norm()) / terms ** 0.5)


def magnitude(x, w, bias, a, b, s) -> torch.Tensor:
    """|x||W|ᵀ + |b| + s(|x||A|ᵀ)|B|ᵀ: the forward's sums with every term made positive."""
    return reference64(x.abs(), w.abs(), None if bias is None else bias.abs(), a.abs(), b.abs(), abs(s))


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t's value rounded to dtype, with t's gradient passed through exactly (in float64)."""
    return t + (t.detach().to(dtype).to(t.dtype) - t.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_kernel_vs_float64(shape, dtype, bias, seed):
    from fastvlm.kernels.lora_linear import lora_forward

    m, n, k, r = shape
    x, w, bb, a, b = make(m, n, k, r, dtype, bias=bias)
    # outputs are strided views into NaN-poisoned buffers: the pad must stay untouched
    y_buf, u_buf = poisoned(m, n + 3, dtype=dtype), poisoned(m, r + 2, dtype=dtype)
    y, u = lora_forward(x, w, bb, a, b, 0.75, y=y_buf[:, :n], u=u_buf[:, :r], blocks=SMALL_BLOCKS)
    y64, u64 = reference64(x, w, bb, a, b, 0.75), x.double() @ a.double().T
    assert_close(y, y64, lora_linear_reference(x, w, bb, a, b, 0.75),
                 scale=floor_scale(y64, magnitude(x, w, bb, a, b, 0.75), k), name="y")
    assert_close(u, u64, x @ a.T, scale=floor_scale(u64, x.double().abs() @ a.double().abs().T, k), name="u")
    assert y_buf[:, n:].isnan().all() and u_buf[:, r:].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_dx_kernel_vs_float64(shape, dtype, seed):
    from fastvlm.kernels.lora_linear import lora_backward_dx

    m, n, k, r = shape
    _, w, _, a, b = make(m, n, k, r, dtype)
    g = torch.randn(m, n).to(dtype)
    dx_buf, du_buf = poisoned(m, k + 1, dtype=dtype), poisoned(m, r + 1, dtype=dtype)
    dx, du = lora_backward_dx(g, w, a, b, 0.5, dx=dx_buf[:, :k], du=du_buf[:, :r], blocks=SMALL_BLOCKS)
    g64 = g.double()
    du64 = 0.5 * g64 @ b.double()
    du_torch = (g * 0.5) @ b  # what autograd of lora_linear_reference computes, in dtype
    du_mag = 0.5 * g64.abs() @ b.double().abs()
    assert_close(du, du64, du_torch, scale=floor_scale(du64, du_mag, n), name="du")
    dx64 = g64 @ w.double() + du64 @ a.double()
    dx_mag = g64.abs() @ w.double().abs() + du_mag @ a.double().abs()
    assert_close(dx, dx64, g @ w + du_torch @ a, scale=floor_scale(dx64, dx_mag, n), name="dx")
    assert dx_buf[:, k:].isnan().all() and du_buf[:, r:].isnan().all()


def int64_offsets_check(seed: int):
    """Runs in a subprocess (see the test below); returns the names of wrong outputs.

    x, y, u, gy, dx, du get a row stride S that fits int32 while 2 * S does not: the
    products rm * stride of an [M, K] tensor with M * K > 2^31 on a GPU (131k tokens x
    14336 features). The interpreter wraps int32 like the GPU, so unwidened offsets
    land ~4 GiB away. The ~4.3 GiB buffers are committed only where the views touch."""
    from fastvlm.kernels.lora_linear import lora_backward_dx, lora_forward

    torch.manual_seed(seed)
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
    y2, u2, dx2, du2 = (view(dst, poisoned(like=t), o)
                        for t, o in ((want[0], 0), (want[1], 48), (want[2], 64), (want[3], 112)))
    got = (*lora_forward(x2, w, bb, a, b, 0.75, y=y2, u=u2, blocks=SMALL_BLOCKS),
           *lora_backward_dx(gy2, w, a, b, 0.5, dx=dx2, du=du2, blocks=SMALL_BLOCKS))
    return [name for name, g, e in zip(("y", "u", "dx", "du"), got, want) if not torch.equal(g, e)]


def test_offsets_past_int32_range(seed):
    """Row offsets are int64 (a GPU-only wrap at realistic M * K). In a subprocess: an
    unwidened offset may SIGSEGV, which must fail this test, not kill the session."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = f"import json; from tests.test_lora_linear import int64_offsets_check as f; print(json.dumps(f({seed})))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def check_autograd(x, w, bb, a, b, scaling, backend):
    """lora_linear with fp32 adapter masters (as LoRALinear keeps them) vs float64, bound by the
    reference in x's dtype: values and the gradients of x, A and B."""
    dtype = x.dtype

    def ref64(x, a, b):  # the adapter computes in x's dtype: its values rounded, gradients exact
        return reference64(x, w, bb, rounded(a, dtype), rounded(b, dtype), scaling)

    y = check_op(lambda x, a, b: lora_linear(x, w, bb, a, b, scaling, backend=backend), ref64,
                 [x.requires_grad_(), a.float().requires_grad_(), b.float().requires_grad_()],
                 baseline=lambda x, a, b: lora_linear_reference(x, w, bb, a, b, scaling), dtype=dtype)
    assert y.dtype == dtype


@pytest.mark.parametrize("path", ["triton", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_autograd_matches_float64(dtype, path, seed):
    x, w, bb, a, b = make(2 * 21, 40, 36, 6, dtype)
    check_autograd(x.reshape(2, 21, 36), w, bb, a, b, 1.5, path)


def test_cpu_path_without_bias_and_past_the_kernel_rank(seed):
    """The CPU path has no tile limits: no bias and a rank above MAX_FUSED_RANK."""
    x, w, _, _, _ = make(2 * 9, 12, 10, 1, torch.float32)
    r = MAX_FUSED_RANK + 3
    a, b = torch.randn(r, 10) / 10 ** 0.5, torch.randn(12, r) / r ** 0.5
    check_autograd(x.reshape(2, 9, 10), w, None, a, b, 0.5, "cpu")


@pytest.mark.parametrize("path", ["triton", "cpu"])
def test_autocast_computes_in_autocast_dtype(path, seed):
    x, w, bb, a, b = make(19, 24, 40, 4, torch.float32)
    a.requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        got = lora_linear(x, w, bb, a, b, 2.0, backend=path)
        want = lora_linear_reference(x, w, bb, a, b, 2.0)
    assert got.dtype == want.dtype == torch.float16
    ref64 = reference64(*(t.half() for t in (x, w)), bb.half(), a.half(), b.half(), 2.0)  # autocast's inputs
    assert_close(got, ref64, want)
    got.float().sum().backward()
    assert a.grad.dtype == torch.float32 and torch.isfinite(a.grad).all()


@pytest.mark.parametrize("path", ["triton", "cpu"])
def test_lora_linear_module_uses_fused_path(path, seed):
    """The module on the fused path vs the same module on the reference (the fp32 baseline)
    and in float64: two fp32 computations differ by their summation orders, so neither is
    the truth (comparing them at a fixed 1e-5 failed for 1 seed in 20)."""
    base = torch.nn.Linear(33, 27)
    fused, ref = LoRALinear(base, r=4, alpha=8, backend=path), LoRALinear(base, r=4, alpha=8,
                                                                             backend="reference")
    ref.load_state_dict(fused.state_dict())
    torch.nn.init.normal_(fused.lora_B)
    ref.lora_B.data.copy_(fused.lora_B)
    ref64 = copy.deepcopy(ref).double()
    x = torch.randn(3, 5, 33)
    runs = []
    for module, inp in ((fused, x), (ref, x), (ref64, x.double())):
        inp = inp.clone().requires_grad_()
        y = module(inp)
        y.square().sum().backward()
        runs.append((y.detach(), inp.grad, module.lora_A.grad, module.lora_B.grad))
    for name, got, base32, want in zip(("y", "x.grad", "lora_A.grad", "lora_B.grad"), *runs):
        assert_close(got, want, base32, name=name)


def test_dispatch(monkeypatch):
    assert resolve_backend("lora_linear", "auto", "cpu") == "cpu"
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
    check_autograd(x, w, bb, a, b, 2.0, "auto")
