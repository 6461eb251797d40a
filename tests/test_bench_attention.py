"""The attention benchmark's CPU smoke mode runs end to end and says it is no speed test."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastvlm.ops import AttentionLayout
from fastvlm.ops.attention import attention_reference
from tests.utils import check_op

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_attention import grid_methods, measure, varlen_method  # noqa: E402


@pytest.mark.parametrize("window", [None, 7])
def test_bench_attention_smoke(window, tmp_path):
    """--window W puts a sliding window on every layout and writes its own results file (the
    window-free table stays the README's headline)."""
    extra = [] if window is None else ["--window", str(window)]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attention.py"), "--smoke",
                           "--kinds", "mmca_split", "--out", str(tmp_path), *extra],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NOT a speed test" in proc.stdout
    tag = "smoke" if window is None else f"window{window}_smoke"
    (result,) = tmp_path.glob(f"bench_attention_{tag}_*.json")
    data = json.loads(result.read_text())
    assert {r["window"] for r in data["rows"]} == {window}
    methods = {r["method"] for r in data["rows"]}
    assert {"fastvlm", "reference"} <= methods
    assert all("fwd_bwd_ms" in r for r in data["rows"]), [r for r in data["rows"] if "error" in r]
    # each row also went to the .jsonl as it was measured (what a run cut short keeps)
    streamed = [json.loads(line) for line in result.with_suffix(".jsonl").read_text().splitlines()]
    case = lambda r: (r["layout"], r["kind"], r["N"], r["method"], r["fwd_bwd_ms"])  # noqa: E731
    assert [case(r) for r in streamed] == [case(r) for r in data["rows"]]
    assert [r["method"] for r in data["training_loop"]] == ["fastvlm", "sdpa_dense"]
    assert list(tmp_path.glob(f"bench_attention_{tag}_*.png"))


def _per_segment_causal(q, k, v, cu, max_len):
    """A varlen kernel in plain PyTorch: [T, H, D] packed segments, causal within each."""
    outs = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                           enable_gqa=True).transpose(0, 1)
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    return torch.cat(outs)


def test_varlen_baselines_return_the_query_shape_with_padding_zeroed(seed):
    """The FA2-varlen baselines (flash-attn's, PyTorch's own) go through varlen_method: packed
    [T, H, D] in, [B, H, N, D] out with padding rows 0, so measure()'s backward (an upstream
    gradient of q's shape) runs; once they returned the packed [T, H, D] and every
    forward+backward timing of them was a shape error. Checked against the float64 reference,
    gradients too, on two rows of packed documents with padding and GQA 2:1."""
    layout = AttentionLayout.from_lengths([[5, 7], [9]], 16)
    cu, index, max_len = layout.varlen_segments()
    assert index is not None  # the padding path is exercised
    run = varlen_method(_per_segment_causal, cu, index, max_len)
    q = torch.randn(2, 4, 16, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, 16, 8, requires_grad=True) for _ in range(2))
    out = check_op(run, lambda q, k, v: attention_reference(q, k, v, layout), [q, k, v])
    padding = layout.segment_ids < 0
    assert out.shape == q.shape and (out.transpose(1, 2)[padding] == 0).all()
    res = measure(run, q.detach(), k.detach(), v.detach(), "cpu", repeats=1, fwd_warmup=0, bwd_warmup=0)
    assert "error" not in res and res["fwd_bwd_ms"] > 0


def test_grid_methods_time_each_grid_on_the_same_result(seed):
    """--grids: the table's tiles on each work-order grid (plain, longest-first, persistent),
    each a different launch (in the interpreter: 2 heads x 7 query blocks, more items than the
    persistent grid's 6 programs) of the same per-item code: output, dK and dV bitwise the
    plain grid's; dQ (the fast backward's fp32 atomics, summed in the grid's order) and all
    of them float64-reference close."""
    from tests.test_attention_triton import check_against_reference

    torch.manual_seed(seed)
    layout = AttentionLayout.from_lengths([[60, 40]], 100)
    q, k, v = (torch.randn(1, 2, 100, 16, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, 2, 100, 16)
    results = {}
    for name, (fn, setup) in grid_methods(layout).items():
        out = fn(q, k, v)
        results[name] = (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))
    assert sorted(results) == ["fastvlm_grid_longest_first", "fastvlm_grid_persistent", "fastvlm_grid_plain"]
    base = results["fastvlm_grid_plain"]
    for name, got in results.items():
        check_against_reference(layout, q.detach(), k.detach(), v.detach(), dout, got)
        assert all(torch.equal(got[i], base[i]) for i in (0, 2, 3)), name
