"""Compile the attention kernels as a real launch does, for a GPU target, without a GPU.

    python benchmarks/attention_resources.py --cap 90 --head-dim 128 [--fwd 128,64,8,3] [--bwd 64,128,8,2]
    python benchmarks/attention_resources.py --matrix [--candidates] [--jobs 2] [--json]

The launches are the launchers' own (fastvlm.kernels.attention.forward_launches /
backward_launches) on meta tensors of a realistic call (B=1, 32 q heads, 8 kv heads:
GQA 4:1, N=8192), and each kernel is specialised by Triton's own binder:
pointers, and the integer arguments divisible by 16 (strides, D, N, TQ, TK, H...),
get the divisibility a launch gives them, an integer equal to 1 becomes a constant, the
constexprs are the launch's. (Marking only pointers and strides, as this tool once did,
compiles another kernel: the `offs_d < D` mask then blocks vectorised, pipelined loads.)

Per kernel it reports shared memory, ptxas registers and spill bytes, and the
tensor-core work of one loop iteration read off the PTX: the m*n*k of every
wgmma (per warp group) or mma (per warp) instruction in each innermost loop,
times the warp groups or warps that issue it, against the useful work of one tile
(the kernel's matrix products at BLOCK_M x BLOCK_N x BLOCK_D): the redundancy
ratio, 1.0 when no two warps compute the same product.

--matrix compiles every entry of the tile tables (sm80 and sm90, the fallback at
sm89), head_dim 64 / 128 / 256, bf16 (fp16 where --fp16-bounds says), plain causal
and mmca split, every kernel of both backward modes; --candidates adds the alternatives
`auto` times (kernels.candidate_configs; rows marked alt, each distinct compile once; the
table's tiles on the plain grid only at GRID_COMPARISON). Each row names its work-order
grid (TileConfig.grid) and counts the spill instructions (SASS STL/LDL, nvdisasm) inside
the tile loops, where a spill costs once per tile rather than once per program.
tests/test_attention_aot.py asserts on the rows of --matrix --candidates. ptxas usage is
taken from Triton's own ptxas run and kept beside the compiled kernel in Triton's cache,
so a warm cache answers without compiling.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile for real, before the kernels are defined
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints its own ptxas -v log: no second ptxas run

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.cache import get_cache_manager  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from fastvlm.kernels import attention as K  # noqa: E402

# opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), the launch limit
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
MATRIX_CAPS = (80, 89, 90)  # sm80 and sm90 tables, and the fallback table at sm89
HEAD_DIMS = (64, 128, 256)
USAGE_FILE = "fastvlm_ptxas_usage.json"
VARIANTS = {"plain": ("causal", False), "mmca split": ("mmca", True)}
KIND_CODES = {"causal": 0, "mmca": 3}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
H100_SMS = 132
GRID_NAMES = {code: name for name, code in K.GRIDS.items()}

# Matrix products of one tile per kernel (plain / split): what the loop body must do once.
# forward: S = QK^T, PV (split: one PV per branch); dQ: S, dP, dS K; dK/dV: S^T, dP^T,
# P^T dO, dS^T Q; the fused single pass adds dQ = dS K.
USEFUL_PRODUCTS = {"_attn_fwd": (2, 3), "_attn_bwd_dq": (3, 3), "_attn_bwd_dkdv": (4, 4),
                   "_attn_bwd_dkdv+dq": (5, 5)}


# ---- the launches of one call ----------------------------------------------------------------
def call_launches(head_dim: int, dtype: str, fwd: K.TileConfig, bwd: K.TileConfig, variant: str,
                  n: int = 8192, heads: int = 32, kv_heads: int = 8, batch: int = 1) -> dict:
    """Every launch of one forward + backward (both backward modes), keyed by kernel name,
    exactly as the launchers build them, on meta tensors (nothing is allocated)."""
    kind, split = VARIANTS[variant]
    meta = dict(device="meta")
    q = torch.empty(batch, heads, n, head_dim, dtype=DTYPES[dtype], **meta)
    k = torch.empty(batch, kv_heads, n, head_dim, dtype=DTYPES[dtype], **meta)
    lo = torch.empty(batch, n, dtype=torch.int32, **meta)
    is_image = torch.empty(batch, n, dtype=torch.bool, **meta)

    def block_map(cfg):
        tq, tk = triton.cdiv(n, cfg.block_m), triton.cdiv(n, cfg.block_n)
        lists = lambda a, b: (torch.empty(batch, a, dtype=torch.int32, **meta),  # noqa: E731
                              torch.empty(batch, a, b, dtype=torch.int32, **meta))
        return (*lists(tq, tk), *lists(tq, tk), *lists(tk, tq), *lists(tk, tq))

    common = dict(kind=KIND_CODES[kind], split=split, scale=head_dim ** -0.5)
    fwd_map, bwd_map = block_map(fwd), block_map(bwd)
    # a config's grid as persistent_grid gives it on a causal layout of an H100 (132 SMs; the
    # program count reaches the kernel only as the launch's), over the map's work order
    row_order = torch.empty(batch * fwd_map[0].shape[1], dtype=torch.int32, **meta)
    col_order = torch.empty(batch * bwd_map[4].shape[1], dtype=torch.int32, **meta)
    programs, dkdv_programs = ({"plain": 0, "longest_first": -1}.get(cfg.grid, K.PERSISTENT_PER_SM * H100_SMS)
                               for cfg in (fwd, bwd))
    out, obr, lse, launches = K.forward_launches(q, k, k.clone(), lo, lo.clone(), is_image, *fwd_map[:4],
                                                 cfg=fwd, order=row_order, programs=programs, **common)
    found = {kernel_name(launch): launch for launch in launches}
    for deterministic in (True, False):
        *_, steps = K.backward_launches(q.clone(), q, k, k.clone(), out, obr, lse, lo, lo.clone(), is_image,
                                        *fwd_map[:4], *bwd_map[4:], cfg=fwd, dkdv_cfg=bwd,
                                        deterministic=deterministic, row_order=row_order, col_order=col_order,
                                        programs=programs, dkdv_programs=dkdv_programs, **common)
        found.update((kernel_name(s), s) for s in steps if isinstance(s, K.Launch))
    return found


def kernel_name(launch: K.Launch) -> str:
    """The kernel's name; the dK/dV kernel that also sums dQ (the fast backward) is its own entry."""
    return launch.kernel.__name__ + ("+dq" if launch.kwargs.get("FUSED_DQ") else "")


def specialise(launch: K.Launch, backend) -> tuple[ASTSource, dict]:
    """The source and options Triton's JITFunction.run compiles for this launch (its own binder)."""
    fn = launch.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs, debug=False)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__


# ---- resources off the compiled code ---------------------------------------------------------
def parse_ptxas(text: str) -> dict | None:
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not (regs and spills):
        return None
    return {"regs": int(regs.group(1)), "spill_st": int(spills.group(1)), "spill_ld": int(spills.group(2))}


def run_ptxas(ptx: str, cap: int) -> dict:
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    arch = f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        res = subprocess.run([str(ptxas), "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", f.name,
                              "-o", os.devnull], capture_output=True, text=True, check=True)
    return parse_ptxas(res.stdout + res.stderr)


_LABEL = re.compile(r"^(\$L__\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_WGMMA = re.compile(r"\bwgmma\.mma_async\.\S*\.m(\d+)n(\d+)k(\d+)\.")
_MMA = re.compile(r"\bmma\.sync\.aligned\.m(\d+)n(\d+)k(\d+)\.")


def innermost_loops(ptx: str) -> list[list[str]]:
    """The lines of each innermost loop of the PTX, in program order. A loop is a label and
    the backward branch to it."""
    lines = ptx.splitlines()
    labels = {}
    loops = []
    for i, line in enumerate(lines):
        s = line.strip()
        if m := _LABEL.match(s):
            labels[m.group(1)] = i
        elif (m := _BRANCH.search(s)) and m.group(1) in labels:
            loops.append((labels[m.group(1)], i))
    innermost = [(a, b) for a, b in loops if not any(a < c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return [lines[a:b + 1] for a, b in sorted(innermost)]


def loop_tensor_work(ptx: str, num_warps: int) -> list[int]:
    """Tensor-core multiply-adds (m*n*k summed over the warps that issue them) of one
    iteration of each innermost loop of the PTX that has any, in program order; wgmma is
    issued per warp group (4 warps), mma per warp."""
    work = []
    for body in innermost_loops(ptx):
        total = 0
        for line in body:
            if m := _WGMMA.search(line):
                total += (num_warps // 4) * int(m.group(1)) * int(m.group(2)) * int(m.group(3))
            elif m := _MMA.search(line):
                total += num_warps * int(m.group(1)) * int(m.group(2)) * int(m.group(3))
        if total:
            work.append(total)
    return work


_TMA_LOAD = re.compile(r"\bcp\.async\.bulk\.tensor\.\dd\.shared::\w+\.global")
_TMA_STORE = re.compile(r"\bcp\.async\.bulk\.tensor\.\dd\.global\.shared")
# per-thread loads: cp.async copies (size in bytes last but one operand) and ld.global
_THREAD_LOAD = re.compile(r"\bcp\.async\.c[ag]\.shared\.global\s.*?,\s*(0x[0-9a-f]+|\d+)\s*(?:,[^;]*)?;"
                          r"|\bld\.global\.(?:\w+\.)*?(v[248]\.)?[bfsu](\d+)\b")


def loop_loads(ptx: str) -> list[dict]:
    """Loads of each innermost loop that does tensor-core work: TMA tile copies (whole
    tiles, bounds checked by the copy engine), and per-thread loads, split into 16-byte ones
    (the pointer path's share of a Q/K/V/dO tile, masked per element) and narrower ones
    (per-row metadata: block indices, image flags, lse and delta)."""
    rows = []
    for body in innermost_loops(ptx):
        text = "\n".join(body)
        if not (_WGMMA.search(text) or _MMA.search(text)):
            continue
        wide = narrow = 0
        for m in _THREAD_LOAD.finditer(text):
            if m.group(1):
                size = int(m.group(1), 0)
            else:
                size = int(m.group(3)) // 8 * (int(m.group(2)[1]) if m.group(2) else 1)
            wide += size >= 16
            narrow += size < 16
        rows.append({"tma": len(_TMA_LOAD.findall(text)), "wide": wide, "narrow": narrow})
    return rows


_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_SASS_BRANCH = re.compile(r"\bBRA\b[^;]*?(\.L_x_\d+)")
_SASS_SPILL = re.compile(r"\b(?:STL|LDL)\b")
_SASS_TENSOR = re.compile(r"\b(?:HGMMA|HMMA)\b")


def loop_spill_instructions(cubin: bytes) -> list[int] | None:
    """Local-memory (spill) instructions, STL + LDL, in each innermost SASS loop that issues
    tensor-core work (the tile loops), in program order; None without nvdisasm. ptxas's spill
    bytes count every spill; those outside the tile loops run once per program (or per GQA
    head), those inside once per tile."""
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    if not nvdisasm.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        lines = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True,
                               check=True).stdout.splitlines()
    labels, loops = {}, []
    for i, line in enumerate(lines):
        if m := _SASS_LABEL.match(line):
            labels[m.group(1)] = i
        elif (m := _SASS_BRANCH.search(line)) and m.group(1) in labels:
            loops.append((labels[m.group(1)], i))
    innermost = [(a, b) for a, b in loops if not any(a < c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return [sum(bool(_SASS_SPILL.search(x)) for x in lines[a:b + 1]) for a, b in sorted(innermost)
            if any(_SASS_TENSOR.search(x) for x in lines[a:b + 1])]


def compile_launch(launch: K.Launch, cap: int) -> dict:
    """Compile one launch for sm_<cap> through ptxas: shared memory, ptxas usage, loop work."""
    target = GPUTarget("cuda", cap, 32)
    src, options = specialise(launch, make_backend(target))
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Triton's ptxas -v log, printed on a cache miss
        compiled = triton.compile(src, target=target, options=options)
    cache = get_cache_manager(compiled.hash)
    usage = parse_ptxas(log.getvalue())
    if usage is None:  # a cache hit: the usage kept from the compile, else ptxas once more
        path = cache.get_file(USAGE_FILE)
        usage = json.loads(Path(path).read_text()) if path else run_ptxas(compiled.asm["ptx"], cap)
    cache.put(json.dumps(usage), USAGE_FILE, binary=False)
    ptx = compiled.asm["ptx"]
    return {"shared": compiled.metadata.shared, **usage,
            "loop_work": loop_tensor_work(ptx, options["num_warps"]),
            "loop_spills": loop_spill_instructions(compiled.asm["cubin"]),
            "wgmma": bool(_WGMMA.search(ptx)), "mma": bool(_MMA.search(ptx)),
            "tma_loads": len(_TMA_LOAD.findall(ptx)), "tma_stores": len(_TMA_STORE.findall(ptx)),
            "loop_loads": loop_loads(ptx), "global_scratch": compiled.metadata.global_scratch_size,
            "specialised": [launch.kernel.arg_names[path[0]] for path, attr in src.attrs.items() if attr]}


def useful_work(kernel: str, variant: str, consts: dict) -> int | None:
    products = USEFUL_PRODUCTS.get(kernel)
    if products is None:
        return None
    return products[variant != "plain"] * consts["BLOCK_M"] * consts["BLOCK_N"] * consts["BLOCK_D"]


# ---- jobs ------------------------------------------------------------------------------------
# where --matrix --candidates compiles the table's tiles on the plain grid too (a candidate
# `auto` times everywhere): the grids compared (tests/test_attention_aot.py); elsewhere those
# kernels differ from the table's only in the work-item lookup at their top
GRID_COMPARISON = ((90, 128),)


def config_pairs(cap: int, head_dim: int, candidates: bool = False,
                 matrix: bool = False) -> tuple[tuple[K.TileConfig, K.TileConfig], ...]:
    """(forward, backward) tiles: the table's entry, then (candidates) the alternatives `auto` times
    (for the matrix, the table's tiles on another grid only at GRID_COMPARISON)."""
    capability = (cap // 10, cap % 10)
    if candidates:
        pairs = K.candidate_configs(capability, head_dim)
        if matrix and (cap, head_dim) not in GRID_COMPARISON:
            tiles = lambda pair: tuple(replace(c, grid="plain") for c in pair)  # noqa: E731
            pairs = pairs[:1] + tuple(p for p in pairs[1:] if tiles(p) != tiles(pairs[0]))
        return pairs
    return ((K.gpu_config(capability, head_dim), K.gpu_config(capability, head_dim, backward=True)),)


def kernel_jobs(cap: int, head_dim: int, dtype: str, pairs, delta: bool = True) -> list[dict]:
    """Every kernel of one call per (forward, backward) pair, plain and split, each distinct
    compile once: a kernel whose constexprs and options (the pair's tiles reach a kernel
    only through them) another pair already brought is not compiled again (the delta
    kernel has no variants or tiles: once, if asked for). `table` marks the
    kernels of the first pair (the tile table's entry)."""
    jobs, seen = [], set()
    for n_pair, (fwd, bwd) in enumerate(pairs):
        for variant in VARIANTS:
            for kernel, launch in call_launches(head_dim, dtype, fwd, bwd, variant).items():
                is_delta = kernel == "_bwd_delta"
                key = (kernel, "any" if is_delta else variant, *sorted(launch.kwargs.items()))
                if key in seen or (is_delta and not delta):
                    continue
                seen.add(key)
                jobs.append(dict(cap=cap, head_dim=head_dim, dtype=dtype, variant=key[1], kernel=kernel,
                                 table=n_pair == 0, fwd=list(fwd.__dict__.values()),
                                 bwd=list(bwd.__dict__.values())))
    return jobs


def run_job(job: dict) -> dict:
    fwd, bwd = K.TileConfig(*job["fwd"]), K.TileConfig(*job["bwd"])
    variant = "plain" if job["variant"] == "any" else job["variant"]
    launch = call_launches(job["head_dim"], job["dtype"], fwd, bwd, variant)[job["kernel"]]
    out = dict(job, num_warps=launch.kwargs.get("num_warps", 4), num_stages=launch.kwargs.get("num_stages", 3),
               tma=bool(launch.kwargs.get("USE_TMA")),
               grid=GRID_NAMES[launch.kwargs.get("GRID", 0)],
               block=[launch.kwargs.get("BLOCK_M"), launch.kwargs.get("BLOCK_N")], limit=SHARED_LIMIT[job["cap"]])
    t0 = time.monotonic()
    try:
        out.update(compile_launch(launch, job["cap"]))
    except Exception as e:  # reported per entry: one failure must not hide the others
        out["error"] = f"{type(e).__name__}: {str(e)[-500:]}"
    out["seconds"] = round(time.monotonic() - t0, 2)
    useful = useful_work(job["kernel"], variant, launch.kwargs)
    if "error" not in out and useful:
        out["useful"] = useful
        out["redundancy"] = [round(w / useful, 3) for w in out["loop_work"]]
    out["ok"] = "error" not in out and 0 < out["shared"] <= out["limit"]
    return out


def matrix_jobs(caps=MATRIX_CAPS, fp16_bounds=None, candidates=False, delta=True) -> list[dict]:
    """Each table entry (and with candidates, each alternative `auto` times, in bf16) per
    (target, head_dim 64/128/256): bf16 always, fp16 for the head_dims in fp16_bounds (all
    if None). fp16 and bf16 tiles have the same bytes."""
    jobs = []
    for cap in caps:
        for d in HEAD_DIMS:
            for dtype in ("bf16", "fp16"):
                if dtype == "bf16" or fp16_bounds is None or d in fp16_bounds:
                    pairs = config_pairs(cap, d, candidates and dtype == "bf16", matrix=True)
                    jobs += kernel_jobs(cap, d, dtype, pairs, delta)
    return jobs


def with_tma(job: dict, on: bool) -> dict:
    """The job with its configs' tma flag forced (on only where the target has TMA)."""
    on = on and job["cap"] >= 90
    fwd, bwd = (dataclasses.replace(K.TileConfig(*job[c]), tma=on) for c in ("fwd", "bwd"))
    return dict(job, fwd=list(fwd.__dict__.values()), bwd=list(bwd.__dict__.values()))


def run_all(jobs: list[dict], workers: int) -> list[dict]:
    if workers <= 1:
        return [run_job(j) for j in jobs]
    # spawn, not fork: a clean interpreter per worker (the parent may hold MLIR/LLVM state)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(run_job, jobs))


def format_row(r: dict) -> str:
    head = (f"sm{r['cap']} D{r['head_dim']:<3d} {r['dtype']} {r['variant']:10s} {r['kernel']:17s} "
            f"{'table' if r['table'] else 'alt  '} {r['block'][0]}x{r['block'][1]} w{r['num_warps']} "
            f"s{r['num_stages']} {r.get('grid', 'plain'):13s}{' tma' if r.get('tma') else ''}")
    if "error" in r:
        return f"{head} FAILED {r['error']}"
    tc = "wgmma" if r["wgmma"] else "mma" if r["mma"] else "no tensor cores"
    red = ("" if "redundancy" not in r else
           f", {tc} work/iter {r['loop_work']} = {r['redundancy']} x useful {r['useful']}")
    loads = "" if not r["loop_loads"] else (
        ", loop loads tma/16B/narrow " + " ".join(f"{x['tma']}/{x['wide']}/{x['narrow']}" for x in r["loop_loads"]))
    tma = f", TMA ld/st {r['tma_loads']}/{r['tma_stores']}" if r["tma_loads"] or r["tma_stores"] else ""
    return (f"{head} shared {r['shared']:6d} B / {r['limit']} {'ok ' if r['ok'] else 'OVER'}, "
            f"{r['regs']} regs, spills {r['spill_st']}/{r['spill_ld']} B st/ld "
            f"(spill instructions in the tile loops {r.get('loop_spills')}){red}{tma}{loads}")


def source_commit() -> str:
    """The commit the kernels were compiled from (+dirty when the package or this tool differ from it)."""
    git = ["git", "-C", str(Path(__file__).resolve().parents[1])]
    try:
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no", "--", "fastvlm",
                                      "benchmarks/attention_resources.py"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cap", type=int, default=90, help="compute capability, e.g. 80 or 90")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--fwd", default=None, help="forward tiles block_m,block_n,num_warps,num_stages (default: table)")
    p.add_argument("--bwd", default=None, help="backward tiles, likewise")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--grid", default="table", choices=("table", *K.GRIDS),
                   help="one config: the configs' own grid (TileConfig.grid), or this one for both")
    p.add_argument("--matrix", action="store_true", help="every tile-table entry for sm80/sm89/sm90")
    p.add_argument("--candidates", action="store_true",
                   help="also the alternatives `auto` times (kernels.candidate_configs), each distinct compile once")
    p.add_argument("--no-delta", action="store_true", help="leave out the delta kernel (no tiles, no tensor cores)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    p.add_argument("--json", action="store_true", help="also print one JSON line of all rows")
    p.add_argument("--tma", choices=("table", "on", "off"), default="table",
                   help="TMA tensor descriptors for the tile loads/stores: as the configs say, or forced "
                        "(on: where the target has TMA, sm90+) for a comparison")
    p.add_argument("--fp16-bounds", default=None,
                   help="--matrix: fp16 only for these head_dims, e.g. 128, or none (default: every one)")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    print(f"# triton {triton.__version__}, fastvlm commit {source_commit()}, GQA 4:1 N=8192 launches")
    if args.matrix:
        bounds = (None if args.fp16_bounds is None else set() if args.fp16_bounds == "none"
                  else {int(b) for b in args.fp16_bounds.split(",")})
        jobs = matrix_jobs(fp16_bounds=bounds, candidates=args.candidates, delta=not args.no_delta)
    else:
        (fwd, bwd), *alternatives = config_pairs(args.cap, args.head_dim, args.candidates)
        fwd = K.TileConfig(*map(int, args.fwd.split(","))) if args.fwd else fwd
        bwd = K.TileConfig(*map(int, args.bwd.split(","))) if args.bwd else bwd
        if args.grid != "table":  # the same tiles on another grid
            fwd, bwd = (replace(c, grid=args.grid) for c in (fwd, bwd))
        print(f"# forward {fwd}\n# backward {bwd}")
        jobs = kernel_jobs(args.cap, args.head_dim, args.dtype, [(fwd, bwd), *alternatives], not args.no_delta)
    if args.tma != "table":
        jobs = [with_tma(j, args.tma == "on") for j in jobs]
    rows = run_all(jobs, args.jobs)
    print("\n".join(format_row(r) for r in rows))
    print(f"# {len(rows)} kernels in {time.monotonic() - t0:.0f} s (triton {triton.__version__})")
    if args.json:
        print(json.dumps(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
