"""Multimodal attention: fastvlm's Triton kernel vs SDPA, FlexAttention, flash-attn, xformers.

    python benchmarks/bench_attention.py                 # CUDA: the full table
    python benchmarks/bench_attention.py --smoke         # CPU, tiny, Triton interpreter
    python benchmarks/bench_attention.py --n 8192 --head-dims 128 --kinds mmca image_bidirectional
                                                         # the issue's target cases only (the full
                                                         # grid takes tens of minutes: flex compiles)
    python benchmarks/bench_attention.py --device cpu    # CPU: fastvlm's CPU path (sdpa_cpu) vs SDPA
                                                         # with the dense mask vs the reference, every
                                                         # kind, N = 1k 2k 8k, fp32 (~15 min on 2 cores)
    python benchmarks/bench_attention.py --window 1024   # every layout with a sliding window (Mistral's
                                                         # layers): results in bench_attention_window1024_*

Per (layout, kind, N, head_dim): median ms (CUDA events) of forward and
forward+backward, TFLOP/s counted on allowed (query, key) pairs only, ratio
of each baseline's time to fastvlm's, and peak memory of one fwd+bwd.
FlexAttention's block-mask construction and fastvlm's layout + block-map
construction are timed separately. A training-loop scenario runs 50
consecutive batches whose lengths and image layouts all differ, end to end
(metadata, masks, compilation, fwd+bwd), against FlexAttention compiled with
dynamic=False and dynamic=True. Writes a markdown table, JSON and a PNG plot
under benchmarks/results/; the longest N runs first, and each row is appended to a .jsonl
beside them as it is measured, so a run cut short keeps its 8k rows.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

if "--smoke" in sys.argv:  # the interpreter must be on before triton kernels are defined
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F

from fastvlm.kernels import attention as kernels
from fastvlm.ops import AttentionLayout, attention_cpu, multimodal_attention
from fastvlm.ops.backend import median_ms, why_unavailable
from fastvlm.synthetic import vlm_layout

from common import RESULTS, environment, print_header, save_results

KINDS = ("causal", "prefix_lm", "image_bidirectional", "mmca", "mmca_split")


# ---- layouts that look like VLM batches ------------------------------------------------------
# families of fastvlm.synthetic (LLaVA-1.5, 4-image multi-turn, packed, Qwen2-VL), plus plain causal
FAMILIES = {"llava15": "llava", "multi_image": "multi_image", "packed": "packed", "qwen2vl": "qwen2vl"}


def build_layout(name: str, kind: str, n: int, batch: int, seed: int, device) -> AttentionLayout:
    """`batch` rows of n tokens packed with samples of the named family (the last sample of
    a row is cut to fit, as packing data loaders do; "plain" is one causal sample per row)."""
    if name == "plain":
        return AttentionLayout.from_lengths([[n]] * batch, n, device=device)
    return vlm_layout(n, "mmca" if kind == "mmca_split" else kind, FAMILIES[name], batch=batch, seed=seed,
                      split_softmax=kind == "mmca_split", device=device)


# ---- methods ---------------------------------------------------------------------------------
def _flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        return create_block_mask, flex_attention
    except ImportError:
        return None


_GRID_FLEX = []


def _grid_flex():
    """One compiled flex_attention for the whole grid: it recompiles per shape, not per case."""
    if not _GRID_FLEX:
        _GRID_FLEX.append(torch.compile(_flex()[1], dynamic=False))
    return _GRID_FLEX[0]


def flex_block_mask(layout: AttentionLayout):
    create_block_mask, _ = _flex()
    b, n = layout.shape
    return create_block_mask(layout.flex_mask_mod(), b, None, n, n, device=layout.device)


def cpu_methods_for(layout: AttentionLayout):
    """The CPU grid's methods: what backend="auto" serves on CPU (sdpa_cpu), SDPA with the dense
    mask (one softmax: not for mmca split) and the reference (dense or blockwise by size)."""
    out = {"fastvlm": (lambda q, k, v: multimodal_attention(q, k, v, layout, backend="sdpa_cpu"), None),
           "reference": (lambda q, k, v: multimodal_attention(q, k, v, layout, backend="reference"), None)}
    if not layout.split_softmax:
        dense = layout.dense()[:, None]
        out["sdpa_dense"] = (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense,
                                                                            enable_gqa=True), None)
    return out


def grid_methods(layout: AttentionLayout) -> dict:
    """fastvlm_grid_<name>: the static table's tiles on each work-order grid (TileConfig.grid:
    plain, longest_first, persistent; where persistent_grid's rule declines one, e.g. uniform
    work, the plain grid runs and the row is the plain grid's time)."""
    from fastvlm.ops import attention as attention_op

    def run(grid):
        def fn(q, k, v):
            cfgs = tuple(replace(kernels.pick_config(q.device, q.shape[-1], bwd), grid=grid) for bwd in (False, True))
            return attention_op._triton_attention(q, k, v, layout, q.shape[-1] ** -0.5, cfgs, False)
        return fn
    return {f"fastvlm_grid_{grid}": (run(grid), None) for grid in kernels.GRIDS}


def methods_for(layout: AttentionLayout, plain: bool, device: str, smoke: bool, grids: bool = False):
    """name -> (callable(q, k, v) -> out, setup seconds or None), for those that express the mask."""
    if device == "cpu" and not smoke:
        return cpu_methods_for(layout)
    group_kw = {"enable_gqa": True}
    # the Triton kernel (tiles timed per shape on CUDA); "fastvlm_auto" is what backend="auto"
    # serves, which differs only where flash-attn is installed and the mask is packed causal
    out = {"fastvlm": (lambda q, k, v: multimodal_attention(q, k, v, layout, backend="triton"), None)}
    if grids:
        out.update(grid_methods(layout))
    if (device == "cuda" and layout.is_packed_causal
            and why_unavailable("multimodal_attention", "flash_attn", layout.device) is None):
        out["fastvlm_auto"] = (lambda q, k, v: multimodal_attention(q, k, v, layout), None)
    if smoke:
        out["reference"] = (lambda q, k, v: multimodal_attention(q, k, v, layout, backend="reference"), None)
    if not layout.split_softmax:  # one softmax over a boolean mask: not mmca's split definition
        dense = layout.dense()[:, None]
        out["sdpa_dense"] = (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense,
                                                                            **group_kw), None)
        if plain and layout.kind == "causal" and layout.window is None and device == "cuda":
            def sdpa_flash(q, k, v):
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, **group_kw)
            out["sdpa_flash"] = (sdpa_flash, None)
        if _flex() is not None and device == "cuda":
            start = _sync_time(device)
            block_mask = flex_block_mask(layout)
            setup = _sync_time(device) - start
            flex = _grid_flex()
            out["flex"] = (lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=True), setup)
        if device == "cuda" and layout.is_packed_causal:
            out.update(_varlen_baselines(*layout.varlen_segments(), device))
    return out


def varlen_method(varlen, cu, index, max_len):
    """fn(q, k, v) -> [B, H, N, D] through a varlen kernel ``varlen(q, k, v, cu_seqlens, max_len)``
    on [T, H, D]: every segment of every row as one packed sequence (a view when B == 1 and
    there is no padding), padding rows output 0 (the shape autograd needs for q's gradient)."""
    def run(q, k, v):
        b, h, n, d = q.shape

        def pack(t):
            t = t.transpose(1, 2).reshape(b * n, t.shape[1], d)
            return t if index is None else t[index]
        out = varlen(pack(q), pack(k), pack(v), cu, max_len)
        if index is not None:
            out = out.new_zeros(b * n, h, d).index_copy(0, index, out)
        return out.view(b, n, h, d).transpose(1, 2)
    return run


def _torch_flash_varlen(q, k, v, cu, max_len):
    """FlashAttention-2's varlen kernel as built into PyTorch (what SDPA runs for nested
    tensors; differentiable): a packed-documents baseline when flash_attn is not installed."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, True, False)[0]


def _varlen_baselines(cu, index, max_len, device: str = "cuda"):
    """name -> (fn(q, k, v) -> [B, H, N, D], None) for packed causal layouts: flash-attn 2's
    varlen kernel and xformers where installed, PyTorch's own FA2 varlen kernel on CUDA (GQA
    native: k/v heads dividing the query heads)."""
    found = {}
    if device == "cuda":
        found["sdpa_flash_varlen"] = (varlen_method(_torch_flash_varlen, cu, index, max_len), None)
    try:
        from flash_attn import flash_attn_varlen_func

        def fa(q, k, v, cu, max_len):
            return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)
        found["flash_attn_varlen"] = (varlen_method(fa, cu, index, max_len), None)
    except ImportError:
        pass
    try:
        import xformers.ops as xops
        from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask
        bias = BlockDiagonalCausalMask.from_seqlens(torch.diff(cu).tolist())

        def xf(q, k, v, cu, max_len):
            # xformers wants [1, T, H, D] with k/v heads expanded (views, no copy)
            hq, hk = q.shape[1], k.shape[1]
            kk, vv = (t[None].unflatten(2, (hk, 1)).expand(-1, -1, -1, hq // hk, -1).flatten(2, 3) for t in (k, v))
            return xops.memory_efficient_attention(q[None], kk, vv, attn_bias=bias)[0]
        found["xformers"] = (varlen_method(xf, cu, index, max_len), None)
    except ImportError:
        pass
    return found


# ---- timing ----------------------------------------------------------------------------------
def _sync_time(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def measure(fn, q, k, v, device: str, repeats: int, fwd_warmup: int = 2, bwd_warmup: int = 1) -> dict:
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    dout = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd():
        out = fn(*leaves)
        torch.autograd.grad(out, leaves, dout)

    res = {}
    try:
        res["fwd_ms"] = median_ms(fwd, device, repeats, warmup=fwd_warmup)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        res["fwd_bwd_ms"] = median_ms(fwd_bwd, device, repeats, warmup=bwd_warmup)
        if device == "cuda":
            res["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    except torch.OutOfMemoryError:
        res["error"] = "out of memory"
    except (RuntimeError, NotImplementedError) as exc:  # a backend refusing this shape/dtype
        res["error"] = str(exc).splitlines()[0][:120]
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    return res


# ---- the table -------------------------------------------------------------------------------
def run_grid(args, device: str, dtype, sink: Path | None = None) -> list[dict]:
    """The table, longest N first (the 8k rows are what a run cut short must keep); each
    row is appended to `sink` (JSON lines) the moment it is measured."""
    # the grid compiles flex once per (N, head_dim, kind): keep it compiled rather than
    # falling back to eager at dynamo's default recompile limit (the training-loop
    # scenario keeps the defaults a user has)
    limit = torch._dynamo.config.cache_size_limit
    torch._dynamo.config.cache_size_limit = max(limit, 256)
    try:
        return _run_grid(args, device, dtype, sink)
    finally:
        torch._dynamo.config.cache_size_limit = limit


def _run_grid(args, device: str, dtype, sink: Path | None) -> list[dict]:
    rows = []
    # CPU: one causal row and VLM-packed rows (what bench_vlm trains on); the slow reference and
    # dense SDPA at 8k make more families cost tens of minutes on a laptop-class CPU
    layouts = ["plain", "packed"] if device == "cpu" and not args.smoke else \
        ["plain", "llava15", "multi_image", "packed", "qwen2vl"]
    fwd_warmup = 1 if device == "cpu" and not args.smoke else 2
    for n in sorted(args.n, reverse=True):
        for d in args.head_dims:
            for name in layouts:
                for kind in (("causal",) if name == "plain" else KINDS):
                    if kind not in args.kinds:
                        continue
                    t0 = _sync_time(device)
                    layout = build_layout(name, kind, n, args.batch, 0, device).with_window(args.window)
                    if device == "cuda" or args.smoke:
                        for backward in (False, True):  # the forward's and the backward's maps
                            cfg = kernels.pick_config(torch.device(device), d, backward)
                            layout.block_map(cfg.block_m, cfg.block_n)
                    else:  # what the CPU path builds: its per-segment query blocks
                        layout.query_blocks(attention_cpu.CPU_QUERY_BLOCK)
                    meta_ms = (_sync_time(device) - t0) * 1e3
                    pairs = layout.allowed_pairs() * args.heads
                    hkv = max(1, args.heads // args.gqa)
                    q = torch.randn(args.batch, args.heads, n, d, device=device, dtype=dtype)
                    k = torch.randn(args.batch, hkv, n, d, device=device, dtype=dtype)
                    v = torch.randn_like(k)
                    for method, (fn, setup_s) in methods_for(layout, name == "plain", device, args.smoke,
                                                          args.grids).items():
                        res = measure(fn, q, k, v, device, args.repeats, fwd_warmup)
                        row = {"layout": name, "kind": kind, "N": n, "head_dim": d, "window": args.window,
                               "method": method, **res}
                        if method == "fastvlm":
                            row["setup_ms"] = meta_ms
                        elif setup_s is not None:
                            row["setup_ms"] = setup_s * 1e3
                        flops = 4.0 * pairs * d
                        if "fwd_ms" in res:
                            row["fwd_tflops"] = flops / res["fwd_ms"] / 1e9
                            row["fwd_bwd_tflops"] = 3.5 * flops / res["fwd_bwd_ms"] / 1e9
                        rows.append(row)
                        print(_row_line(row), flush=True)
                        if sink is not None:
                            with open(sink, "a") as f:
                                f.write(json.dumps(row) + "\n")
    _add_ratios(rows)
    return rows


def _row_line(row) -> str:
    case = f"{row['layout']:12s} {row['kind']:20s} N={row['N']:6d} D={row['head_dim']:4d} {row['method']:18s}"
    if "error" in row:
        return f"{case} {row['error']}"
    return f"{case} fwd {row['fwd_ms']:9.3f} ms  fwd+bwd {row['fwd_bwd_ms']:9.3f} ms"


def _add_ratios(rows):
    """ratio = baseline time / fastvlm time (> 1: fastvlm faster), per case."""
    ours = {(r["layout"], r["kind"], r["N"], r["head_dim"]): r for r in rows if r["method"] == "fastvlm"}
    for r in rows:
        mine = ours.get((r["layout"], r["kind"], r["N"], r["head_dim"]))
        if mine and "fwd_ms" in r and "fwd_ms" in mine:
            r["fwd_ratio"] = r["fwd_ms"] / mine["fwd_ms"]
            r["fwd_bwd_ratio"] = r["fwd_bwd_ms"] / mine["fwd_bwd_ms"]


# ---- training-loop scenario ------------------------------------------------------------------
def training_loop(args, device: str, dtype) -> list[dict]:
    """Consecutive batches whose lengths and layouts all differ; wall time of the whole loop."""
    rng = random.Random(1)
    steps = 3 if args.smoke else 50
    n_max = max(args.n)
    batches = []
    for _ in range(steps):
        n = rng.randint(n_max // 2, n_max)
        batches.append((n, rng.choice(["llava15", "multi_image", "packed", "qwen2vl"]), rng.randint(0, 2**31)))
    d = args.head_dims[-1]
    hkv = max(1, args.heads // args.gqa)
    kind = "image_bidirectional"

    def run(step_fn):
        t0 = _sync_time(device)
        for n, family, seed in batches:
            layout = build_layout(family, kind, n, args.batch, seed, device).with_window(args.window)
            q, k, v = (torch.randn(args.batch, h, n, d, device=device, dtype=dtype, requires_grad=True)
                       for h in (args.heads, hkv, hkv))
            out = step_fn(q, k, v, layout)
            out.backward(torch.ones_like(out))
        return _sync_time(device) - t0

    results = [{"method": "fastvlm", "total_s": run(
        lambda q, k, v, layout: multimodal_attention(q, k, v, layout, backend="triton"))}]
    try:
        results.append({"method": "sdpa_dense", "total_s": run(lambda q, k, v, layout: F.scaled_dot_product_attention(
            q, k, v, attn_mask=layout.dense()[:, None], enable_gqa=True))})
    except torch.OutOfMemoryError:
        results.append({"method": "sdpa_dense", "error": "out of memory"})
    if _flex() is not None and device == "cuda":
        create_block_mask, flex_attention = _flex()
        for dynamic in (False, True):
            torch._dynamo.reset()
            flex = torch.compile(flex_attention, dynamic=dynamic)

            def step(q, k, v, layout, flex=flex):
                return flex(q, k, v, block_mask=flex_block_mask(layout), enable_gqa=True)
            try:
                results.append({"method": f"flex_dynamic={dynamic}", "total_s": run(step)})
            except Exception as exc:  # noqa: BLE001  recompile limits etc. are a result too
                results.append({"method": f"flex_dynamic={dynamic}", "error": str(exc).splitlines()[0][:160]})
    for r in results:
        if "total_s" in r:
            r["ratio"] = r["total_s"] / results[0]["total_s"]
    return results


# ---- output ----------------------------------------------------------------------------------
def markdown(env, args, rows, loop) -> str:
    window = "" if args.window is None else f", sliding window {args.window} on every layout"
    lines = [f"{env['date']}, commit {env['commit']}, torch {env['torch']}, triton {env['triton']}, "
             f"dtype {args.dtype}, batch {args.batch}, heads {args.heads} (GQA {args.gqa}){window}", ""]
    if args.smoke:
        lines += ["**Smoke run on CPU: the Triton kernel runs in the interpreter. This is NOT a speed test;"
                  " the numbers only show that the script works.**", ""]
    elif args.device == "cpu":
        lines += ["CPU table: fastvlm = backend='sdpa_cpu' (what 'auto' serves on CPU: torch's CPU flash kernel per "
                  "segment / query block), against SDPA with the dense [B, 1, N, N] mask and fastvlm's reference; "
                  "medians of the package's timer (fastvlm.ops.backend.median_ms, wall clock).", ""]
    lines += ["ratio = baseline time / fastvlm time (> 1 means fastvlm is faster); TFLOP/s on allowed pairs only;"
              " setup = layout + block map (fastvlm) or create_block_mask (flex), not in the timings.", "",
              "| layout | kind | N | D | method | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | ratio fwd | ratio fwd+bwd "
              "| peak MiB | setup ms |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x, p=3: "" if x is None else f"{x:.{p}f}"  # noqa: E731
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['layout']} | {r['kind']} | {r['N']} | {r['head_dim']} | {r['method']} | "
                         f"{r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['layout']} | {r['kind']} | {r['N']} | {r['head_dim']} | {r['method']} | "
                     f"{fmt(r['fwd_ms'])} | {fmt(r['fwd_bwd_ms'])} | {fmt(r.get('fwd_bwd_tflops'), 1)} | "
                     f"{fmt(r.get('fwd_ratio'), 2)} | {fmt(r.get('fwd_bwd_ratio'), 2)} | "
                     f"{fmt(r.get('peak_mib'), 0)} | {fmt(r.get('setup_ms'), 2)} |")
    if not loop:
        return "\n".join(lines) + "\n"
    lines += ["", f"## Training loop: {3 if args.smoke else 50} batches of differing lengths/layouts "
              "(image_bidirectional), total wall time incl. metadata, masks, compilation", "",
              "| method | total s | ratio to fastvlm |", "|---|---|---|"]
    for r in loop:
        lines.append(f"| {r['method']} | {fmt(r.get('total_s'))} | {fmt(r.get('ratio'), 2) or r.get('error', '')} |")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["layout"], r["kind"], r["N"], r["head_dim"]) for r in rows})
    methods = sorted({r["method"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(8, len(cases) * 0.5), 5))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        ys = [next((r.get("fwd_bwd_ms") for r in rows if r["method"] == m and
                    (r["layout"], r["kind"], r["N"], r["head_dim"]) == c), None) for c in cases]
        xs = [j + i * width for j, y in enumerate(ys) if y]
        ax.bar(xs, [y for y in ys if y], width, label=m)
    ax.set_xticks([j + 0.4 for j in range(len(cases))])
    ax.set_xticklabels([f"{c[0]}/{c[1]}/N{c[2]}/D{c[3]}" for c in cases], rotation=90, fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("fwd+bwd ms (log)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, Triton interpreter (not a speed test)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="cuda (default): the Triton kernel's table; cpu: the CPU path (sdpa_cpu) table")
    p.add_argument("--n", type=int, nargs="+", default=None, help="sequence lengths (default 2k 4k 8k 16k)")
    p.add_argument("--head-dims", type=int, nargs="+", default=None, help="default 64 128")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--heads", type=int, default=None, help="query heads")
    p.add_argument("--gqa", type=int, default=None, help="query heads per kv head")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--window", type=int, default=None,
                   help="a sliding window on every layout (keys >= W positions before the query dropped)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the .json, .md and .png")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--grids", action="store_true",
                   help="also time the table's tiles on each work-order grid (plain, longest_first, persistent)")
    args = p.parse_args(argv)
    tiny = args.smoke
    if tiny and args.device == "cuda":
        p.error("--smoke runs on CPU (the Triton interpreter); drop --device cuda")
    if args.window is not None and args.window < 1:
        p.error(f"--window: expected a positive number of tokens, got {args.window}")
    args.device = "cpu" if tiny else (args.device or "cuda")
    defaults = {"n": [48] if tiny else [2048, 4096, 8192, 16384], "head_dims": [32] if tiny else [64, 128],
                "batch": 1 if tiny else 2, "heads": 2 if tiny else 16, "gqa": 2 if tiny else 1,
                "dtype": "float32" if tiny else "bfloat16", "repeats": 1 if tiny else 10}
    if args.device == "cpu" and not tiny:  # fp32: what a CPU user trains in
        defaults.update(n=[1024, 2048, 8192], head_dims=[64], batch=1, heads=4, gqa=1, dtype="float32", repeats=3)
    for key, val in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_attention: no CUDA device; run with --smoke for the CPU interpreter check")
    if args.smoke:
        args.kinds = [k for k in args.kinds if k in ("causal", "mmca_split")]
    dtype = getattr(torch, args.dtype)
    env = environment(device)
    print_header("bench_attention", env)
    if args.smoke:
        print("SMOKE MODE: CPU + Triton interpreter at tiny size. This is NOT a speed test.")
    cpu_table = device == "cpu" and not args.smoke
    tag = "smoke" if args.smoke else "CPU" if cpu_table else env["device"].replace(" ", "_")
    if args.window is not None:  # its own results file: the window-free table stays the headline
        tag = f"window{args.window}_{tag}"
    args.out.mkdir(parents=True, exist_ok=True)
    sink = args.out / f"bench_attention_{tag}_{env['date'][:10]}.jsonl"  # the rows so far, if cut short
    sink.unlink(missing_ok=True)
    rows = run_grid(args, device, dtype, sink)
    loop = [] if cpu_table else training_loop(args, device, dtype)  # its 50 batches are a GPU scenario
    text = markdown(env, args, rows, loop)
    print(text)
    payload = {"benchmark": "bench_attention", "env": env, "args": {k: str(v) for k, v in vars(args).items()},
               "rows": rows, "training_loop": loop}
    out = save_results("bench_attention", env, payload, text,
                       args.out / f"bench_attention_{tag}_{env['date'][:10]}.json")
    if not args.no_plot:
        plot(rows, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
