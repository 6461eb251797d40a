"""Headline numbers from benchmark results files, and the README's Performance section.

    python benchmarks/report.py            # rewrite README.md's Performance section
    python benchmarks/report.py --check    # exit 1 if the README is not what the results say

Every number in that section comes from a results file under benchmarks/results/
(the newest per benchmark, shape and device), printed with its device, date and
file, so no claim stands without a file behind it. Each benchmark's headline is
extracted below from the JSON it writes; a results file may instead carry its
own "headline" list of [what, value] pairs.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from common import RESULTS

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- performance:begin (benchmarks/report.py) -->", "<!-- performance:end -->"


@dataclass
class Row:
    benchmark: str
    what: str
    value: str
    device: str
    date: str
    file: str
    ratio: float | None = None  # for the summary plot: x of the baseline (speed up or memory)


def _ratio(a, b):
    return a / b if b else float("nan")


def _train(d):
    out = []
    for r in d["rows"]:
        if r["variant"].startswith("fastvlm"):
            base = "hf+peft qlora" if r["variant"].endswith("qlora") else "hf+peft"
            out.append((f"{r['variant']} vs {base}: supervised tokens/s", f"{r['speedup']:.2f}x", r["speedup"]))
            out.append((f"{r['variant']} vs {base}: step peak memory", f"{r['memory_ratio']:.2f}x",
                        r["memory_ratio"]))
    return out


def _train_hf(d):
    """bench_train --hf: fastvlm against TRL's SFTTrainer and the plain PEFT loop."""
    ours = next(r for r in d["rows"] if r["variant"] == "fastvlm")
    family = ours.get("family", "")
    out = []
    for base in ("trl", "hf+peft"):
        speed, memory = ours[f"speedup_vs_{base}"], ours[f"memory_vs_{base}"]
        out.append((f"{family} SFT vs {base}: supervised tokens/s", f"{speed:.2f}x", speed))
        if memory is not None:
            out.append((f"{family} SFT vs {base}: step peak memory", f"{memory:.2f}x", memory))
    return out


def _preference(d):
    ours = next(r for r in d["rows"] if r["variant"] == "fastvlm")
    out = [("DPO step vs TRL DPOTrainer: pairs/s", f"{ours['speedup']:.2f}x", ours["speedup"])]
    if ours["memory_ratio"] is not None:
        out.append(("DPO step vs TRL DPOTrainer: step peak memory", f"{ours['memory_ratio']:.2f}x",
                    ours["memory_ratio"]))
    return out


def _vlm(d):
    by = {r["variant"]: r for r in d["results"]}
    ours = by["fastvlm"]
    return [(f"training step vs {v}: tokens/s", f"{_ratio(by[v]['seconds'], ours['seconds']):.2f}x",
             _ratio(by[v]["seconds"], ours["seconds"])) for v in by if v != "fastvlm"]


def _mask(d):
    big = max(r["N"] for r in d["rows"])
    rows = [r for r in d["rows"] if r["N"] == big]
    cpp = max(rows, key=lambda r: r["cpp_s"])
    out = [(f"block map at N={big} ({cpp['kind']}): C++ op time", f"{cpp['cpp_s'] * 1e3:.2f} ms", None),
           (f"block map at N={big}: bytes vs a dense mask",
            f"{cpp['block_map_bytes'] + cpp['layout_bytes']} vs {cpp['dense_mask_bytes']}",
            _ratio(cpp["block_map_bytes"] + cpp["layout_bytes"], cpp["dense_mask_bytes"]))]
    if cpp.get("flex_s"):
        out.append((f"block map at N={big} vs FlexAttention create_block_mask", f"{cpp['flex_s'] / cpp['cpp_s']:.0f}x",
                    None))
    return out


def _linear_ce(d):
    out = []
    for vocab in sorted({r["vocab"] for r in d["rows"]}):
        rows = {r["method"]: r for r in d["rows"] if r["vocab"] == vocab}
        naive = rows.pop("naive")
        for method, r in rows.items():
            what = "answer log-probs" if d.get("benchmark", "").startswith("bench_linear_logprob") else "LM-head loss"
            out.append((f"{what}, vocab {vocab}, {d.get('supervised', '?')} supervised: {method} memory vs naive",
                        f"{_ratio(r['peak_bytes'], naive['peak_bytes']):.2f}x",
                        _ratio(r["peak_bytes"], naive["peak_bytes"])))
    return out


def _memory(d):
    shapes = [r["shape"] for r in d["rows"]]
    shape = "llava-1.5-7b" if "llava-1.5-7b" in shapes else shapes[0]
    rows = {(r["optimizer"], r["method"], r.get("source")): r for r in d["rows"] if r["shape"] == shape}
    full = next((r for (_, m, _), r in rows.items() if m == "full"), None)
    out = []
    for (_, method, _), r in rows.items():
        total = r["weights_bytes"] + r["grads_bytes"] + r["optimizer_bytes"]
        out.append((f"{shape} {method} ({r['optimizer']}, {r.get('source', '?')}): weights+grads+optimizer",
                    f"{total / 2**20:.1f} MiB" if total < 2**30 else f"{total / 2**30:.1f} GiB",
                    _ratio(total, full["weights_bytes"] + full["grads_bytes"] + full["optimizer_bytes"])
                    if full and method != "full" else None))
    return out


def _encoder(d):
    return [(f"{r['model']} `{r['policy']}`: activation memory / step time vs none",
             f"{r['memory_ratio']:.2f}x / {r['time_ratio']:.2f}x", r["memory_ratio"])
            for r in d["policies"] if r["policy"] != "none"]


def _attention(d):
    """fwd+bwd speed-up over each baseline, the range over layouts and kinds, per N."""
    out = []
    baselines = sorted({r["method"] for r in d["rows"]} - {"fastvlm", "reference"})
    window = d.get("args", {}).get("window", "None")
    under = "" if window == "None" else f", sliding window {window}"
    for method in baselines:
        for n in sorted({r["N"] for r in d["rows"]}):
            ratios = [r["fwd_bwd_ratio"] for r in d["rows"] if r["method"] == method and r["N"] == n
                      and r.get("fwd_bwd_ratio")]
            if ratios:
                out.append((f"attention fwd+bwd vs {method}, N={n}{under} ({len(ratios)} layouts x kinds): "
                            "speed-up range",
                            f"{min(ratios):.2f}-{max(ratios):.2f}x", min(ratios)))
    return out


EXTRACTORS = {"bench_attention": _attention,
              "bench_train": _train, "bench_train_hf": _train_hf, "bench_preference": _preference,
              "bench_vlm": _vlm, "bench_layout": _mask,
              "bench_linear_cross_entropy": _linear_ce, "bench_linear_logprob": _linear_ce,
              "bench_memory": _memory, "bench_encoder": _encoder,
              # results written before the scripts took their op's name (bench_layout, ...)
              "bench_mask": _mask, "bench_linear_ce": _linear_ce}


def benchmark_of(path: Path, d: dict) -> str:
    name = d.get("benchmark") or path.stem
    return next((k for k in sorted(EXTRACTORS, key=len, reverse=True) if name.startswith(k)), name.split("_CPU")[0])


def collect(folders: list[Path]) -> list[Row]:
    """Headline rows of the newest results file per (benchmark, file stem without its date)."""
    newest = {}
    for folder in folders:
        for path in sorted(folder.rglob("*.json")):
            if "_local" in path.parts:
                continue
            try:
                d = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            env = d.get("env") if isinstance(d, dict) else None
            if not env or "date" not in env:
                continue
            key = (benchmark_of(path, d), path.stem.rsplit("_", 1)[0], env["device"])
            if key not in newest or env["date"] > newest[key][1]["env"]["date"]:
                newest[key] = (path, d)
    rows = []
    for (bench, _, device), (path, d) in sorted(newest.items()):
        items = d.get("headline")
        if items is None and bench in EXTRACTORS:
            try:
                items = EXTRACTORS[bench](d)
            except (KeyError, TypeError, ValueError) as e:
                items = [("(results file not understood)", f"{type(e).__name__}: {e}", None)]
        for what, value, *ratio in items or []:
            rows.append(Row(bench, what, value, device, d["env"]["date"][:10], str(path.relative_to(ROOT)
                                                                                 if path.is_relative_to(ROOT)
                                                                                 else path),
                            ratio[0] if ratio else None))
    return rows


def markdown(rows: list[Row], status: dict | None = None) -> str:
    lines = ["| benchmark | what | result | device | date | file |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.benchmark} | {r.what} | {r.value} | {r.device} | {r.date} | `{r.file}` |" for r in rows]
    if status:
        lines += ["", "| benchmark run | status | seconds |", "|---|---|---|"]
        lines += [f"| {k} | {s} | {t:.0f} |" for k, (s, t) in status.items()]
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path) -> None:
    ratios = [r for r in rows if r.ratio is not None and r.ratio == r.ratio]
    if not ratios:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 0.35 * len(ratios) + 1))
    ax.barh([f"{r.benchmark}: {r.what}"[:90] for r in ratios], [r.ratio for r in ratios])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("x of the baseline (speed-up, or memory fraction)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def readme_section(rows: list[Row]) -> str:
    intro = ("Generated by `python benchmarks/report.py` from the newest results files; each row names its "
             "device, date and file. CPU rows come from a shared 2-core machine: they show memory and relative "
             "cost, not GPU speed.")
    return f"{BEGIN}\n{intro}\n\n{markdown(rows)}{END}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check that the README is up to date")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = ap.parse_args(argv)
    text = args.readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"{args.readme}: no Performance markers ({BEGIN} ... {END})", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = head + readme_section(collect([args.results])) + tail
    if args.check:
        if new != text:
            print(f"{args.readme}: Performance section is stale; run python benchmarks/report.py", file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(new)
    print(f"wrote the Performance section of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
