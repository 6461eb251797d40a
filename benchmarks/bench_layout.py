"""Block-map construction: fastvlm's C++ op vs its torch reference vs FlexAttention's
create_block_mask, on the same packed VLM layouts, plus the bytes each representation holds.

    python benchmarks/bench_layout.py                       # N = 4k, 16k, 64k on CPU
    python benchmarks/bench_layout.py --device cuda         # adds the CUDA op (GPU machines)
    python benchmarks/bench_layout.py --sizes 1024 --smoke  # seconds; what the tests run

FlexAttention builds its block mask by evaluating mask_mod over all N x N pairs
(in chunks); fastvlm derives tiles from per-block summaries in O(N + (N/B)^2).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fastvlm.ops import KINDS
from fastvlm.synthetic import vlm_layout

from common import environment, markdown_table, median_time, print_header, save_results

BLOCK = 128


def bench(sizes, kinds, device, repeats, flex_max_n):
    from torch.nn.attention.flex_attention import create_block_mask

    rows = []
    for n in sizes:
        for kind in kinds:
            layout = vlm_layout(n, kind, "multi_image", device=device)
            backends = ["reference", "cpp" if device == "cpu" else "cuda"]
            row = {"N": n, "kind": kind, "layout_bytes": layout.nbytes(), "dense_mask_bytes": n * n,
                   "block_map_bytes": layout.block_map(BLOCK).nbytes()}
            for backend in backends:
                row[f"{backend}_s"] = median_time(lambda: layout.block_map(BLOCK, backend=backend),
                                                  repeats, device=device)
            if n > flex_max_n:
                row["flex_error"] = f"not run (N > --flex-max-n {flex_max_n})"
            else:
                mm = layout.flex_mask_mod()
                try:
                    row["flex_s"] = median_time(
                        lambda: create_block_mask(mm, 1, None, n, n, device=device, BLOCK_SIZE=BLOCK),
                        1 if n > 8192 else repeats, warmup=0 if n > 8192 else 1, device=device)
                except (RuntimeError, torch.OutOfMemoryError) as exc:  # it materialises N x N values
                    if "allocate" not in str(exc) and not isinstance(exc, torch.OutOfMemoryError):
                        raise
                    row["flex_error"] = "out of memory: " + str(exc).split("you tried to allocate")[-1].split(".")[0]
            rows.append(row)
            compiled = row.get("cpp_s", row.get("cuda_s"))
            flex = f"{row['flex_s'] * 1e3:.1f} ms" if "flex_s" in row else row.get("flex_error", "not run")
            print(f"  N={n:6d} {kind:20s} compiled {compiled * 1e3:8.3f} ms  reference "
                  f"{row['reference_s'] * 1e3:8.2f} ms  flex {flex}", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--flex-max-n", type=int, default=None,
                   help="skip FlexAttention above this N (default: 16384 on CPU, where create_block_mask "
                        "materialises N x N values: 32 GiB at 64k, killed for memory on a 24 GiB machine)")
    p.add_argument("--smoke", action="store_true", help="tiny run, results not saved")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = p.parse_args(argv)
    env = environment(args.device)
    print_header("block-map construction (bench_layout.py)", env)
    flex_max_n = args.flex_max_n or (16384 if args.device == "cpu" else 1 << 30)
    rows = bench(args.sizes, args.kinds, args.device, 1 if args.smoke else args.repeats, flex_max_n)
    compiled = "cpp" if args.device == "cpu" else "cuda"
    table = []
    for r in rows:
        c = r[f"{compiled}_s"]
        flex = r.get("flex_s")
        table.append([r["N"], r["kind"], f"{c * 1e3:.3f}", f"{r['reference_s'] * 1e3:.2f}",
                      f"{flex * 1e3:.1f}" if flex else r.get("flex_error", "not run"),
                      f"{flex / c:.0f}x" if flex else "-",
                      f"{r['layout_bytes'] / 2**10:.0f} KiB", f"{r['block_map_bytes'] / 2**10:.0f} KiB",
                      f"{r['dense_mask_bytes'] / 2**20:.0f} MiB"])
    md = markdown_table(["N", "kind", f"{compiled} ms", "reference ms", "flex create_block_mask ms",
                         f"flex / {compiled}", "layout", "block map", "dense bool mask"], table)
    print(md)
    payload = {"benchmark": "bench_layout", "block": BLOCK, "scenario": "multi_image", "env": env, "rows": rows}
    if args.out or not args.smoke:
        save_results("bench_layout", env, payload, md, args.out)
    return payload


if __name__ == "__main__":
    main()
