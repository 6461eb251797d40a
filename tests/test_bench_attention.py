"""The attention benchmark's CPU smoke mode runs end to end and says it is no speed test."""
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
    assert [r["method"] for r in data["training_loop"]] == ["fastvlm", "sdpa_dense"]
    assert list(tmp_path.glob(f"bench_attention_{tag}_*.png"))


def test_tile_table_compiles_within_shared_memory_without_gpu():
    """Every entry of the attention tile table lowers through Triton's real CUDA backend and
    ptxas (not only the interpreter) for its target: the sm80 and sm90 tables and the
    fallback table at sm89, each head_dim bound (64, 128, 256; 80 and 96 share 128's
    BLOCK_D, hence its kernels), fp16 and bf16, plain and mmca split, forward, dQ, dK/dV
    and delta, with the launchers' warps / stages, each within the target's opt-in shared
    memory. ptxas spills are printed (shown with -rA or on failure), not asserted: they
    cost speed, not correctness.

    fp16 is compiled for the D<=128 entry of each target only (every kernel and variant):
    fp16 and bf16 tiles have the same bytes, and over the full matrix
    (`attention_resources.py --matrix`) their shared memory is identical entry for entry
    and registers differ by at most 2. That keeps a cold Triton cache at 84 compiles,
    ~1.5 min on 2 cores (~/.triton/cache is keyed by kernel source: a warm run, or one
    after a change, recompiles only what changed; ~10 s warm)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention_resources.py"),
                           "--matrix", "--jobs", "2", "--json", "--fp16-bounds", "128"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    *table, last = proc.stdout.strip().splitlines() or [""]
    print("\n".join(table))
    assert last.startswith("["), proc.stderr[-3000:]
    rows = json.loads(last)
    seen = {(r["cap"], r["head_dim"], r["dtype"], r["variant"], r["kernel"]) for r in rows}
    kernels = ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv")
    want = {(cap, d, dt, var, k) for cap in (80, 89, 90) for d in (64, 128, 256) for dt in ("bf16", "fp16")
            for var, ks in (("plain", kernels), ("mmca split", kernels), ("any", ("_bwd_delta",))) for k in ks
            if dt == "bf16" or d == 128}
    assert seen == want
    limits = {80: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
    failed = [r for r in rows if "error" in r or not 0 < r["shared"] <= limits[r["cap"]]]
    assert not failed, "\n".join(map(str, failed))
    assert proc.returncode == 0, proc.stderr[-3000:]
    big_spills = [f"sm{r['cap']} D<={r['head_dim']} {r['dtype']} {r['variant']} {r['kernel']}: "
                  f"{r['spill_st']}/{r['spill_ld']} B" for r in rows if r["spill_st"] + r["spill_ld"] >= 256]
    if big_spills:
        warnings.warn("ptxas spills (store/load bytes) >= 256 B: " + "; ".join(big_spills))
