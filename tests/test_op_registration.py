"""Every op has one shape: its kernel backends run as torch.library custom ops with fake and
autograd registrations, pass opcheck and trace with torch.compile(fullgraph=True), forward
and backward; the kernel modules import nothing from fastvlm.ops; one activation table.

CPU: the Triton kernels run in the interpreter at tiny sizes (fp32)."""
import ast
import functools
import random
from pathlib import Path

import pytest
import torch
from torch._library.custom_ops import OPDEFS
from torch._library.simple_registry import singleton

import fastvlm.ops
from fastvlm import _ext
from fastvlm.ops import backend, fused_linear_act, fused_mlp, lora_linear
from fastvlm.ops.activations import FUSED_ACTIVATIONS
from tests.utils import assert_close

ROOT = Path(__file__).resolve().parents[1]

# backends that are plain torch (traced like any torch code) or another library's op
NOT_CUSTOM_OPS = {
    ("multimodal_attention", "flash_attn"): "flash-attn's own ops",
    ("linear_cross_entropy", "fused"): "plain torch in an autograd.Function, any head module",
    ("linear_cross_entropy", "checkpointed"): "calls the head module under checkpointing",
    ("linear_logprob", "fused"): "plain torch in an autograd.Function (linear_cross_entropy's loop)",
    ("linear_logprob", "checkpointed"): "calls the head module under checkpointing",
}
# public functions of fastvlm.ops that are not themselves registry ops
NOT_REGISTRY_OPS = {"multimodal_attention_varlen": "a view of multimodal_attention",
                    "reduce_tokens": "plain torch (the fused kernels read through its index map)"}


def test_every_kernel_backend_is_a_custom_op_with_fake_and_autograd():
    public = {name for name in fastvlm.ops.__all__ if callable(getattr(fastvlm.ops, name))
              and not isinstance(getattr(fastvlm.ops, name), type)}
    assert public - set(NOT_REGISTRY_OPS) <= set(backend.REGISTRY)
    for op, spec in backend.REGISTRY.items():
        assert set(spec.custom_ops) <= set(spec.backends), op
        for name in spec.backends:
            if name == "reference" or (op, name) in NOT_CUSTOM_OPS:
                assert name not in spec.custom_ops, (op, name)
                continue
            qualnames = spec.custom_ops.get(name)
            assert qualnames, f"{op}: backend {name!r} runs as no declared custom op"
            for qualname in qualnames:
                if name in ("cpp", "cuda") and not _ext.available():
                    continue  # the C++ op exists only in a built extension
                namespace, opname = qualname.split("::")
                assert hasattr(getattr(torch.ops, namespace), opname), qualname
                assert singleton.find(qualname).fake_impl.kernel is not None, f"{qualname}: no fake impl"
            forward = qualnames[0]
            if forward in OPDEFS:  # a Python custom op: its forward carries the autograd formula
                assert OPDEFS[forward]._backward_fn is not None, f"{forward}: no autograd registration"


def _kernel_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_kernel_modules_import_nothing_from_ops_and_are_named_after_their_op():
    kernels = sorted((ROOT / "fastvlm" / "kernels").glob("*.py"))
    ops = {p.stem for p in (ROOT / "fastvlm" / "ops").glob("*.py")}
    for path in kernels:
        imports = _kernel_imports(path)
        assert not [m for m in imports if m.startswith("fastvlm.ops") or m == "fastvlm"], path.name
        assert path.stem == "__init__" or path.stem in ops, f"{path.name} names no op of fastvlm/ops"


def test_activation_codes_match_the_kernel(seed):
    """The fused epilogue's code of every activation of the table computes that activation
    (and the activations without a code are exactly those the kernel lacks)."""
    x = torch.randn(37, 19, dtype=torch.float64).float()
    w = torch.eye(19)
    for a in FUSED_ACTIVATIONS.values():
        got = fused_linear_act(x, w, None, a.name, backend="triton")
        assert_close(got, a.fn(x.double()), a.fn(x), name=a.name)
    with pytest.raises(ValueError, match="activation"):
        fused_linear_act(x, w, None, "relu", backend="triton")  # the LLM's relu has no fused epilogue


# ---- opcheck of every custom op, forward and backward ----------------------------------------
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _leaf(*shape, grad=True):
    return torch.randn(*shape).requires_grad_(grad)


@pytest.mark.parametrize("reduce", [None, "avg_pool", "pixel_shuffle"])
@pytest.mark.parametrize("recompute", [False, True])
def test_fused_linear_ops_pass_opcheck(reduce, recompute, seed):
    mult = 4 if reduce == "pixel_shuffle" else 1
    xs = [_leaf(2, 8, 6), _leaf(2, 8, 5)] if reduce else [_leaf(9, 6), _leaf(9, 5, grad=False)]
    ws = [_leaf(12, 6 * mult), _leaf(12, 5 * mult)]
    b1, w2, b2 = _leaf(12), _leaf(7, 12), _leaf(7)
    grid = [4, 2] if reduce else [0, 0]
    ops = torch.ops.fastvlm
    torch.library.opcheck(ops.fused_linear_act_fwd.default, (xs, ws, b1, 1, reduce, *grid, recompute, True),
                          test_utils=OPCHECK_UTILS)
    torch.library.opcheck(ops.fused_mlp_fwd.default, (xs, ws, b1, w2, b2, 3, reduce, *grid, recompute, True),
                          test_utils=OPCHECK_UTILS)
    # backward ops on what the forward keeps (run inputs, kept pre-activation or recompute)
    run_xs = [x.detach() for x in xs]
    rows = 4 if reduce else 9
    pre = torch.randn(rows, 12) if not recompute else torch.empty(0)
    needs = [True, False]
    torch.library.opcheck(ops.fused_linear_act_bwd.default,
                          (torch.randn(rows, 12), run_xs, [w.detach() for w in ws], b1.detach(), pre, 4, reduce,
                           *grid, recompute, needs, [False, True], True), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(ops.fused_mlp_bwd.default,
                          (torch.randn(rows, 7), run_xs, [w.detach() for w in ws], b1.detach(), pre, w2.detach(), 2,
                           reduce, *grid, recompute, needs, [True, True], False, True, True),
                          test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("path", ["lora_linear", "lora_linear_cpu"])
@pytest.mark.parametrize("write_u", [False, True])
def test_lora_ops_pass_opcheck(write_u, path, seed):
    x, w, bias = _leaf(11, 20), torch.randn(9, 20), torch.randn(9)
    a, b = _leaf(3, 20), _leaf(9, 3, grad=write_u)
    fwd, bwd = (getattr(torch.ops.fastvlm, f"{path}_{part}").default for part in ("fwd", "bwd"))
    torch.library.opcheck(fwd, (x, w, bias, a, b, 0.5, write_u), test_utils=OPCHECK_UTILS)
    u = torch.randn(11, 3) if write_u else torch.empty(0)
    torch.library.opcheck(bwd,
                          (torch.randn(11, 9), x.detach(), w, a.detach(), b.detach(), u, 0.5, [True, True, write_u]),
                          test_utils=OPCHECK_UTILS)


# ---- torch.compile(fullgraph=True), forward and backward, reference and Triton --------------
def _compare_compiled(op, impl, inputs):
    """op(backend=impl) compiled without graph breaks against it in eager mode, values and
    gradients, both within the error bound of the float64 reference (eager as the same-dtype
    baseline)."""
    torch._dynamo.reset()
    compiled = torch.compile(functools.partial(op, backend=impl), fullgraph=True, backend="aot_eager")
    results = []
    for fn, dtype in ((compiled, None), (functools.partial(op, backend=impl), None),
                      (functools.partial(op, backend="reference"), torch.float64)):
        leaves = [t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad) for t in inputs]
        out = fn(*leaves)
        out.backward(torch.ones_like(out))
        results.append([out.detach(), *(t.grad for t in leaves if t.requires_grad)])
    got, eager, ref64 = results
    for i, (g, e, r) in enumerate(zip(got, eager, ref64)):
        assert_close(g, r, e, name=f"output {i}")


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("reduce", [None, "avg_pool"])
def test_fused_mlp_compiles_fullgraph(impl, reduce, seed):
    shape = (2, 16, 10) if reduce else (13, 10)
    x, w1, b1 = torch.randn(*shape, requires_grad=True), torch.randn(24, 10) * 0.3, torch.randn(24)
    w2, b2 = torch.randn(6, 24) * 0.2, torch.randn(6)
    for t in (w1, b1, w2, b2):
        t.requires_grad_()
    kw = dict(reduce=reduce, grid=(4, 4) if reduce else None)

    def mlp(*args, backend):
        return fused_mlp(*args, "gelu_tanh", recompute=True, backend=backend, **kw) * 2

    def linear_act(x, w, b, backend):
        return fused_linear_act(x, w, b, "silu", backend=backend, **kw).sin()

    _compare_compiled(mlp, impl, [x, w1, b1, w2, b2])
    _compare_compiled(linear_act, impl, [x, w1, b1])


@pytest.mark.parametrize("impl", ["reference", "triton", "cpu"])
def test_lora_linear_compiles_fullgraph(impl, seed):
    x = torch.randn(3, 5, 16, requires_grad=True)
    w, bias = torch.randn(12, 16) * 0.25, torch.randn(12)
    a, b = (torch.randn(4, 16) * 0.25).requires_grad_(), torch.randn(12, 4).requires_grad_()
    def op(x, w, bias, a, b, backend):
        return lora_linear(x, w, bias, a, b, 0.5, backend=backend).relu()

    _compare_compiled(op, impl, [x, w, bias, a, b])


def test_block_map_builds_inside_a_compiled_graph(seed):
    if not _ext.available():
        pytest.skip(f"fastvlm._C not built: {_ext.load_error}")
    from tests.layouts import random_layout
    layout = random_layout(random.Random(seed), 2, 45, "mmca")

    def lists(lo, hi, img):
        return torch.ops.fastvlm.block_map(lo, hi, img, layout.kind_code, 8, 16)

    torch._dynamo.reset()
    got = torch.compile(lists, fullgraph=True, backend="aot_eager")(layout.lo, layout.hi, layout.is_image)
    want = layout.block_map(8, 16, backend="reference").tensors
    assert all(torch.equal(g, w) for g, w in zip(got, want))
