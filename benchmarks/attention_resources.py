"""Compile the attention kernels for a GPU target without a GPU; print their resources.

    python benchmarks/attention_resources.py --cap 90 --head-dim 128 [--config 64,64,8,3]

For each kernel (forward, dQ, dK/dV) and mask variant (plain, mmca split) it
prints shared memory and ptxas' registers / spill bytes at the tile config the
launcher picks for that GPU (or the one given). This is how the per-capability
table in fastvlm/kernels/attention.py was chosen; it is no substitute for timing.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile for real, before the kernels are defined

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastvlm.kernels import attention as K  # noqa: E402

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


def ptxas_usage(ptx: str, cap: int) -> str:
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    arch = f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        res = subprocess.run([str(ptxas), "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return f"{regs.group(1) if regs else '?'} regs, spills {spills.group(1)}/{spills.group(2)} B st/ld"


def report(cap: int, head_dim: int, cfg: K.TileConfig, dtype: str = "bf16") -> list[str]:
    lines = []
    target = GPUTarget("cuda", cap, 32)
    for label, mmca, split in (("plain", False, False), ("mmca split", True, True)):
        consts = dict(IS_MMCA=mmca, SPLIT=split, EVEN_N=False, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      BLOCK_D=K._block_d(head_dim), PRECISION="tf32")
        for fn, stages in ((K._attn_fwd, cfg.num_stages), (K._attn_bwd_dq, min(cfg.num_stages, 2)),
                           (K._attn_bwd_dkdv, min(cfg.num_stages, 2))):
            src = ASTSource(fn, signature(fn, dtype, consts), constexprs=consts)
            compiled = triton.compile(src, target=target,
                                      options={"num_warps": cfg.num_warps, "num_stages": stages})
            lines.append(f"sm{cap} D={head_dim} {label:10s} {fn.__name__:15s} shared {compiled.metadata.shared:6d} B, "
                         f"{ptxas_usage(compiled.asm['ptx'], cap)}")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cap", type=int, default=90, help="compute capability, e.g. 80 or 90")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--config", default=None, help="block_m,block_n,num_warps,num_stages")
    args = p.parse_args(argv)
    if args.config:
        cfg = K.TileConfig(*map(int, args.config.split(",")))
    else:
        cfg = K.gpu_config((args.cap // 10, args.cap % 10), args.head_dim)
    print(f"# {cfg}")
    print("\n".join(report(args.cap, args.head_dim, cfg)))


if __name__ == "__main__":
    main()
