"""The GPU check's headline: attention forward+backward at N=8192, head_dim 128, GQA 4:1
(32 query heads, 8 kv heads), bf16, batch 1, written row by row.

    python benchmarks/bench_attention_headline.py --out DIR [--budget-s S]   # CUDA
    python benchmarks/bench_attention_headline.py --smoke --out DIR          # CPU rehearsal (interpreter, tiny)

Cases: plain causal, packed causal documents, packed image_bidirectional, packed mmca
split (issue 28's targets). Rounds over all cases, what the targets need first and the
Triton compiles (1-3 s each on the GPU machine) kept to what each round needs, so a run
cut short keeps the comparisons that matter most:
  0  fastvlm at the static table's tiles (fast backward: one forward and one dK/dV+dQ
     kernel per mask kind) and the baselines that compile nothing: SDPA flash and cuDNN
     SDPA (plain causal), FA2 varlen (PyTorch's own kernel; flash-attn's where carried)
  1  FlexAttention for image_bidirectional and mmca (their targets; a compile per mask)
  2  fastvlm `auto`: each candidate tile pair timed, the chosen one recorded (forward
     only and forward+backward) and timed; then the table's tiles on the plain grid (on
     sm90 the table runs the longest-first work order; auto compiled these kernels as a candidate)
  3  FlexAttention for the causal cases, fastvlm's deterministic backward
Compile cost, estimated for a cold H100 machine (Triton 1-3 s a kernel, a FlexAttention
forward+backward compile tens of seconds): round 0 about 10 Triton kernels (forward, delta,
dK/dV+dQ per mask kind: causal, image_bidirectional, mmca split), 15-35 s; round 1 two Flex
compiles, 40-80 s; round 2 the two alternative tile pairs' kernels per kind, about 18, 25-55 s;
round 3 two Flex compiles and the deterministic kernels (dQ, dK/dV per kind), 40-80 s. The
gpu check gives the headline 190 s: round 3 is what a slow machine loses, and the rows say.
A method is skipped (a row saying so) when the budget left is under what it needs to
start; a method that raises is a row with its error. Each row is appended to
DIR/attention_headline.jsonl and DIR/attention_headline.md (with the targets) is rewritten
the moment it is measured: a kill loses only the measurement under way.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from attention_targets import targets_markdown

# first: bench_attention turns the interpreter on for --smoke before any kernel is defined
from bench_attention import _flex, _varlen_baselines, build_layout, flex_block_mask, measure

from fastvlm.kernels import attention as kernels
from fastvlm.ops import attention as attention_op
from fastvlm.ops import backend as dispatch
from fastvlm.ops import multimodal_attention

from common import environment

CASES = (("plain", "causal"), ("packed", "causal"), ("packed", "image_bidirectional"), ("packed", "mmca_split"))
TARGET_KINDS = ("image_bidirectional", "mmca_split")  # the kinds whose target is FlexAttention
# seconds a method needs left to be worth starting: a cold FlexAttention compile (forward
# and backward through Inductor) takes tens of seconds, auto compiles every candidate's kernels
START_S = {"flex": 45.0, "fastvlm_auto": 25.0}
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


def table_configs(device: str, head_dim: int):
    return (kernels.pick_config(torch.device(device), head_dim),
            kernels.pick_config(torch.device(device), head_dim, backward=True))


def methods(layout, name: str, kind: str, device: str, scale: float, head_dim: int, flex):
    """(round, method, make) for one case; make() builds fn(q, k, v) when its turn comes (a
    FlexAttention block mask is built then, its time recorded as setup)."""
    table = table_configs(device, head_dim)
    out = [(0, "fastvlm_table",
            lambda: lambda q, k, v: attention_op._triton_attention(q, k, v, layout, scale, table, False))]
    if name == "plain":
        out += [(0, method, lambda fn=fn: fn) for method, fn in sdpa_methods(device).items()]
    if layout.is_packed_causal:
        varlen = _varlen_baselines(*layout.varlen_segments(), device)
        if "sdpa_flash_varlen" in varlen:  # in case it refuses GQA: k/v expanded beforehand
            varlen["sdpa_flash_varlen" + EXPANDED] = varlen["sdpa_flash_varlen"]
        out += [(0, method, lambda fn=fn: fn) for method, (fn, _) in varlen.items()]
    if device == "cpu":
        out.append((0, "reference", lambda: lambda q, k, v: multimodal_attention(q, k, v, layout,
                                                                                backend="reference")))
    if flex is not None:
        def make_flex():
            block_mask = flex_block_mask(layout)
            return lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=True)
        out.append((1 if kind in TARGET_KINDS else 3, "flex", make_flex))
    plain_grid = tuple(replace(c, grid="plain") for c in table)  # the table's tiles, one program per item
    out += [(2, "fastvlm_auto",
             lambda: lambda q, k, v: multimodal_attention(q, k, v, layout, scale=scale, backend="triton")),
            # after auto, which compiles these kernels as one of its candidates
            (2, "fastvlm_table_plain_grid",
             lambda: lambda q, k, v: attention_op._triton_attention(q, k, v, layout, scale, plain_grid, False)),
            (3, "fastvlm_table_deterministic",
             lambda: lambda q, k, v: attention_op._triton_attention(q, k, v, layout, scale, table, True))]
    return out


def config_names(cfgs) -> str:
    """The tiles and the work-order grid (TileConfig.grid; where persistent_grid's rule declines
    it, e.g. uniform work, the plain grid ran)."""
    return " / ".join(f"{c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages} {c.grid}" for c in cfgs)


def auto_choice(q, k, layout, training: bool) -> str:
    chosen = dispatch.FASTEST.get(attention_op.choice_key(q, k, layout, False, training, False))
    return "table (not timed off CUDA)" if chosen is None else config_names(chosen)


def write_markdown(path: Path, env: dict, rows: list[dict], smoke: bool) -> None:
    lines = ["# Attention headline: forward+backward, N=8192, head_dim 128, GQA 4:1 (32/8 heads), bf16, batch 1",
             "", f"{env['date']}  commit {env['commit']}  device {env['device']}  torch {env['torch']}  "
             f"triton {env['triton']}  cuda {env['cuda']}", ""]
    if smoke:
        lines += ["**CPU smoke run (Triton interpreter, tiny sizes): NOT a speed test.**", ""]
    lines += ["## Targets", "", targets_markdown(rows),
              "## Rows (ratio = method's fwd+bwd time / fastvlm_table's: > 1, fastvlm faster)", "",
              "| layout | kind | method | fwd ms | fwd+bwd ms | ratio | config | wall s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        timing = (f"{r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r.get('fwd_bwd_ratio', 1.0):.2f}"
                  if "fwd_bwd_ms" in r else f"{r.get('error') or r.get('skipped', '')} | | ")
        lines.append(f"| {r['layout']} | {r['kind']} | {r['method']} | {timing} | {r.get('config', '')} | "
                     f"{r.get('wall_s', '')} |")
    path.write_text("\n".join(lines) + "\n")


def run_method(make, q, k, v, device: str, repeats: int, smoke: bool, heads: int, kv_heads: int, method: str):
    """Timings of one method, or its error: whatever one baseline raises (a compile failure,
    a refused shape) must not cost the rows after it."""
    try:
        t0 = time.monotonic()
        fn = make()
        setup_s = time.monotonic() - t0
        kv = (k, v) if not method.endswith(EXPANDED) else \
            tuple(t.repeat_interleave(heads // kv_heads, 1) for t in (k, v))
        # in the interpreter nothing compiles: no warm-up
        res = measure(fn, q, *kv, device, repeats, *((0, 0) if smoke else (2, 1)))
        return {**res, "setup_s": round(setup_s, 3)}
    except Exception as exc:  # noqa: BLE001 - a failing method is a result (its row says why)
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny sizes: not a speed test")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall seconds for the whole headline: a method is skipped when less is left than it "
                        "needs to start (a FlexAttention compile 45 s, auto's candidates 25 s)")
    args = p.parse_args(argv)
    t_start = time.monotonic()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_attention_headline: no CUDA device; --smoke rehearses on CPU")
    n, d, heads, kv_heads = (48, 32, 2, 1) if args.smoke else (8192, 128, 32, 8)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    repeats = args.repeats or (1 if args.smoke else 10)
    args.out.mkdir(parents=True, exist_ok=True)
    sink, table_md = args.out / "attention_headline.jsonl", args.out / "attention_headline.md"
    env = environment(device)
    scale = d ** -0.5
    flex = torch.compile(_flex()[1], dynamic=False) if device == "cuda" and _flex() is not None else None
    cases = []
    for name, kind in CASES:
        layout = build_layout(name, kind, n, 1, 0, device)
        q = torch.randn(1, heads, n, d, device=device, dtype=dtype)
        k, v = (torch.randn(1, kv_heads, n, d, device=device, dtype=dtype) for _ in range(2))
        cases.append((name, kind, layout, q, k, v, methods(layout, name, kind, device, scale, d, flex)))
    plan = sorted(((m[0], i, m[1], m[2]) for i, case in enumerate(cases) for m in case[-1]),
                  key=lambda m: m[:2])  # by round, then case: stable within a case
    rows, ours = [], {}
    write_markdown(table_md, env, rows, args.smoke)
    with open(sink, "a") as f:
        for round_, i, method, make in plan:
            name, kind, layout, q, k, v, _ = cases[i]
            row = {"layout": name, "kind": kind, "N": n, "head_dim": d, "heads": heads, "kv_heads": kv_heads,
                   "dtype": str(dtype).removeprefix("torch."), "method": method, "round": round_}
            left = None if args.budget_s is None else args.budget_s - (time.monotonic() - t_start)
            need = START_S.get(method, 3.0)
            t0 = time.monotonic()
            if left is not None and left < need:
                row["skipped"] = f"budget: {left:.0f} s left, needs ~{need:.0f} s to start"
            else:
                row.update(run_method(make, q, k, v, device, repeats, args.smoke, heads, kv_heads, method))
            if method in ("fastvlm_table", "fastvlm_table_deterministic"):
                row["config"] = config_names(table_configs(device, d))
            if method == "fastvlm_table_plain_grid":
                row["config"] = config_names(tuple(replace(c, grid="plain") for c in table_configs(device, d)))
            if method == "fastvlm_auto" and "fwd_bwd_ms" in row:
                row["config"] = auto_choice(q, k, layout, training=True)
                row["config_fwd_only"] = auto_choice(q, k, layout, training=False)
                if device == "cuda":  # off CUDA auto times nothing: the table serves
                    row["auto_is_table"] = row["config"] == config_names(table_configs(device, d))
            if method == "fastvlm_table" and "fwd_bwd_ms" in row:
                ours[name, kind] = row
            mine = ours.get((name, kind), {})
            if "fwd_bwd_ms" in row and "fwd_bwd_ms" in mine:
                row["fwd_bwd_ratio"] = row["fwd_bwd_ms"] / mine["fwd_bwd_ms"]  # > 1: fastvlm faster
            row["wall_s"] = round(time.monotonic() - t0, 1)  # compiles included
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
            write_markdown(table_md, env, rows, args.smoke)
            timing = (row.get("error") or row.get("skipped")
                      or f"fwd {row['fwd_ms']:.3f} ms  fwd+bwd {row['fwd_bwd_ms']:.3f} ms")
            print(f"[{time.monotonic() - t_start:6.1f}s] {name:6s} {kind:20s} {method:30s} {timing}"
                  f"{'  ' + row['config'] if 'config' in row else ''}", flush=True)
    print(targets_markdown(rows))
    if args.smoke:
        print("SMOKE MODE: CPU + Triton interpreter at tiny size. This is NOT a speed test.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
