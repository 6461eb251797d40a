"""The GPU check's headline: attention forward+backward at N=8192, head_dim 128, GQA 4:1
(32 query heads, 8 kv heads), bf16, batch 1, written row by row.

    python benchmarks/bench_attention_headline.py --out DIR      # CUDA
    python benchmarks/bench_attention_headline.py --smoke --out DIR  # CPU rehearsal (interpreter, tiny)

Cases: plain causal, packed causal documents, packed image_bidirectional, packed mmca
split (the issue's targets). Three rounds over all cases, cheapest first, so a run cut
short by its time cap keeps the comparisons that matter most: (0) fastvlm at the static
table's tiles (fast backward) and the baselines that compile nothing (SDPA flash and cuDNN
SDPA for plain causal, flash-attn 2 varlen for causal masks where installed); (1)
FlexAttention (one compile per mask); (2) fastvlm with `auto`'s measured tiles (the
config it chose is recorded) and the deterministic backward. Each row is appended to
DIR/attention_headline.jsonl and printed the moment it is measured.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# first: bench_attention turns the interpreter on for --smoke before any kernel is defined
from bench_attention import _flex, _varlen_baselines, build_layout, flex_block_mask, measure

from fastvlm.kernels import attention as kernels
from fastvlm.ops import attention as attention_op
from fastvlm.ops import backend as dispatch
from fastvlm.ops import multimodal_attention

CASES = (("plain", "causal"), ("packed", "causal"), ("packed", "image_bidirectional"), ("packed", "mmca_split"))


EXPANDED = "_kv_expanded"  # a method timed on k/v repeated to the query heads beforehand


def sdpa_methods(device: str) -> dict:
    """SDPA restricted to one backend each (plain causal only: it takes no document mask),
    with enable_gqa and, in case a backend refuses GQA, on k/v expanded to the query heads
    (the expansion is made once, outside the timing)."""
    backends = torch.nn.attention.SDPBackend
    found = {}
    for name, which in (("sdpa_flash", backends.FLASH_ATTENTION), ("sdpa_cudnn", backends.CUDNN_ATTENTION)):
        for suffix, gqa in (("", True), (EXPANDED, False)):
            def run(q, k, v, which=which, gqa=gqa):
                with torch.nn.attention.sdpa_kernel(which):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            found[name + suffix] = run
    return found if device == "cuda" else {}


def methods(layout, plain: bool, device: str, scale: float, head_dim: int) -> list[tuple[int, str, object]]:
    """(round, name, fn(q, k, v)): round 0 (fastvlm's table tiles and the baselines that
    compile nothing) runs for every case first, then round 1 (FlexAttention, a compile per
    mask), then round 2 (auto's timing of candidate tiles, the deterministic backward)."""
    table = (kernels.pick_config(torch.device(device), head_dim),
             kernels.pick_config(torch.device(device), head_dim, backward=True))
    out = [(0, "fastvlm_table", lambda q, k, v: attention_op._triton_attention(q, k, v, layout, scale, table, False))]
    if plain:
        out += [(0, name, fn) for name, fn in sdpa_methods(device).items()]
    if device == "cuda" and layout.is_packed_causal:
        out += [(0, name, fn) for name, (fn, _) in _varlen_baselines(*layout.varlen_segments()).items()]
    if device == "cuda" and _flex() is not None:
        flex = torch.compile(_flex()[1], dynamic=False)
        block_mask = flex_block_mask(layout)
        out.append((1, "flex", lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=True)))
    if device == "cpu":
        out.append((0, "reference", lambda q, k, v: multimodal_attention(q, k, v, layout, backend="reference")))
    out += [(2, "fastvlm_auto", lambda q, k, v: multimodal_attention(q, k, v, layout, scale=scale,
                                                                      backend="triton")),
            (2, "fastvlm_table_deterministic",
             lambda q, k, v: attention_op._triton_attention(q, k, v, layout, scale, table, True))]
    return out


def config_names(cfgs) -> str:
    return " / ".join(f"{c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}" for c in cfgs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny sizes: not a speed test")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_attention_headline: no CUDA device; --smoke rehearses on CPU")
    n, d, heads, kv_heads = (48, 32, 2, 1) if args.smoke else (8192, 128, 32, 8)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    repeats = args.repeats or (1 if args.smoke else 10)
    args.out.mkdir(parents=True, exist_ok=True)
    sink = args.out / "attention_headline.jsonl"
    scale = d ** -0.5
    t_start = time.monotonic()
    cases = []
    for name, kind in CASES:
        layout = build_layout(name, kind, n, 1, 0, device)
        q = torch.randn(1, heads, n, d, device=device, dtype=dtype)
        k, v = (torch.randn(1, kv_heads, n, d, device=device, dtype=dtype) for _ in range(2))
        cases.append((name, kind, layout, q, k, v, methods(layout, name == "plain", device, scale, d)))
    ours = {}
    with open(sink, "a") as f:
        for round_, (name, kind, layout, q, k, v, case_methods) in itertools.product(range(3), cases):
            for method, fn in (m[1:] for m in case_methods if m[0] == round_):
                t0 = time.monotonic()
                kv = (k, v) if not method.endswith(EXPANDED) else \
                    tuple(t.repeat_interleave(heads // kv_heads, 1) for t in (k, v))
                row = {"layout": name, "kind": kind, "N": n, "head_dim": d, "heads": heads, "kv_heads": kv_heads,
                       "dtype": str(dtype).removeprefix("torch."), "method": method,
                       **measure(fn, q, *kv, device, repeats)}
                del kv
                if method == "fastvlm_table":
                    ours[name, kind] = row
                    row["config"] = config_names((kernels.pick_config(torch.device(device), d),
                                                  kernels.pick_config(torch.device(device), d, backward=True)))
                if method == "fastvlm_auto":
                    key = attention_op.choice_key(q, k, layout, False, True, False)
                    chosen = dispatch.FASTEST.get(key)
                    row["config"] = "table (not timed off CUDA)" if chosen is None else config_names(chosen)
                mine = ours.get((name, kind), {})
                if "fwd_bwd_ms" in row and "fwd_bwd_ms" in mine:
                    row["fwd_bwd_ratio"] = row["fwd_bwd_ms"] / mine["fwd_bwd_ms"]  # > 1: fastvlm faster
                row["wall_s"] = round(time.monotonic() - t0, 1)
                f.write(json.dumps(row) + "\n")
                f.flush()
                timing = row.get("error") or f"fwd {row['fwd_ms']:.3f} ms  fwd+bwd {row['fwd_bwd_ms']:.3f} ms"
                print(f"[{time.monotonic() - t_start:6.1f}s] {name:6s} {kind:20s} {method:28s} {timing}"
                      f"{'  ' + row['config'] if 'config' in row else ''}", flush=True)
    if args.smoke:
        print("SMOKE MODE: CPU + Triton interpreter at tiny size. This is NOT a speed test.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
