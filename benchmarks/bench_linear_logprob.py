"""Memory and time of per-sequence answer log-probabilities (what DPO / SimPO / ORPO take):
fastvlm's linear_logprob vs the naive head (all logits in fp32, log_softmax, gather, sum per
sequence), forward + backward, at vocab 32k (Llama/Vicuna) and 152k (Qwen2).

    python benchmarks/bench_linear_logprob.py                 # CPU, small hidden size
    python benchmarks/bench_linear_logprob.py --device cuda   # GPU: 7B shapes, bf16
    python benchmarks/bench_linear_logprob.py --smoke         # seconds; what the tests run

A row holds `--sequences` answers covering `--supervised` of its tokens (the rest: image and
prompt tokens, not counted); the upstream gradient differs per sequence, as a preference loss
gives. Peak memory: torch.cuda.max_memory_allocated on a GPU; on CPU each case runs in a fresh
process and reports its peak resident-set growth over the inputs. Times are medians.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fastvlm.ops.linear_logprob import linear_logprob

from common import environment, markdown_table, median_time, peak_memory, print_header, run_isolated, save_results

METHODS = {"naive": "reference", "fastvlm": "auto"}


def one_case(method, tokens, hidden, vocab, supervised, sequences, dtype, device, repeats):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=gen).to(device, dtype).requires_grad_()
    head = torch.nn.Linear(hidden, vocab, bias=False).to(device, dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    # answers at the end of the row, one run of tokens each (as in a shared-prompt row)
    answer_tokens = int(tokens * supervised)
    seq = torch.full((tokens,), -1, dtype=torch.long)
    seq[tokens - answer_tokens:] = torch.arange(answer_tokens) * sequences // max(answer_tokens, 1)
    seq = seq.to(device)
    grad_out = torch.randn(sequences, generator=gen).to(device)

    def step():
        logp, _ = linear_logprob(h, head, labels, seq, sequences, backend=METHODS[method])
        logp.backward(grad_out.to(logp.dtype))
        h.grad = head.weight.grad = None

    return {"peak_bytes": peak_memory(step, device), "seconds": median_time(step, repeats, device=device)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--vocabs", type=int, nargs="+", default=[32000, 152064])
    p.add_argument("--supervised", type=float, default=0.3, help="fraction of tokens in an answer")
    p.add_argument("--sequences", type=int, default=16, help="answers per batch (2 per preference pair)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: one CPU case in a fresh process
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    tokens = args.tokens or (8192 if gpu else 2048)
    hidden = args.hidden or (4096 if gpu else 256)
    if args.smoke:
        tokens, hidden, args.vocabs, args.repeats = 256, 32, [2000], 1
    if args.case:
        method, vocab = args.case.split(":")
        print(json.dumps(one_case(method, tokens, hidden, int(vocab), args.supervised, args.sequences, dtype,
                                  "cpu", args.repeats)))
        return None
    env = environment(args.device)
    print_header("per-sequence answer log-probs (bench_linear_logprob.py)", env)
    rows = []
    for vocab in args.vocabs:
        for method in METHODS:
            if gpu:
                res = one_case(method, tokens, hidden, vocab, args.supervised, args.sequences, dtype, "cuda",
                               args.repeats)
            else:
                res = run_isolated(__file__, ["--case", f"{method}:{vocab}", "--tokens", str(tokens),
                                              "--hidden", str(hidden), "--supervised", str(args.supervised),
                                              "--sequences", str(args.sequences), "--repeats", str(args.repeats)])
            rows.append({"vocab": vocab, "method": method, **res})
            print(f"  vocab {vocab:6d} {method:8s} peak {res['peak_bytes'] / 2**20:9.1f} MiB  "
                  f"{res['seconds'] * 1e3:9.1f} ms", flush=True)
    table = []
    for vocab in args.vocabs:
        naive, ours = (next(r for r in rows if r["vocab"] == vocab and r["method"] == m) for m in METHODS)
        table.append([vocab, f"{naive['peak_bytes'] / 2**20:.0f}", f"{ours['peak_bytes'] / 2**20:.0f}",
                      f"{naive['peak_bytes'] / max(ours['peak_bytes'], 1):.1f}x",
                      f"{naive['seconds'] * 1e3:.1f}", f"{ours['seconds'] * 1e3:.1f}",
                      f"{naive['seconds'] / ours['seconds']:.2f}x"])
    md = markdown_table(["vocab", "naive peak MiB", "fastvlm peak MiB", "memory saved", "naive ms (median)",
                         "fastvlm ms (median)", "speedup"], table)
    print(f"tokens={tokens} hidden={hidden} dtype={dtype} supervised={args.supervised} sequences={args.sequences}")
    print(md)
    payload = {"benchmark": "bench_linear_logprob", "env": env, "tokens": tokens, "hidden": hidden,
               "dtype": str(dtype), "supervised": args.supervised, "sequences": args.sequences, "rows": rows}
    if args.out or not args.smoke:
        save_results(f"bench_linear_logprob_sup{round(100 * args.supervised)}", env, payload, md, args.out)
    return payload


if __name__ == "__main__":
    main()
