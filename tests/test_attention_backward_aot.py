"""The attention backward's compiled code, without a GPU (`-m aot`: Triton's CUDA backend
and ptxas, no device), at the tile table's entries for sm80 and sm90, head_dim 64 / 128,
plain causal and mmca split (the kernels tests/backward_aot_probe.py compiles, as a real
launch at GQA 4:1, N=8192 specialises them):

- the fast backward is one dK/dV pass of 5 matrix products per tile (S^T, dP^T, dV, dK,
  and dQ^T = K^T dS^T added to fp32 dQ with atomics); the deterministic one runs 3 in its
  dQ kernel and 4 in its dK/dV kernel, with no atomic instruction, so every gradient
  element is written by one program in a fixed order: bitwise-reproducible by construction;
- on sm90 every backward product is a wgmma (no mma.sync fallback);
- dK/dV computes S^T = K Q^T directly: P^T and dS^T feed the dV and dK products from
  registers, so its loop writes no register tile to shared memory; the fast pass writes
  one, dS^T as the B operand of dQ^T (wgmma and mma read B from shared memory anyway);
- spills within the bounds below.

Compile time: 24 kernels; a cold Triton cache takes minutes on 2 busy cores, a warm one
(tests/test_attention_aot.py compiles the same launches) seconds.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.aot

TARGETS = [f"{cap}:{d}:{variant}" for cap in (80, 90) for d in (64, 128) for variant in ("plain", "mmca_split")]
PRODUCTS = {"_attn_bwd_dq": 3, "_attn_bwd_dkdv": 4, "_attn_bwd_dkdv+dq": 5}


def spill_bound(row: dict) -> int:
    """ptxas spill bytes (stores and loads, each) a backward kernel may have at head_dim <= 128.
    dK/dV holds k, v and the dk, dv accumulators ([block_n, D] each) for the whole loop:
    at 255 registers a few hundred bytes spill, most in the split variant (two branches'
    lse and delta per query, P summed from two exps); the fast pass's dQ^T tile adds to
    that on sm90. The dQ kernel: none on sm90, where its 128-row tile splits over two warp
    groups; mma.sync on sm80 spills ~100 B in the split variant."""
    if row["kernel"] == "_attn_bwd_dq":
        return 0 if row["cap"] == 90 else 128
    if row["cap"] == 90:
        return 256
    return 1024


@pytest.fixture(scope="module")
def rows():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "backward_aot_probe.py"), *TARGETS],
                          capture_output=True, text=True, timeout=1800, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in found:
        print(f"sm{r['cap']} D{r['head_dim']} {r['variant']:10s} {r['kernel']:17s} tile {r['tile']} "
              f"{r['regs']} regs, spills {r['spill_st']}/{r['spill_ld']} B, shared {r['shared']} B, "
              f"work/iter {r['loop_work']}, atomics {r['atomics']}, loop smem writes {r['loop_shared_writes']}")
    assert len(found) == len(TARGETS) * len(PRODUCTS)
    return found


def test_fast_backward_is_five_products_per_tile(rows):
    """Each innermost loop (partial and full tiles) issues the kernel's products once: 5 in
    the fast pass, 3 + 4 in the deterministic kernels; sm90 issues all of them as wgmma."""
    for r in rows:
        bm, bn, bd = r["tile"]
        assert r["loop_work"] == [PRODUCTS[r["kernel"]] * bm * bn * bd] * 2, r
        assert r["wgmma"] == (r["cap"] == 90) and r["mma"] == (r["cap"] != 90), r


def test_deterministic_backward_has_no_atomics(rows):
    for r in rows:
        if r["kernel"] == "_attn_bwd_dkdv+dq":
            assert r["atomics"] and all(".f32" in a and ".add" in a for a in r["atomics"]), r
        else:
            assert r["atomics"] == [], r


def test_dkdv_keeps_p_and_ds_in_registers(rows):
    """The deterministic dK/dV loop writes no register tile to shared memory; sm90's fast pass
    writes one (dS^T, the dQ^T product's B operand). sm80's fast pass at head_dim 128 (a
    64 x 128 tile over 8 warps) also stages P^T there: 2 writes plain, 3 split, where the
    deterministic kernel at the same tile has none."""
    for r in rows:
        writes = r["loop_shared_writes"]
        if r["kernel"] == "_attn_bwd_dkdv":
            assert writes == [0, 0], r
        elif r["kernel"] == "_attn_bwd_dkdv+dq":
            assert writes == [1, 1] if r["cap"] == 90 else 1 <= min(writes) <= max(writes) <= 3, r


def test_spills_within_stated_bounds(rows):
    over = [f"sm{r['cap']} D{r['head_dim']} {r['variant']} {r['kernel']}: {r['spill_st']}/{r['spill_ld']} B "
            f"> {spill_bound(r)}" for r in rows if max(r["spill_st"], r["spill_ld"]) > spill_bound(r)]
    assert not over, "\n".join(over)
