"""Compile the attention kernels for a GPU target without a GPU; print their resources.

    python benchmarks/attention_resources.py --cap 90 --head-dim 128 [--config 64,64,8,3]
    python benchmarks/attention_resources.py --matrix [--jobs 2] [--json]

For each kernel (forward, dQ, dK/dV, delta) and mask variant (plain, mmca split) it
prints shared memory and ptxas' registers / spill bytes at the tile config the
launcher picks for that GPU (or the one given). This is how the per-capability
table in fastvlm/kernels/attention.py was chosen; it is no substitute for timing.

--matrix compiles every entry of the tile table for its target (sm80 and sm90
tables, the fallback at sm89), fp16 and bf16, plain and split, all four kernels,
and checks each against the target's shared memory (tests/test_bench_attention.py
runs it). ptxas usage is taken from Triton's own ptxas run and kept beside the
compiled kernel in Triton's cache, so a warm cache answers without compiling.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile for real, before the kernels are defined
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints its own ptxas -v log: no second ptxas run

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.cache import get_cache_manager

from fastvlm.kernels import attention as K

FLOATS = ("qk_scale", "sm_scale")
INT_SCALARS = ("H", "HKV", "GROUP", "N", "D", "TQ", "TK")  # upper-case but not pointers
I32_POINTERS = ("LO", "HI", "KV_NUM", "KV_IDX", "FULL_KV_NUM", "FULL_KV_IDX", "Q_NUM", "Q_IDX",
                "FULL_Q_NUM", "FULL_Q_IDX")


def signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in FLOATS:
            sig[name] = "fp32"
        elif name in ("LSE", "DELTA"):
            sig[name] = "*fp32"
        elif name == "IMG":
            sig[name] = "*u8"
        elif name in I32_POINTERS:
            sig[name] = "*i32"
        elif name.isupper() and name not in INT_SCALARS:
            sig[name] = f"*{dtype}"
        else:
            sig[name] = "i32"
    return sig


# opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), the launch limit
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
MATRIX_CAPS = (80, 89, 90)  # sm80 and sm90 tables, and the fallback table at sm89
USAGE_FILE = "fastvlm_ptxas_usage.json"


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
        res = subprocess.run([str(ptxas), "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    return parse_ptxas(res.stdout + res.stderr)


def compile_kernel(fn, cap: int, dtype: str, consts: dict, num_warps: int, num_stages: int,
                   aligned: bool = True) -> dict:
    """Compile one kernel for sm_<cap> through ptxas; its shared memory and ptxas usage."""
    sig = signature(fn, dtype, consts)
    # as a real launch specialises them: torch's pointers are 16-byte aligned and the strides
    # of [B, H, N, D] tensors with D a multiple of 16 are multiples of 16 (this is what lets
    # loads vectorise and pipeline through shared memory, so it sets the shared memory used)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name].startswith("*") or name.startswith("stride")} if aligned else {}
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Triton's ptxas -v log, printed on a cache miss
        compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    cache = get_cache_manager(compiled.hash)
    usage = parse_ptxas(log.getvalue())
    if usage is None:  # a cache hit: the usage kept from the compile, else ptxas once more
        path = cache.get_file(USAGE_FILE)
        usage = json.loads(Path(path).read_text()) if path else run_ptxas(compiled.asm["ptx"], cap)
    cache.put(json.dumps(usage), USAGE_FILE, binary=False)
    return {"shared": compiled.metadata.shared, **usage}


def kernel_jobs(cap: int, head_dim: int, cfg: K.TileConfig, dtype: str) -> list[dict]:
    """Every kernel launch of one tile config, with the constexprs and options the
    launchers give it (backward at most 2 stages; delta at its own fixed tiles)."""
    block_d = K._block_d(head_dim)
    jobs = []
    for label, mmca, split in (("plain", False, False), ("mmca split", True, True)):
        consts = dict(ISOLATE_IMAGES=mmca, SPLIT=split, EVEN_N=False, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      BLOCK_D=block_d, PRECISION="tf32")
        for fn, stages in (("_attn_fwd", cfg.num_stages), ("_attn_bwd_dq", min(cfg.num_stages, 2)),
                           ("_attn_bwd_dkdv", min(cfg.num_stages, 2))):
            jobs.append(dict(cap=cap, head_dim=head_dim, cfg=list(cfg.__dict__.values()), dtype=dtype,
                             variant=label, kernel=fn, consts=consts, num_warps=cfg.num_warps,
                             num_stages=stages))
    # _bwd_delta: launched with BLOCK_M=64 and Triton's default warps / stages, same for all variants
    jobs.append(dict(cap=cap, head_dim=head_dim, cfg=None, dtype=dtype, variant="any", kernel="_bwd_delta",
                     consts=dict(BLOCK_M=64, BLOCK_D=block_d), num_warps=4, num_stages=3))
    return jobs


def run_job(job: dict) -> dict:
    fn = getattr(K, job["kernel"])
    try:
        res = compile_kernel(fn, job["cap"], job["dtype"], job["consts"], job["num_warps"], job["num_stages"])
    except Exception as e:  # reported per entry: one failure must not hide the others
        res = {"error": f"{type(e).__name__}: {str(e)[-500:]}"}
    out = {k: v for k, v in job.items() if k != "consts"}
    out.update(res, limit=SHARED_LIMIT[job["cap"]])
    out["ok"] = "error" not in res and 0 < res["shared"] <= out["limit"]
    return out


def matrix_jobs(caps=MATRIX_CAPS, fp16_bounds=None) -> list[dict]:
    """Each table entry once per (target, dtype), at the largest head_dim it serves
    (head_dims in one entry share BLOCK_D up to that bound, hence the same kernels).
    bf16 for every entry; fp16 for the entries whose bound is in fp16_bounds (all if None)."""
    jobs = []
    for cap in caps:
        table = K._GPU_CONFIGS.get((cap // 10, cap % 10), K._FALLBACK_CONFIGS)
        for bound, cfg in table:
            for dtype in ("bf16", "fp16"):
                if dtype == "bf16" or fp16_bounds is None or bound in fp16_bounds:
                    jobs += kernel_jobs(cap, bound, cfg, dtype)
    return jobs


def run_all(jobs: list[dict], workers: int) -> list[dict]:
    if workers <= 1:
        return [run_job(j) for j in jobs]
    # spawn, not fork: a clean interpreter per worker (the parent may hold MLIR/LLVM state)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(run_job, jobs))


def format_row(r: dict) -> str:
    cfg = "delta 64" if r["cfg"] is None else "x".join(map(str, r["cfg"][:2])) + f" w{r['cfg'][2]}"
    head = (f"sm{r['cap']} D<={r['head_dim']:<3d} {cfg:12s} {r['dtype']} {r['variant']:10s} "
            f"{r['kernel']:15s} s{r['num_stages']}")
    if "error" in r:
        return f"{head} FAILED {r['error']}"
    return (f"{head} shared {r['shared']:6d} B / {r['limit']} {'ok ' if r['ok'] else 'OVER'}, "
            f"{r['regs']} regs, spills {r['spill_st']}/{r['spill_ld']} B st/ld")


def report(cap: int, head_dim: int, cfg: K.TileConfig, dtype: str = "bf16") -> list[str]:
    return [format_row(run_job(j)) for j in kernel_jobs(cap, head_dim, cfg, dtype)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cap", type=int, default=90, help="compute capability, e.g. 80 or 90")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--config", default=None, help="block_m,block_n,num_warps,num_stages")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--matrix", action="store_true", help="every tile-table entry for sm80/sm89/sm90")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (--matrix)")
    p.add_argument("--json", action="store_true", help="--matrix: also print one JSON line of all rows")
    p.add_argument("--fp16-bounds", default=None,
                   help="--matrix: fp16 only for these head_dim bounds, e.g. 128 (default: every entry)")
    args = p.parse_args(argv)
    if args.matrix:
        bounds = None if args.fp16_bounds is None else {int(b) for b in args.fp16_bounds.split(",")}
        rows = run_all(matrix_jobs(fp16_bounds=bounds), args.jobs)
        print("\n".join(format_row(r) for r in rows))
        if args.json:
            print(json.dumps(rows))
        return 0 if all(r["ok"] for r in rows) else 1
    if args.config:
        cfg = K.TileConfig(*map(int, args.config.split(",")))
    else:
        cfg = K.gpu_config((args.cap // 10, args.cap % 10), args.head_dim)
    print(f"# {cfg}")
    print("\n".join(report(args.cap, args.head_dim, cfg, args.dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
