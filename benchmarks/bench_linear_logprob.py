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

from pathlib import Path

import torch

from fastvlm.ops.linear_logprob import linear_logprob

from common import lm_head_benchmark, median_time, peak_memory

METHODS = {"naive": "reference", "fastvlm": "auto"}


def one_case(method, tokens, hidden, vocab, dtype, device, repeats, supervised, sequences):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=gen).to(device, dtype).requires_grad_()
    head = torch.nn.Linear(hidden, vocab, bias=False).to(device, dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    # the answers at the end of the row, one run of tokens each (as in a shared-prompt row)
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
    return lm_head_benchmark(argv, __doc__, __file__, Path(__file__).stem, "per-sequence answer log-probs",
                             one_case, extra=[("--sequences", int, 16, "answers per batch (2 per preference pair)")])


if __name__ == "__main__":
    main()
