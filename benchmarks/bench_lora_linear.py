"""LoRA linear layer: fastvlm's fused Triton kernel vs PEFT's LoRA layer vs our reference.

Each layer computes base(x) + s·B(A(x)) with a frozen bf16 base and fp32 adapters
under bf16 autocast (the mixed-precision LoRA training setup); the plain frozen
nn.Linear is timed as the floor. Forward (no grad) and forward+backward (grads
for x, A, B) are timed separately; outputs are checked against each other first.

    python benchmarks/bench_lora_linear.py            # GPU, LLaVA-7B-like shapes
    python benchmarks/bench_lora_linear.py --smoke    # CPU, tiny shape, Triton interpreter, fp32
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the interpreter must be on before Triton kernels load
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastvlm.nn.lora import LoRALinear

from common import environment, print_header, save_results

# (tokens, in, out, r): attention and MLP projections of a 7B LLM, a ViT-L block
GPU_SHAPES = [(8192, 4096, 4096, 16), (8192, 4096, 4096, 64), (8192, 4096, 11008, 16),
              (8192, 11008, 4096, 16), (4096, 1024, 4096, 16)]
SMOKE_SHAPES = [(40, 48, 36, 8)]


def peft_layer(base: torch.nn.Linear, r: int, alpha: float, ours: LoRALinear) -> torch.nn.Module:
    """PEFT's lora.Linear around the same base, with our adapter weights copied in."""
    from peft import LoraConfig, inject_adapter_in_model

    holder = torch.nn.Module()
    holder.proj = base
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"]), holder)
    with torch.no_grad():
        holder.proj.lora_A["default"].weight.copy_(ours.lora_A)
        holder.proj.lora_B["default"].weight.copy_(ours.lora_B)
    return holder.proj


def timer(fn, device: str, reps: int) -> float:
    """Median milliseconds per call."""
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, rep=max(50, reps), return_mode="median")
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def case(tokens: int, k: int, n: int, r: int, device: str, dtype: torch.dtype, reps: int) -> list[dict]:
    torch.manual_seed(0)
    base = torch.nn.Linear(k, n, bias=False, device=device).to(dtype).requires_grad_(False)
    ours = LoRALinear(base, r=r, alpha=2 * r, backend="triton")
    torch.nn.init.normal_(ours.lora_B, std=0.02)
    layers = {"linear (floor)": base, "fastvlm triton": ours,
              "fastvlm reference": LoRALinear(base, r=r, alpha=2 * r, backend="reference"),
              "peft": peft_layer(base, r, 2 * r, ours)}
    layers["fastvlm reference"].load_state_dict(ours.state_dict())
    x = torch.randn(tokens, k, device=device, dtype=dtype)
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)

    with torch.no_grad(), autocast:
        want = layers["peft"](x).double()
        for name in ("fastvlm triton", "fastvlm reference"):
            err = ((layers[name](x).double() - want).abs().max() / want.abs().max()).item()
            if err > (1e-4 if dtype == torch.float32 else 2e-2):
                raise AssertionError(f"{name} disagrees with peft: max rel err {err:.3g}")

    rows = []
    xg = x.clone().requires_grad_()
    for name, layer in layers.items():
        def fwd():
            with torch.no_grad(), autocast:
                layer(x)

        def fwd_bwd():
            with autocast:
                y = layer(xg)
            y.backward(torch.ones_like(y))
        rows.append({"shape": [tokens, k, n, r], "impl": name, "dtype": str(dtype).split(".")[-1],
                     "fwd_ms": timer(fwd, device, reps), "fwd_bwd_ms": timer(fwd_bwd, device, reps)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| tokens x in -> out, r | impl | fwd ms | fwd+bwd ms |", "|---|---|---|---|"]
    for row in rows:
        t, k, n, r = row["shape"]
        lines.append(f"| {t} x {k} -> {n}, r={r} | {row['impl']} | {row['fwd_ms']:.3f} | {row['fwd_bwd_ms']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shape, Triton interpreter, fp32")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = ap.parse_args(argv)
    if args.smoke:
        device, dtype, shapes, reps = "cpu", torch.float32, SMOKE_SHAPES, min(args.reps, 3)
    elif torch.cuda.is_available():
        device, dtype, shapes, reps = "cuda", torch.bfloat16, GPU_SHAPES, args.reps
    else:
        ap.error("needs a CUDA GPU; use --smoke on CPU")
    env = environment(device)
    print_header("fused LoRA linear vs PEFT (bench_lora_linear.py)" + (" -- SMOKE, interpreter: not a speed test"
                                                               if args.smoke else ""), env)
    rows = [row for shape in shapes for row in case(*shape, device, dtype, reps)]
    table = markdown(rows)
    print(table)
    if args.out or not args.smoke:
        payload = {"benchmark": "bench_lora_linear", "env": env, "rows": rows}
        save_results("bench_lora_linear", env, payload, table, args.out)
    return rows


if __name__ == "__main__":
    main()
