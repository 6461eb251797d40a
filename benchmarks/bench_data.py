"""The training data pipeline: loader throughput, and packing against padded batching.

    python benchmarks/bench_data.py            # 336 px synthetic VQA loader + LLaVA-mix-like packing
    python benchmarks/bench_data.py --smoke    # tiny sizes, seconds; what the tests run

Loader: the synthetic VQA dataset (fastvlm.data.synthetic_vqa, PNG files at
--image-size px, CLIP preprocessing at the same size), tokenized with a BPE
trained on its text (llava_v1 template, 576 tokens per image as CLIP-L/14-336
gives), packed into rows of --budget tokens (best-fit decreasing), one epoch
through make_loader with 0 and 2 (persistent) worker processes after a warm-up
epoch, the
median of --rounds epochs (interleaved). The main process runs with one torch
thread (--loader-threads), as DataLoader sets in every worker: on a shared,
oversubscribed CPU the per-image torch ops of preprocessing ran ~15x slower with
2 intra-op threads than with 1, which would make workers=0 measure thread
contention, not the pipeline.
Reported: samples/s, images/s, rows/s, tokens/s fed (real tokens and row tokens
incl. padding), the epoch's real packing efficiency and the rows added because
true lengths exceeded the cheap estimates the plan was made with.

Packing: length distributions shaped like LLaVA's training mixes (no data is
downloaded; the shapes are lognormal text lengths plus 576 tokens per image):
- captions: LCS-558K stage-1 captions, one image, 10-40 caption tokens;
- llava_mix: LLaVA-665K-like: short multi-question VQA conversations (VQAv2,
  GQA, OCR-VQA grouped per image), long instruction conversations (LLaVA-Instruct)
  and ~6% text-only ShareGPT conversations with a heavy tail;
- multi_image: 1-4 images per sample with short multi-turn text.
For each: real tokens / row tokens of one epoch's plan for packed rows (bfd,
greedy) and padded batches (random; length-grouped by modality as LLaVA's
group_by_modality_length, sorting within megabatches of 8 x batch size as on 8
GPUs; token-budget batches sorted within windows of 16384 samples), and the
planning time.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import environment, markdown_table, print_header, save_results

from fastvlm.data import (
    PackedBatchSampler,
    PackedCollator,
    VLMDataset,
    make_loader,
    read_samples,
    synthetic_vqa,
)
from fastvlm.data.tokenizer import train_bpe_tokenizer
from fastvlm.models.preprocess import ImagePreprocessor

IMAGE_TOKENS = 576  # CLIP-L/14 at 336 px


def lognormal(rng, median: float, sigma: float, size: int) -> np.ndarray:
    return np.maximum(1, rng.lognormal(np.log(median), sigma, size)).astype(np.int64)


def length_distributions(n: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (lengths, has_images) of n samples."""
    rng = np.random.default_rng(seed)
    captions = IMAGE_TOKENS + rng.integers(10, 41, n) + 8
    kind = rng.choice(3, size=n, p=[0.55, 0.39, 0.06])  # short VQA, instruction, text-only
    vqa = IMAGE_TOKENS + lognormal(rng, 120, 0.7, n)
    instruct = IMAGE_TOKENS + lognormal(rng, 330, 0.5, n)
    text_only = lognormal(rng, 700, 0.9, n)
    mix = np.select([kind == 0, kind == 1], [vqa, instruct], text_only)
    images = rng.integers(1, 5, n)
    multi = images * IMAGE_TOKENS + lognormal(rng, 150, 0.6, n)
    return {"captions": (captions, np.ones(n, bool)), "llava_mix": (mix, kind < 2),
            "multi_image": (multi, np.ones(n, bool))}


def bench_packing(n: int, budget: int, batch_size: int) -> list[dict]:
    strategies = {"packed bfd": {}, "packed greedy": {"strategy": "greedy"},
                  "padded random": {"batch_size": batch_size},
                  # LLaVA sorts within megabatches of world_size x batch_size samples (8 GPUs here)
                  "padded grouped (LLaVA)": {"batch_size": batch_size, "group_by_length": True,
                                             "window": 8 * batch_size},
                  "padded token-budget grouped": {"group_by_length": True}}
    rows = []
    for name, (lengths, has_images) in length_distributions(n).items():
        capped = np.minimum(lengths, budget)
        for strategy, options in strategies.items():
            sampler = PackedBatchSampler(lengths.tolist(), budget, seed=0, has_images=has_images.tolist(), **options)
            start = time.perf_counter()
            plan = sampler.plan(0)
            plan_s = time.perf_counter() - start
            rows.append({"distribution": name, "strategy": strategy, "samples": n,
                         "mean_length": float(capped.mean()), "batches": len(plan),
                         "packing_efficiency": sampler.packing_efficiency(0), "plan_s": plan_s})
    return rows


def bench_loader(root: Path, n: int, image_size: int, budget: int, workers: list[int], rounds: int) -> list[dict]:
    splits = synthetic_vqa.write_dataset(root, n, 0, seed=0, image_size=image_size, n_captions=0)
    samples = read_samples(splits.train)
    tokenizer = train_bpe_tokenizer([t["value"] for s in samples for t in s.conversations], vocab_size=1024)
    dataset = VLMDataset(samples, splits.image_folder, tokenizer, "llava_v1", IMAGE_TOKENS,
                         ImagePreprocessor.for_family("clip", image_size), max_length=budget)
    images = sum(len(s.images) for s in samples)
    loaders = {}
    for num_workers in workers:
        sampler = PackedBatchSampler(dataset.lengths(), budget, seed=0)
        loaders[num_workers] = make_loader(dataset, sampler, PackedCollator(tokenizer.pad_token_id, budget),
                                           num_workers=num_workers, persistent_workers=num_workers > 0)
        for _ in loaders[num_workers]:  # warm-up epoch: page cache, tokenizer and worker start-up paths
            pass
    # Timed in rounds of one epoch per worker count: on a shared machine a change of
    # load then shifts every configuration alike instead of their ratio.
    times = {w: [] for w in workers}
    for _ in range(rounds):
        for num_workers, loader in loaders.items():
            start = time.perf_counter()
            for _ in loader:
                pass
            times[num_workers].append(time.perf_counter() - start)
    rows = []
    for num_workers, loader in loaders.items():
        seconds = statistics.median(times[num_workers])
        stats = loader.epoch_stats[1]  # every epoch holds the same samples (in another order)
        rows.append({"workers": num_workers, "samples": stats["samples"], "image_size": image_size,
                     "epoch_s": seconds, "samples_per_s": stats["samples"] / seconds, "images_per_s": images / seconds,
                     "rows_per_s": stats["batches"] / seconds, "real_tokens_per_s": stats["real_tokens"] / seconds,
                     "row_tokens_per_s": stats["row_tokens"] / seconds,
                     "packing_efficiency": stats["packing_efficiency"], "overflow_rows": stats["overflow_rows"],
                     "skipped": stats["skipped"], "length_calibration": dataset.length_calibration})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=128, help="synthetic VQA samples in the loader epoch")
    p.add_argument("--rounds", type=int, default=3, help="timed loader epochs per worker count (median)")
    p.add_argument("--image-size", type=int, default=336)
    p.add_argument("--budget", type=int, default=4096, help="tokens per packed row")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--loader-threads", type=int, default=1, help="torch threads of the main process in the loader "
                   "stage (DataLoader workers run with 1)")
    p.add_argument("--length-samples", type=int, default=50000, help="samples per length distribution")
    p.add_argument("--batch-size", type=int, default=16, help="padded batches: samples per batch")
    p.add_argument("--smoke", action="store_true", help="tiny sizes; results not saved unless --out")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = p.parse_args(argv)
    if args.smoke:
        args.samples, args.image_size, args.length_samples, args.rounds = 12, 64, 400, 1
    threads = torch.get_num_threads()
    env = environment("cpu")
    mode = ("SMOKE: tiny sizes, a plumbing check" if args.smoke else
            f"loader: {args.samples} synthetic VQA samples at {args.image_size} px, rows of {args.budget} tokens, "
            f"main process on {args.loader_threads} torch thread(s); packing: {args.length_samples} samples per "
            "distribution")
    print_header(f"bench_data ({mode})", env)

    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(args.loader_threads)  # what DataLoader sets in each worker
        loader_rows = bench_loader(Path(tmp), args.samples, args.image_size, args.budget, args.workers, args.rounds)
        torch.set_num_threads(threads)
    packing_rows = bench_packing(args.length_samples, args.budget, args.batch_size)

    md = markdown_table(
        ["workers", "samples", "px", "epoch s", "samples/s", "images/s", "rows/s", "real tokens/s",
         "row tokens/s", "packing efficiency", "overflow rows"],
        [[r["workers"], r["samples"], r["image_size"], f"{r['epoch_s']:.2f}", f"{r['samples_per_s']:.1f}",
          f"{r['images_per_s']:.1f}", f"{r['rows_per_s']:.2f}", f"{r['real_tokens_per_s']:.0f}",
          f"{r['row_tokens_per_s']:.0f}", f"{r['packing_efficiency']:.3f}", r["overflow_rows"]] for r in loader_rows])
    md += "\n\n" + markdown_table(
        ["distribution", "strategy", "mean length", "batches", "real / row tokens", "plan s"],
        [[r["distribution"], r["strategy"], f"{r['mean_length']:.0f}", r["batches"],
          f"{r['packing_efficiency']:.3f}", f"{r['plan_s']:.2f}"] for r in packing_rows])
    print(md)
    payload = {"benchmark": "bench_data", "env": env, "mode": mode, "budget": args.budget,
               "image_tokens": IMAGE_TOKENS, "loader": loader_rows, "packing": packing_rows}
    if args.out or not args.smoke:
        save_results("bench_data", env, payload, f"{mode}\n\n{md}", args.out)
    return payload


if __name__ == "__main__":
    main()
