"""Memory and time of the LM-head loss: fastvlm's linear_cross_entropy vs the naive
fp32-logits head, forward + backward, at vocab 32k (Llama/Vicuna) and 152k (Qwen2).

    python benchmarks/bench_linear_cross_entropy.py                    # CPU, small hidden size
    python benchmarks/bench_linear_cross_entropy.py --device cuda      # GPU: 7B shapes, bf16
    python benchmarks/bench_linear_cross_entropy.py --smoke            # seconds; what the tests run

Peak memory: torch.cuda.max_memory_allocated on a GPU; on CPU each case runs in a
fresh process and reports its peak resident-set growth over the inputs.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fastvlm.ops.linear_cross_entropy import linear_cross_entropy

from common import lm_head_benchmark, median_time, peak_memory

METHODS = {"naive": "reference", "fastvlm": "auto"}


def one_case(method, tokens, hidden, vocab, dtype, device, repeats, supervised):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=gen).to(device, dtype).requires_grad_()
    head = torch.nn.Linear(hidden, vocab, bias=False).to(device, dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[torch.rand(tokens, generator=gen) > supervised] = -100
    labels = labels.to(device)

    def step():
        loss = linear_cross_entropy(h, head, labels, backend=METHODS[method])
        loss.backward()
        h.grad = head.weight.grad = None

    return {"peak_bytes": peak_memory(step, device), "seconds": median_time(step, repeats, device=device)}


def main(argv=None):
    return lm_head_benchmark(argv, __doc__, __file__, Path(__file__).stem, "LM head + cross-entropy", one_case)


if __name__ == "__main__":
    main()
