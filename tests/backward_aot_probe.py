"""The backward kernels' compiled code for GPU targets, without a GPU: run by
tests/test_attention_backward_aot.py in a subprocess (attention_resources switches the
interpreter off before the kernels are defined, which a pytest process must not do).

    python tests/backward_aot_probe.py 90:128:plain 80:64:mmca_split ...

Prints one JSON line: per (target, head_dim, variant) of the tile table and per backward
kernel, benchmarks/attention_resources.py's report of the real launch (registers, spills,
shared memory, tensor-core work per loop iteration), plus what the backward's claims
rest on: the atomic instructions of the PTX, and the register tiles each innermost loop
of the TTGIR writes to shared memory (`ttg.local_alloc` of a value).
"""
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402

from benchmarks import attention_resources as resources  # noqa: E402 (switches the interpreter off first)

BACKWARD_KERNELS = ("_attn_bwd_dq", "_attn_bwd_dkdv", "_attn_bwd_dkdv+dq")
_ATOMIC = re.compile(r"\b(?:atom|red)\.global\S*")
_STORE_TO_SHARED = re.compile(r"= ttg\.local_alloc %")  # a register value written to shared memory


def loop_shared_writes(ttgir: str) -> list[int]:
    """Register -> shared writes in each innermost scf.for body, in program order. Regions
    open on a line ending in '{' and close on a line starting with '}'."""
    stack, loops = [], []  # stack: [is_for, writes, has_inner_for]
    for line in ttgir.splitlines():
        s = line.strip()
        if s.startswith("}") and stack:
            is_for, writes, has_inner = stack.pop()
            if is_for and not has_inner:
                loops.append(writes)
        if stack and _STORE_TO_SHARED.search(s):
            stack[-1][1] += 1
        if s.endswith("{"):
            is_for = "scf.for" in s
            if is_for:
                for region in stack:
                    region[2] = True
            stack.append([is_for, 0, False])
    return loops


def probe(cap: int, head_dim: int, variant: str) -> list[dict]:
    (fwd, bwd), = resources.config_pairs(cap, head_dim)  # the table's entry
    launches = resources.call_launches(head_dim, "bf16", fwd, bwd, variant)
    target = GPUTarget("cuda", cap, 32)
    rows = []
    for name in BACKWARD_KERNELS:
        launch = launches[name]
        row = dict(cap=cap, head_dim=head_dim, variant=variant, kernel=name,
                   tile=[launch.kwargs["BLOCK_M"], launch.kwargs["BLOCK_N"], launch.kwargs["BLOCK_D"]],
                   **resources.compile_launch(launch, cap))
        src, options = resources.specialise(launch, make_backend(target))
        compiled = triton.compile(src, target=target, options=options)  # Triton's cache: compiled just above
        row["atomics"] = sorted(set(_ATOMIC.findall(compiled.asm["ptx"])))
        row["loop_shared_writes"] = loop_shared_writes(compiled.asm["ttgir"])
        rows.append(row)
    return rows


def main(argv: list[str]) -> None:
    rows = []
    for spec in argv:
        cap, head_dim, variant = spec.split(":")
        rows += probe(int(cap), int(head_dim), variant.replace("_", " "))
    print(json.dumps(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
