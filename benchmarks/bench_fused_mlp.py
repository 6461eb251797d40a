"""The connector MLP (Linear -> GELU -> Linear) at real projector shapes:
fastvlm's fused connector (Triton; recompute — the module's default — and
keep_preact, which keeps the pre-activation instead) vs eager nn.Sequential,
torch.compile of it, and torch._addmm_activation. Two rows compute tanh-GELU
instead of exact GELU and are shown for speed only: addmm_act (cuBLASLt's
epilogue via torch) and fastvlm_cublaslt (our cuBLASLt path, plain variant only).

    python benchmarks/bench_fused_mlp.py                 # one GPU, bf16, the default grid
    python benchmarks/bench_fused_mlp.py --full          # every shape x images x variant
    python benchmarks/bench_fused_mlp.py --only clip-l/336->4096 --no-compile
    python benchmarks/bench_fused_mlp.py --smoke         # CPU, tiny, seconds: NOT a speed test

Each case compiles (torch.compile) and autotunes (Triton) once, so the default
grid takes several minutes per projector; results are rewritten after every
case, so split long runs with --only / --images.

Shapes: CLIP-L/336 (1024) -> 4096 and -> 5120, SigLIP-so400m (1152) -> 3584, with
M = 576 x {8, 32, 64} images. Variants: plain; 4 encoder layers as multi-level
input (concat -> Linear; eager materialises the concat); 2x2 pixel shuffle and
2x2 average pooling (576 -> 144 tokens; eager materialises the reduced tokens).
The encoder is frozen (inputs need no grad), as in LLaVA stages 1 and 2.
Timings are CUDA-event medians; "kept" is the bytes autograd saves for backward
(saved-tensor hooks; parameters excluded, storages counted once).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # the Triton path runs under the interpreter on CPU; must precede any kernel import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from fastvlm.nn import FusedMLPConnector  # noqa: E402
from fastvlm.ops.token_reduction import reduce_tokens  # noqa: E402

from common import environment, markdown_table, median_time, print_header, save_results  # noqa: E402

TOKENS_PER_IMAGE = 576  # a 24x24 patch grid (CLIP-L/336); used for every projector, as issue 4 specifies
PROJECTORS = {"clip-l/336->4096": (1024, 4096), "clip-l/336->5120": (1024, 5120),
              "siglip-so400m->3584": (1152, 3584)}
IMAGES = (8, 32, 64)
VARIANTS = ("plain", "multilevel4", "pixel_shuffle", "avg_pool", "multilevel4+pixel_shuffle")
SMOKE_PROJECTORS = {"tiny": (16, 64)}  # K:N = 1:4 as CLIP-L -> 4096, so kept-byte ratios match


class EagerConnector(nn.Module):
    """What users run today: reduce / concat in torch, then nn.Sequential."""

    def __init__(self, seq: nn.Sequential, reduce: str | None):
        super().__init__()
        self.seq, self.reduce = seq, reduce

    def merged_input(self, xs):
        if self.reduce is not None:
            xs = [reduce_tokens(x, self.reduce) for x in xs]
        return xs[0] if len(xs) == 1 else torch.cat(xs, -1)

    def forward(self, xs):
        return self.seq(self.merged_input(xs))


class AddmmActivationConnector(EagerConnector):
    """torch._addmm_activation(use_gelu=True): bias + tanh-GELU in cuBLASLt's epilogue."""

    def forward(self, xs):
        x = self.merged_input(xs)
        flat = x.reshape(-1, x.shape[-1])
        h = torch._addmm_activation(self.seq[0].bias, flat, self.seq[0].weight.t(), use_gelu=True)
        out = torch.addmm(self.seq[2].bias, h, self.seq[2].weight.t())
        return out.view(*x.shape[:-1], out.shape[-1])


class FusedConnector(nn.Module):
    def __init__(self, fused: FusedMLPConnector):
        super().__init__()
        self.fused = fused

    def forward(self, xs):
        return self.fused(xs[0] if len(xs) == 1 else xs)


def variant_spec(variant: str):
    inputs = 4 if variant.startswith("multilevel4") else 1
    reduce = next((r for r in ("pixel_shuffle", "avg_pool") if r in variant), None)
    return inputs, reduce


def flops(images, tokens, k, n, inputs, reduce, input_grad):
    """GEMM flops of forward and of forward+backward (dgrad to the input only if asked)."""
    m = images * tokens // (4 if reduce else 1)
    k1 = k * inputs * (4 if reduce == "pixel_shuffle" else 1)
    fwd = 2 * m * (k1 * n + n * n)
    bwd = 2 * m * (2 * n * n + k1 * n) + (2 * m * k1 * n if input_grad else 0)
    return fwd, fwd + bwd


def kept_bytes(module, xs) -> int:
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    kept = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            kept[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(xs)
    del out
    return sum(kept.values())


def build(method, seq, fused_options, reduce):
    if method == "eager":
        return EagerConnector(seq, reduce)
    if method == "compile":
        return torch.compile(EagerConnector(seq, reduce))
    if method == "addmm_act":
        return AddmmActivationConnector(seq, reduce)
    fused = FusedMLPConnector.from_sequential(seq, reduce=reduce, **fused_options)
    if method == "fastvlm_cublaslt":
        fused.activation = "gelu_tanh"
    return FusedConnector(fused)


def methods(args):
    names = ["eager"]
    if not args.no_compile and not args.smoke:
        names.append("compile")
    if args.device == "cuda":
        names.append("addmm_act")
    names += ["fastvlm", "fastvlm_keep_preact"]
    return names + (["fastvlm_cublaslt"] if args.device == "cuda" else [])


def one_case(args, name, k, n, images, variant):
    inputs, reduce = variant_spec(variant)
    dev, dtype = args.device, args.dtype
    gen = torch.Generator().manual_seed(0)
    k1 = k * inputs * (4 if reduce == "pixel_shuffle" else 1)
    seq = nn.Sequential(nn.Linear(k1, n), nn.GELU(), nn.Linear(n, n)).to(dev, dtype)
    xs = [torch.randn(images, args.tokens, k, generator=gen).to(dev, dtype).requires_grad_(args.input_grad)
          for _ in range(inputs)]
    grad = torch.randn(images, args.tokens // (4 if reduce else 1), n, generator=gen).to(dev, dtype)
    fwd_flops, total_flops = flops(images, args.tokens, k, n, inputs, reduce, args.input_grad)
    row = {"projector": name, "K": k, "N": n, "images": images, "M": images * args.tokens,
           "variant": variant, "dtype": str(dtype).replace("torch.", "")}
    for method in methods(args):
        if method == "fastvlm_cublaslt" and variant != "plain":
            continue
        backend = {"fastvlm_cublaslt": "cublaslt", "fastvlm": "triton", "fastvlm_keep_preact": "triton"}.get(method)
        options = {"backend": backend, "recompute": method != "fastvlm_keep_preact"}
        module = build(method, seq, options, reduce)

        def fwd():
            with torch.no_grad():
                module(xs)

        def fwd_bwd():
            module(xs).backward(grad)

        try:
            t_fwd = median_time(fwd, args.repeats, args.warmup, dev)
            t_all = median_time(fwd_bwd, args.repeats, args.warmup, dev)
        except Exception as exc:  # a baseline that cannot run this case is reported, not fatal
            row[method] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
            continue
        try:
            kept = kept_bytes(module, xs)
        except Exception:  # saved-tensor hooks unsupported by this path
            kept = None
        for p in seq.parameters():
            p.grad = None
        row[method] = {"fwd_ms": t_fwd * 1e3, "fwd_bwd_ms": t_all * 1e3, "kept_bytes": kept,
                       "fwd_tflops": fwd_flops / t_fwd / 1e12, "fwd_bwd_tflops": total_flops / t_all / 1e12}
    eager = row["eager"]
    for method in methods(args)[1:]:
        r = row.get(method, {})
        if "fwd_ms" in r and "fwd_ms" in eager:
            r["speedup_fwd_bwd_vs_eager"] = eager["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            if r["kept_bytes"] is not None and eager["kept_bytes"]:
                r["kept_vs_eager"] = r["kept_bytes"] / eager["kept_bytes"]
            if "fwd_ms" in row.get("compile", {}):
                r["speedup_fwd_bwd_vs_compile"] = row["compile"]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    return row


def cases(args):
    projectors = SMOKE_PROJECTORS if args.smoke else PROJECTORS
    images = (2,) if args.smoke else tuple(args.images or IMAGES)
    for name, (k, n) in projectors.items():
        if args.only and name not in args.only:
            continue
        for img in images:
            for variant in VARIANTS:
                # default grid: every size plain; the variants at the middle size
                if args.full or args.smoke or variant == "plain" or img == images[len(images) // 2]:
                    yield name, k, n, img, variant


def fmt(r, key, digits=2):
    return "—" if key not in r or r[key] is None else f"{r[key]:.{digits}f}"


def table(rows, names):
    headers = ["projector", "images", "variant", "method", "fwd ms", "fwd+bwd ms", "fwd+bwd TFLOP/s",
               "kept MiB", "x eager", "x compile", "kept / eager"]
    body = []
    for row in rows:
        for m in names:
            if m not in row:  # not run for this variant
                continue
            r = row[m]
            if "error" in r:
                body.append([row["projector"], row["images"], row["variant"], m, r["error"], *[""] * 6])
                continue
            body.append([row["projector"], row["images"], row["variant"], m, fmt(r, "fwd_ms", 3),
                         fmt(r, "fwd_bwd_ms", 3), fmt(r, "fwd_bwd_tflops", 1),
                         "—" if r.get("kept_bytes") is None else f"{r['kept_bytes'] / 2**20:.1f}",
                         fmt(r, "speedup_fwd_bwd_vs_eager"), fmt(r, "speedup_fwd_bwd_vs_compile"),
                         fmt(r, "kept_vs_eager")])
    return markdown_table(headers, body)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton interpreter: not a speed test")
    p.add_argument("--full", action="store_true", help="every variant at every image count")
    p.add_argument("--only", nargs="*", help=f"projector names, from {list(PROJECTORS)}")
    p.add_argument("--images", nargs="*", type=int, help=f"images per batch (default {IMAGES})")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--input-grad", action="store_true", help="also compute the input gradient (unfrozen encoder)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/)")
    args = p.parse_args()
    if args.smoke:
        args.device, args.dtype, args.tokens, args.repeats, args.warmup = "cpu", torch.float32, 16, 1, 0
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA GPU (use --smoke for the CPU plumbing check)")
        args.device, args.dtype, args.tokens = "cuda", getattr(torch, args.dtype), TOKENS_PER_IMAGE
    env = environment(args.device)
    print_header("connector MLP: fused vs eager / torch.compile / _addmm_activation", env)
    if args.smoke:
        print("SMOKE MODE: CPU, tiny shapes, Triton interpreter. This checks the plumbing; it is NOT a speed test.")
    rows, name = [], "bench_fused_mlp" + ("_smoke" if args.smoke else "")
    for case in cases(args):
        rows.append(one_case(args, *case))
        print("\n".join(table(rows[-1:], methods(args)).splitlines()[2:]), flush=True)  # progress
        payload = {"env": env, "smoke": args.smoke, "tokens_per_image": args.tokens,
                   "input_grad": args.input_grad, "rows": rows}
        # rewritten after every case, so a run cut short still leaves its results
        out = save_results(name, env, payload, table(rows, methods(args)), args.out)
        args.out = out
    print(f"\n{table(rows, methods(args))}")


if __name__ == "__main__":
    main()
