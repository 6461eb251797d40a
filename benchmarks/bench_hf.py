"""A transformers training step with and without ``fastvlm.integrations.transformers.patch``.

The same LLaVA-1.5-shaped ``LlavaForConditionalGeneration`` (random weights; the
7B shape on GPU, small shapes on CPU), PEFT LoRA on every LLM projection and the
projector trained, HF gradient checkpointing on, in every variant:

- ``hf``: unpatched, sdpa attention, padded micro-batches (the baseline);
- ``hf+patch``: the one-line change, ``patch(model)``, same padded micro-batches;
- ``hf+patch packed``: patched, the samples packed into rows of ``--budget``
  tokens (``position_ids`` restarting per sample, ``segment_ids`` given), which
  only the patched model keeps apart;
- with ``--qlora`` the three again on NF4 bases (bitsandbytes 4-bit).

Reported per variant: median step time, tokens/s (real tokens), peak memory
(CUDA allocator on GPU; on CPU the RSS growth of a fresh process per variant),
the loss (all variants of one base must agree: same weights, same tokens) and
ratios to the baseline of the same base, all from the same run.

    python benchmarks/bench_hf.py --quick          # CPU, small shapes
    python benchmarks/bench_hf.py --qlora          # GPU: LLaVA-1.5-7B shapes, bf16
    python benchmarks/bench_hf.py --smoke          # seconds; what the test runs
"""
from __future__ import annotations

import sys

import torch
from bench_train import LLM_TARGETS, build_hf, make_samples, packed_batch, padded_batches, write_checkpoint

from common import markdown_table, median_time, peak_memory, results_path, run_training_benchmark, save_results

VARIANTS = ("hf", "hf+patch", "hf+patch packed")
# transformers 5.23 matches skip patterns from the module path's start (or as a suffix)
KEEP_UNQUANTIZED = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


def build_qlora(path, device, dtype, r: int):
    """build_hf's model on an NF4 base, with the skip patterns 5.23 needs."""
    import transformers
    from peft import LoraConfig, get_peft_model

    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
                                            llm_int8_skip_modules=KEEP_UNQUANTIZED)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(
        path, attn_implementation="sdpa", dtype=dtype, quantization_config=quant).to(device).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = rf".*language_model.*\.({'|'.join(LLM_TARGETS)})"
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                             modules_to_save=["multi_modal_projector"]))
    return model


def positions_from_segments(seg: torch.Tensor) -> torch.Tensor:
    """Per-sample positions 0, 1, ... of a packed row (padding gets 0)."""
    idx = torch.arange(seg.shape[1], device=seg.device).expand_as(seg)
    start = (seg >= 0) & (seg != torch.nn.functional.pad(seg, (1, 0), value=-2)[:, :-1])
    first = torch.where(start, idx, 0).cummax(1).values
    return torch.where(seg >= 0, idx - first, 0)


def supervised_packed(labels, seg) -> int:
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] >= 0)
    return int(((labels[:, 1:] != -100) & same).sum())


def packed_labels(labels, seg):
    """A packed row's labels with each sample's first token unsupervised, so no loss term
    crosses from one sample into the next (the padded batches have none either)."""
    start = torch.nn.functional.pad(seg[:, 1:] != seg[:, :-1], (1, 0), value=True)
    return torch.where(start, -100, labels)


def micro_batches(samples, pixels, packed: bool, budget: int, hf_batch: int, device):
    """[(model kwargs, supervised next-token targets)]: padded micro-batches, or packed rows."""
    if not packed:
        return [(dict(input_ids=ids, attention_mask=mask, pixel_values=imgs, labels=labels),
                 int((labels[:, 1:] != -100).sum()))
                for ids, labels, mask, imgs in padded_batches(samples, pixels, hf_batch, device)]
    out = []
    for ids, labels, seg, imgs in packed_batch(samples, pixels, budget, device):
        labels = packed_labels(labels, seg)
        out.append((dict(input_ids=ids, attention_mask=(seg >= 0).long(), segment_ids=seg, labels=labels,
                         position_ids=positions_from_segments(seg), pixel_values=imgs),
                    supervised_packed(labels, seg)))
    return out


def one_case(shape, variant, path, device, repeats, budget, hf_batch, r, seed):
    from fastvlm.integrations.transformers import patch

    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    samples, pixels = make_samples(shape, seed)
    model = build_qlora(path, device, dtype, r) if variant.endswith("qlora") else build_hf(path, device, dtype,
                                                                                          False, r)[0]
    if "patch" in variant:
        patch(model)
    batches = micro_batches(samples, pixels, "packed" in variant, budget, hf_batch, device)
    total = sum(n for _, n in batches)
    losses = []

    def run():
        loss_sum = 0.0
        for inputs, n in batches:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = model(**dict(inputs, pixel_values=inputs["pixel_values"].to(dtype))).loss
            (loss * n / total).backward()  # the global token mean, as one batch of all samples
            loss_sum += float(loss) * n / total
        losses.append(loss_sum)
        model.zero_grad(set_to_none=True)

    peak = peak_memory(run, device.type)  # the first step: memory high-water mark and warm-up
    secs = median_time(run, repeats, warmup=0, device=device.type)
    tokens = sum(len(s["ids"]) for s in samples)
    return {"variant": variant, "seconds": secs, "tokens": tokens, "supervised_tokens": total,
            "row_tokens": sum(b["input_ids"].numel() for b, _ in batches), "tokens_per_s": tokens / secs,
            "peak_bytes": peak, "loss": losses[0]}


def main(argv=None):
    args, settings, env, rows = run_training_benchmark(
        argv, __doc__, "bench_hf", __file__,
        lambda qlora: VARIANTS + (tuple(f"{v} qlora" for v in VARIANTS) if qlora else ()),
        one_case, write_checkpoint, lambda v: "hf qlora" if v.endswith("qlora") else "hf")
    if rows is None:
        return
    device, shape, budget = settings["device"], settings["shape"], settings["budget"]
    table = markdown_table(
        ["variant", "s/step", "tokens/s", "row tokens", "step peak GiB", "tokens/s ratio", "memory ratio", "loss",
         "loss gap"],
        [[r["variant"], f"{r['seconds']:.3f}", f"{r['tokens_per_s']:.0f}", r["row_tokens"],
          f"{r['peak_bytes'] / 2**30:.3f}", f"{r['speedup']:.2f}x", f"{r['memory_ratio']:.2f}x", f"{r['loss']:.4f}",
          f"{r['loss_gap']:.1e}"] for r in rows])
    note = (f"{len(make_samples(shape, args.seed)[0])} samples, {rows[0]['tokens']} real tokens; padded micro-batches "
            f"of {args.hf_batch}, packed rows of {budget}; LoRA r {args.rank} + projector trained, HF gradient "
            "checkpointing on in every variant; step peak = " +
            ("CUDA allocator peak over the loaded model" if device == "cuda" else
             "RSS high-water growth in a fresh process per variant (CPU: allocator noise at small shapes)"))
    print(table + "\n\n" + note)
    if args.smoke and args.out is None:
        return
    out = results_path(args.out, f"bench_hf_{shape}", env)
    headline = [[f"{r['variant']} ({shape}): tokens/s, memory vs unpatched",
                 f"{r['speedup']:.2f}x, {r['memory_ratio']:.2f}x", r["speedup"]]
                for r in rows if "patch" in r["variant"]]
    save_results(f"bench_hf_{shape}", env, {"env": env, "args": vars(args) | {"out": str(args.out)}, "rows": rows,
                                           "note": note, "headline": headline}, table + "\n\n" + note, out)


if __name__ == "__main__":
    sys.exit(main())
