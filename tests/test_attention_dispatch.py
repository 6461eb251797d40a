"""multimodal_attention's dispatch: which layouts flash-attn can serve, the packing
into its varlen arguments, and the measured choice of `auto`.

flash-attn is GPU-only and not installed here; its varlen function is replaced by
a float64 per-segment implementation with the same signature, so the packing,
padding and GQA plumbing around it is checked against the reference on CPU.
"""
import random
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from fastvlm.kernels import attention as kernels
from fastvlm.ops import AttentionLayout, backend, multimodal_attention
from fastvlm.ops import attention as attention_module
from fastvlm.ops.attention import attention_reference, flash_limitation
from tests.layouts import attention_grads, attention_grads_in_dtype, attention_in_dtype, random_layout
from tests.utils import assert_close


def causal_twin(layout: AttentionLayout) -> AttentionLayout:
    return AttentionLayout(layout.segment_ids, kind="causal")


@pytest.mark.parametrize("kind", ["causal", "prefix_lm", "image_bidirectional", "mmca"])
def test_is_packed_causal_agrees_with_the_dense_mask(kind, seed):
    rng = random.Random(seed)
    # Causal layouts are packed causal unless all padding (False by definition, checked exactly):
    # True must come up; the other kinds must give both answers (a few % of their layouts are causal).
    want_seen = {True} if kind == "causal" else {True, False}
    seen = set()
    for trial in range(1000):  # at least 40, and until the answers wanted came up
        if trial >= 40 and want_seen <= seen:
            break
        layout = random_layout(rng, rng.randint(1, 3), rng.randint(5, 40), kind)
        # all padding is no causal layout (flash-attn gets nothing to run): False by definition
        want = bool(torch.equal(layout.dense(), causal_twin(layout).dense())) and bool((layout.segment_ids >= 0).any())
        if kind in ("mmca", "image_bidirectional"):
            # conservative with images: one-token images (also two of them touching across a sample
            # boundary) are causal too; a False only costs the flash path, a wrong True would be wrong
            assert want or not layout.is_packed_causal, trial
        else:
            assert layout.is_packed_causal == want, (trial, kind)
        seen.add(layout.is_packed_causal)
    assert want_seen <= seen


def test_text_only_multimodal_layouts_are_packed_causal():
    seg = torch.tensor([[0, 0, 0, 1, 1, -1]])
    text = torch.full_like(seg, -1)
    assert AttentionLayout(seg, text, kind="mmca", split_softmax=True).is_packed_causal
    image = torch.tensor([[-1, 0, 0, -1, -1, -1]])
    assert not AttentionLayout(seg, image, kind="mmca").is_packed_causal
    assert not AttentionLayout(seg, image, kind="image_bidirectional").is_packed_causal


def test_varlen_segments_lists_every_segment_of_every_row():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1], [4, 4, 4, 4, -1, -1], [0, 0, 0, 0, 0, 0]])
    cu, index, max_len = AttentionLayout(seg).varlen_segments()
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 2, 5, 9, 15]
    assert index.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 12, 13, 14, 15, 16, 17]
    assert max_len == 6
    cu, index, max_len = AttentionLayout(seg[2:]).varlen_segments()
    assert cu.tolist() == [0, 6] and index is None and max_len == 6
    # ids are arbitrary: equal or large ids in consecutive rows stay separate segments
    for ids in ([[5, 5, 5, 5], [0, 0, 0, 0]], [[3, 3, 7, 7], [7, 7, 3, 3]], [[2**30] * 4, [2**30] * 4]):
        cu, _, _ = AttentionLayout(torch.tensor(ids)).varlen_segments()
        assert torch.diff(cu).tolist() == ([4, 4] if ids[0][0] == ids[0][-1] else [2, 2, 2, 2]), ids


def test_an_all_padding_layout_is_not_packed_causal():
    layout = AttentionLayout(torch.full((2, 5), -1))
    assert not layout.is_packed_causal
    assert "all padding" in flash_limitation(torch.randn(2, 1, 5, 8, dtype=torch.float16), layout)


def fake_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False,
                      deterministic=False):
    """flash-attn 2's flash_attn_varlen_func, in float64, one segment at a time."""
    assert causal and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    lengths = torch.diff(cu_q)
    assert int(lengths.max()) == max_q == max_k and q.stride(-1) == 1
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (t[start:end].transpose(0, 1).double() for t in (q, k, v))
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=softmax_scale)
        out[start:end] = o.transpose(0, 1).to(q.dtype)
    return out


@pytest.fixture
def fake_flash_attn(monkeypatch):
    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = fake_flash_varlen
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    attention_module._flash_varlen.cache_clear()
    yield
    attention_module._flash_varlen.cache_clear()  # the fake must not outlive the test


def test_flash_installed_without_a_gpu_is_unavailable_not_an_error(fake_flash_attn, monkeypatch):
    """`fastvlm info` on a machine with flash-attn but no GPU (a login node) used to raise
    from get_device_capability."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    why = backend.why_unavailable("multimodal_attention", "flash_attn", torch.device("cuda"))
    assert why == "no CUDA device is available"


@pytest.mark.parametrize("batch,hq,hkv,n,d", [(1, 2, 2, 37, 16), (3, 4, 2, 29, 24), (2, 6, 1, 50, 8)])
def test_flash_path_matches_reference_with_padding_and_gqa(fake_flash_attn, batch, hq, hkv, n, d, seed):
    rng = random.Random(seed)
    layout = random_layout(rng, batch, n, "causal")
    for _ in range(50):  # with padding, so the scatter back into [B * N] rows is exercised
        if layout.varlen_segments()[1] is not None:
            break
        layout = random_layout(rng, batch, n, "causal")
    assert layout.varlen_segments()[1] is not None, "no layout with padding drawn"
    leaves = [torch.randn(batch, h, n, d, dtype=torch.float32).requires_grad_() for h in (hq, hkv, hkv)]
    dout = torch.randn(batch, hq, n, d)
    scale = 0.3
    out = attention_module._flash_attention(*leaves, layout, scale, False)
    out.backward(dout)
    dense = lambda *a: attention_reference(*a[:4], scale=a[4], impl="dense")  # noqa: E731
    want = attention_grads(dense, *leaves, dout, layout, scale, torch.float64)
    base = attention_grads_in_dtype(*(t.detach() for t in leaves), dout, layout, scale)
    for name, got, ref, b in zip(("out", "dq", "dk", "dv"), (out.detach(), *(t.grad for t in leaves)), want, base):
        assert_close(got, ref, b, name=name)
    live = (layout.segment_ids >= 0)[:, None, :, None]
    assert bool((out.detach() * ~live == 0).all())  # padding rows are exactly 0


def test_flash_limitations_name_what_is_wrong():
    causal = AttentionLayout(torch.zeros(1, 8, dtype=torch.int32))
    half = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    assert flash_limitation(half, causal) is None
    assert "float16/bfloat16" in flash_limitation(half.float(), causal)
    assert "head_dim" in flash_limitation(torch.randn(1, 2, 8, 36, dtype=torch.float16), causal)
    image = torch.tensor([[-1, 0, 0, 0, -1, -1, -1, -1]])
    bidir = AttentionLayout(torch.zeros(1, 8, dtype=torch.int32), image, kind="image_bidirectional")
    assert "causal" in flash_limitation(half, bidir)


def test_explicit_flash_backend_refuses_cpu_tensors(fake_flash_attn):
    layout = AttentionLayout(torch.zeros(1, 8, dtype=torch.int32))
    q = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="flash_attn.*CUDA"):
        multimodal_attention(q, q, q, layout, backend="flash_attn")


def test_measured_choice_off_cuda_is_the_table_config():
    layout = AttentionLayout(torch.zeros(1, 8, dtype=torch.int32))
    q = torch.randn(1, 2, 8, 64)
    cfg = attention_module._measured_choice(q, q, q, layout, 0.1, with_flash=True, deterministic=False)
    assert cfg == (kernels.pick_config(q.device, 64), kernels.pick_config(q.device, 64, backward=True))


def test_trial_runs_leave_the_callers_graph_alone(seed):
    """`auto` times candidates on detached views: no gradient reaches the caller's tensors."""
    layout = random_layout(random.Random(seed), 1, 21, "mmca", split_softmax=True)
    q, k, v = (torch.randn(1, 2, 21, 16, requires_grad=True) for _ in range(3))
    cfgs = (kernels.INTERPRETER_CONFIG, kernels.INTERPRETER_CONFIG)
    attention_module._trial(cfgs, q, k, v, layout, 0.25, training=True, deterministic=False)()
    assert q.grad is None and k.grad is None and v.grad is None


def test_a_candidate_that_raises_any_error_is_dropped_with_a_warning(monkeypatch):
    class OutOfResources(Exception):  # what Triton raises when a config needs too much shared memory
        pass

    def too_big():
        raise OutOfResources("shared memory")

    monkeypatch.setattr(backend, "FASTEST", {})
    with pytest.warns(RuntimeWarning, match="big: OutOfResources: shared memory"):
        choice = backend.fastest_backend(("k",), {"big": too_big, "fits": lambda: None}, torch.device("cpu"))
    assert choice == "fits" and backend.FASTEST == {("k",): "fits"}


def test_a_decision_taken_out_of_memory_is_not_cached(monkeypatch):
    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(backend, "FASTEST", {})
    with pytest.warns(RuntimeWarning, match="out of memory"):
        assert backend.fastest_backend(("k",), {"a": oom, "b": lambda: None}, torch.device("cpu")) == "b"
    assert backend.FASTEST == {}


def test_autotune_off_takes_the_first_candidate_untimed(monkeypatch):
    monkeypatch.setattr(backend, "FASTEST", {})
    monkeypatch.setattr(backend, "AUTOTUNE", False)

    def never():
        raise AssertionError("timed although FASTVLM_AUTOTUNE=0")

    assert backend.fastest_backend(("k",), {"table": never, "other": never}, torch.device("cpu")) == "table"


def test_timing_inside_a_non_reentrant_checkpoint_leaves_it_intact(monkeypatch, seed):
    """The first call of a shape may come inside activation checkpointing; its trials must
    not hand their tensors to the checkpoint (which would replay the region mid-forward)."""
    monkeypatch.setattr(backend, "FASTEST", {})
    w = torch.randn(8, 8, requires_grad=True)

    def region(x):
        def trial():
            leaf = x.detach().requires_grad_()
            (leaf @ w.detach()).tanh().sum().backward()
        backend.fastest_backend(("ckpt", x.shape), {"only": trial}, x.device)
        return (x @ w).tanh()

    x = torch.randn(4, 8, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(region, x, use_reentrant=False)
    out.sum().backward()
    want_x, want_w = torch.autograd.grad((x @ w).tanh().sum(), (x, w))
    assert torch.equal(x.grad, want_x) and torch.equal(w.grad, want_w)  # the same ops on the same values
    assert backend.FASTEST == {("ckpt", x.shape): "only"}


def test_timing_inside_selective_checkpointing_leaves_its_cache_alone(monkeypatch, seed):
    """Selective checkpointing caches the outputs of chosen ops in order and hands them back
    in recompute: a trial's output (other inputs) must not be among them."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    monkeypatch.setattr(backend, "FASTEST", {})
    w, other = torch.randn(8, 8, requires_grad=True), torch.randn(8, 8)

    def keep_mm(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op == torch.ops.aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE

    def region(x):
        def trial():  # the same op on other values, as a candidate config would run
            (x.detach() @ other).tanh().sum()
        backend.fastest_backend(("sac", x.shape), {"only": trial}, x.device)
        return (x @ w).tanh()

    x = torch.randn(4, 8, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(
        region, x, use_reentrant=False,
        context_fn=lambda: create_selective_checkpoint_contexts(keep_mm))
    out.sum().backward()
    want_x, want_w = torch.autograd.grad((x @ w).tanh().sum(), (x, w))
    assert torch.equal(x.grad, want_x) and torch.equal(w.grad, want_w)  # the same ops on the same values


def test_choice_key_separates_what_changes_the_winner():
    causal = AttentionLayout(torch.zeros(2, 1000, dtype=torch.int32))
    q, k = torch.randn(2, 8, 1000, 64, dtype=torch.float16), torch.randn(2, 2, 1000, 64, dtype=torch.float16)
    base = attention_module.choice_key(q, k, causal, flash=True, training=True)
    # N rounds up to a power of two: 1000 and 1024 share a measurement
    q1024 = torch.randn(2, 8, 1024, 64, dtype=torch.float16)
    assert attention_module.choice_key(q1024, k, causal, True, True) == base
    others = [attention_module.choice_key(q[:1], k[:1], causal, True, True),  # batch
              attention_module.choice_key(q.float(), k, causal, True, True),  # dtype
              attention_module.choice_key(q, k[:, :1], causal, True, True),  # GQA group
              attention_module.choice_key(q[..., :32], k, causal, True, True),  # head_dim
              attention_module.choice_key(q, k, causal, False, True),  # flash not in the running
              attention_module.choice_key(q, k, causal, True, False),  # forward only
              attention_module.choice_key(q, k, causal, True, True, deterministic=True),  # backward mode
              attention_module.choice_key(q, k, AttentionLayout(causal.segment_ids, kind="mmca",
                                                                split_softmax=True), True, True)]
    assert len({base, *others}) == len(others) + 1


def test_candidate_configs_start_with_the_table_entry():
    for cap in ((8, 0), (9, 0), (8, 9)):
        for d in (32, 64, 80, 128, 256):
            cands = kernels.candidate_configs(cap, d)
            first = (kernels.gpu_config(cap, d), kernels.gpu_config(cap, d, backward=True))
            assert cands[0] == first and len(set(cands)) == len(cands)


@pytest.mark.gpu
def test_gpu_auto_times_candidates_once_and_matches_reference(seed, monkeypatch):
    monkeypatch.setattr(backend, "FASTEST", {})
    layout = random_layout(random.Random(seed), 2, 3000, "image_bidirectional", device="cuda")
    leaves = [torch.randn(2, h, 3000, 128, device="cuda", dtype=torch.bfloat16).requires_grad_()
              for h in (8, 2, 2)]
    out = multimodal_attention(*leaves, layout)
    out.float().square().sum().backward()
    (choice,) = backend.FASTEST.values()
    assert choice in kernels.candidate_configs(torch.cuda.get_device_capability(), 128)
    want = attention_reference(*(t.detach().double() for t in leaves), layout, impl="blockwise")
    assert_close(out, want, attention_in_dtype(*(t.detach() for t in leaves), layout, 128 ** -0.5))
    multimodal_attention(*leaves, layout)
    assert len(backend.FASTEST) == 1  # the second call reuses the measurement


@pytest.mark.gpu
def test_gpu_fp32_goes_to_the_reference_under_auto_and_is_refused_by_triton(seed):
    layout = random_layout(random.Random(seed), 1, 300, "mmca", device="cuda")
    q = torch.randn(1, 2, 300, 64, device="cuda")
    want = attention_reference(q.double(), q.double(), q.double(), layout)
    assert_close(multimodal_attention(q, q, q, layout), want, attention_in_dtype(q, q, q, layout, 64 ** -0.5))
    with pytest.raises(ValueError, match="q: the Triton attention kernel takes float16/bfloat16 on CUDA"):
        multimodal_attention(q, q, q, layout, backend="triton")
