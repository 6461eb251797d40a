"""A model of the persistent, longest-first grid's benefit (issue 28, item 4), from the block
map's own tile counts: the makespan (the busiest SM slot's work, in tiles) of

- the plain grid in launch order: one program per (row block, batch * head), x fastest,
  each handed by the hardware to the first free slot (greedy in launch order);
- the longest-first grid (the table's, TileConfig.grid): the same items, one program each,
  launched in the block map's longest-first order (greedy in that order);
- the persistent grid: P programs, each taking the longest-first items in snake order
  (fastvlm.kernels.attention._work_item), programs handed to slots in program order;

against the lower bound max(total / slots, the largest item). A slot is one resident program (SMs x programs
resident per SM). Work of an item = tiles visited (+ `--overhead` tiles for its prologue
and epilogue: loading q, writing out). Counts, not timings: what the order can win where
every tile costs the same.

    python benchmarks/attention_schedule.py                 # causal N=8192, 128x128, B*H = 32, 132 SMs
    python benchmarks/attention_schedule.py --overhead 1 --resident 1 2
"""
from __future__ import annotations

import argparse
import heapq
import sys

from fastvlm.ops import AttentionLayout
from fastvlm.synthetic import vlm_layout


def greedy(costs, slots: int) -> float:
    """Makespan of items handed in order to the first free of `slots` slots."""
    free = [0.0] * slots
    for c in costs:
        heapq.heappush(free, heapq.heappop(free) + c)
    return max(free)


def snake_loads(sorted_costs, programs: int) -> list[float]:
    """Each persistent program's work: item w goes to program w % P in even rounds, P-1-(w % P) in odd."""
    load = [0.0] * programs
    for w, c in enumerate(sorted_costs):
        r, p = divmod(w, programs)
        load[p if r % 2 == 0 else programs - 1 - p] += c
    return load


def model(counts, heads: int, sms: int, resident: int, per_sm: int, overhead: float) -> dict:
    """counts [B][T]: tiles of each (batch row, block); heads: items per block (H, or Hkv x
    the GQA group's heads for dK/dV, whose item loops over the group)."""
    batch = len(counts)
    plain = [counts[b][t] + overhead for b in range(batch) for _ in range(heads) for t in range(len(counts[b]))]
    slots = sms * resident
    ordered = sorted(plain, reverse=True)
    loads = snake_loads(ordered, sms * per_sm)
    total = sum(plain)
    return {"items": len(plain), "slots": slots, "programs": sms * per_sm, "bound": max(total / slots, ordered[0]),
            "plain": greedy(plain, slots), "longest_first": greedy(ordered, slots), "persistent": greedy(loads, slots)}


def block_counts(layout: AttentionLayout, block_q: int, block_k: int, columns: bool):
    bm = layout.block_map(block_q, block_k)
    num = (bm.q_num_blocks + bm.full_q_num_blocks) if columns else (bm.kv_num_blocks + bm.full_kv_num_blocks)
    return num.tolist()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32, help="query heads (B = 1)")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--sms", type=int, default=132, help="H100 SXM: 132")
    p.add_argument("--resident", type=int, nargs="+", default=[1, 2], help="programs resident per SM")
    p.add_argument("--overhead", type=float, nargs="+", default=[0.0, 1.0])
    args = p.parse_args(argv)
    group = args.heads // args.kv_heads
    cases = [("plain causal", AttentionLayout.from_lengths([[args.n]], args.n)),
             ("packed causal (llava)", vlm_layout(args.n, "causal", "llava")),
             ("packed mmca (multi_image)", vlm_layout(args.n, "mmca", "multi_image"))]
    # (what, block_q, block_k, columns, items per block, tile cost): the forward at 128x128
    # tiles (the model) and at the sm90 D128 table's 128x32; dK/dV at the table's
    # 32 query rows x 128 keys, an item = one kv head's key block over its 4 q heads
    kernels = [("fwd 128x128", 128, 128, False, args.heads, 1.0),
               ("fwd 128x32 (table)", 128, 32, False, args.heads, 0.25),
               ("dK/dV 32x128 (table)", 32, 128, True, args.kv_heads, 0.25 * group)]
    print(f"# makespan in 128x128-tile units; {args.sms} SMs; persistent programs = SMs x max(2, resident); "
          f"res: programs resident per SM, ovh: tiles of prologue/epilogue per item")
    print(f"{'layout':26s} {'kernel':22s} {'res':>3s} {'ovh':>3s} {'items':>6s} {'bound':>8s} {'plain':>8s} "
          f"{'longest':>8s} {'persist':>8s} {'plain/longest':>13s} {'plain/persist':>13s} {'longest/bound':>13s}")
    for name, layout in cases:
        for what, bq, bk, columns, heads, cost in kernels:
            counts = [[c * cost for c in row] for row in block_counts(layout, bq, bk, columns)]
            for resident in args.resident:
                for ovh in args.overhead:
                    m = model(counts, heads, args.sms, resident, max(2, resident), ovh)
                    print(f"{name:26s} {what:22s} {resident:3d} {ovh:3.0f} {m['items']:6d} {m['bound']:8.1f} "
                          f"{m['plain']:8.1f} {m['longest_first']:8.1f} {m['persistent']:8.1f} "
                          f"{m['plain'] / m['longest_first']:13.3f} {m['plain'] / m['persistent']:13.3f} "
                          f"{m['longest_first'] / m['bound']:13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
