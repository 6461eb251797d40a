"""A LoRA training step end to end: fastvlm against the stack users run today, on the
same model, the same samples, in the same run.

- ``hf+peft``: transformers' LlavaForConditionalGeneration with PEFT LoRA on every
  LLM projection and the projector trained (modules_to_save), sdpa attention with
  the padding mask, HF gradient checkpointing, padded micro-batches as LLaVA's
  trainer makes them (``--hf-batch`` samples each, right-padded to the longest);
- ``fastvlm``: ``fastvlm.VLM`` loaded from the same checkpoint, the same LoRA,
  the samples packed into rows of ``--budget`` tokens (fused attention on the
  packed layout, fused connector, fused LM-head loss), selective checkpointing;
- with ``--qlora``, both again on NF4 bases (bitsandbytes 4-bit in transformers,
  ``apply_qlora`` in fastvlm).

Both run the frozen vision tower of LLaVA's stage 2. Reported per variant: median
step time (forward + backward over all samples), tokens/s over all real tokens
and over supervised tokens, peak memory (CUDA allocator on GPU; on CPU the peak
RSS of a fresh process per variant, weights included), the loss (the two must
agree: same weights, same tokens), and ratios to the baseline.

    python benchmarks/bench_train.py --quick     # CPU, small shapes (minutes)
    python benchmarks/bench_train.py             # GPU: LLaVA-1.5-7B shapes, bf16
    python benchmarks/bench_train.py --smoke     # seconds; what the tests run

``--hf qwen2.5-vl | gemma3``: the same step on a Hugging Face VLM (tiny processor, random
weights of the shape): fastvlm (patched, packed) vs TRL's SFTTrainer vs a plain
transformers + PEFT loop; see benchmarks/hf_sft.py.

    python benchmarks/bench_train.py --hf qwen2.5-vl --quick   # CPU
    python benchmarks/bench_train.py --hf qwen2.5-vl           # GPU: Qwen2.5-VL-7B shapes (gemma3: 4B)
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

from common import markdown_table, median_time, peak_memory, results_path, run_training_benchmark, save_results

LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# name -> (vision config kwargs, text config kwargs, samples, answer length range)
SHAPES = {
    "7b": (dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16),
           dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, max_position_embeddings=4096), 16, (40, 600)),
    "quick": (dict(image_size=112, patch_size=14, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                   num_attention_heads=4),
              dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096), 8, (20, 400)),
    "smoke": (dict(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2),
              dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024), 6, (4, 40)),
}
VARIANTS = ("hf+peft", "fastvlm")
QLORA_VARIANTS = ("hf+peft qlora", "fastvlm qlora")


def image_tokens(vision: dict) -> int:
    return (vision["image_size"] // vision["patch_size"]) ** 2


def write_checkpoint(shape: str, path: Path, seed: int) -> None:
    """A random-weight transformers LLaVA of the shape, saved where each variant loads it."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision, text, _, _ = SHAPES[shape]
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**vision, projection_dim=vision["hidden_size"]),
                      text_config=LlamaConfig(**text), image_token_index=text["vocab_size"] - 1,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=image_tokens(vision), projector_hidden_act="gelu")
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(cfg).save_pretrained(path)


def make_samples(shape: str, seed: int) -> list[dict]:
    """LLaVA-mix-like samples: a prompt, 1-2 images, an answer (the supervised part)."""
    vision, text, count, (a_lo, a_hi) = SHAPES[shape]
    rng = random.Random(seed)
    image_id, per_image = text["vocab_size"] - 1, image_tokens(vision)
    samples = []
    for _ in range(count):
        prompt = [rng.randrange(1, image_id) for _ in range(rng.randint(8, 60))]
        images = rng.randint(1, 2)
        answer = [rng.randrange(1, image_id) for _ in range(rng.randint(a_lo, a_hi))]
        ids = prompt[:2]
        for k in range(images):  # "<image>\n" per image, as LLaVA's multi-image prompts put them
            ids += [image_id] * per_image + [prompt[2 + k]]
        ids += prompt[2 + images:] + answer
        labels = [-100] * (len(ids) - len(answer)) + answer
        samples.append({"ids": ids, "labels": labels, "images": images})
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(sum(s["images"] for s in samples), 3, vision["image_size"], vision["image_size"], generator=g)
    return samples, pixels


def pack_rows(samples: list[dict], budget: int) -> list[list[int]]:
    """First-fit decreasing by length: the rows the fastvlm variant trains on."""
    rows, room = [], []
    for i in sorted(range(len(samples)), key=lambda i: -len(samples[i]["ids"])):
        n = len(samples[i]["ids"])
        if n > budget:
            raise ValueError(f"--budget: sample of {n} tokens does not fit rows of {budget}")
        slot = next((r for r, left in enumerate(room) if left >= n), None)
        if slot is None:
            rows.append([]), room.append(budget)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= n
    return rows


def image_slices(samples):
    starts, pos = [], 0
    for s in samples:
        starts.append(pos)
        pos += s["images"]
    return starts


def packed_batch(samples, pixels, budget, device):
    rows = pack_rows(samples, budget)
    starts = image_slices(samples)
    ids = torch.zeros(len(rows), budget, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    seg = torch.full((len(rows), budget), -1, dtype=torch.int32)
    order = []
    for r, members in enumerate(rows):
        pos = 0
        for s, i in enumerate(members):
            n = len(samples[i]["ids"])
            ids[r, pos:pos + n] = torch.tensor(samples[i]["ids"])
            labels[r, pos:pos + n] = torch.tensor(samples[i]["labels"])
            seg[r, pos:pos + n] = s
            order += range(starts[i], starts[i] + samples[i]["images"])
            pos += n
    return [(ids.to(device), labels.to(device), seg.to(device), pixels[order].to(device))]


def padded_batches(samples, pixels, batch, device):
    """LLaVA's trainer: micro-batches in dataset order, right-padded to the longest."""
    starts, out = image_slices(samples), []
    for b in range(0, len(samples), batch):
        members = range(b, min(b + batch, len(samples)))
        longest = max(len(samples[i]["ids"]) for i in members)
        ids = torch.zeros(len(members), longest, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(members):
            n = len(samples[i]["ids"])
            ids[r, :n], labels[r, :n], mask[r, :n] = (torch.tensor(samples[i]["ids"]),
                                                      torch.tensor(samples[i]["labels"]), 1)
        imgs = pixels[starts[members[0]]:starts[members[-1]] + samples[members[-1]]["images"]]
        out.append((ids.to(device), labels.to(device), mask.to(device), imgs.to(device)))
    return out


def supervised(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != -100).sum())  # next-token targets


def build_hf(path, device, dtype, qlora: bool, r: int):
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    kw = {"attn_implementation": "sdpa", "dtype": dtype}
    if qlora:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
                                                       # transformers 5.23 matches these from the module
                                                       # path's start: "vision_tower" alone would not skip it
                                                       llm_int8_skip_modules=["model.vision_tower",
                                                                              "model.multi_modal_projector",
                                                                              "lm_head"])
    model = LlavaForConditionalGeneration.from_pretrained(path, **kw).to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=rf".*language_model.*\.({'|'.join(LLM_TARGETS)})",
                      modules_to_save=["multi_modal_projector"])
    model = get_peft_model(model, lora)

    def step(batches, total_sup):
        loss_sum = 0.0
        for ids, labels, mask, imgs in batches:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = model(input_ids=ids, attention_mask=mask, pixel_values=imgs.to(dtype), labels=labels).loss
            weight = supervised(labels) / total_sup  # the global token mean, as one batch of all samples
            (loss * weight).backward()
            loss_sum += float(loss) * weight
        return loss_sum

    return model, step


def build_fastvlm(path, device, dtype, qlora: bool, r: int):
    from fastvlm.models.vlm import VLM
    from fastvlm.train.lora import apply_lora
    from fastvlm.train.quant import apply_qlora

    model = VLM.from_pretrained(path).to(device)
    model.vision_tower.freeze(dtype if device.type == "cuda" else None)
    targets = rf"language_model\..*\.({'|'.join(LLM_TARGETS)})"
    if qlora:
        apply_qlora(model, targets, r=r, alpha=2 * r, trainable="multi_modal_projector",
                    compute_dtype={torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32"))
    else:
        apply_lora(model, targets, r=r, alpha=2 * r, trainable="multi_modal_projector")
    model.language_model.set_checkpointing("selective")

    def step(batches, total_sup):
        loss_sum = 0.0
        for ids, labels, seg, imgs in batches:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = model(ids, imgs, labels, segment_ids=seg)
            (loss * (supervised_packed(labels, seg) / total_sup)).backward()
            loss_sum += float(loss) * supervised_packed(labels, seg) / total_sup
        return loss_sum

    return model, step


def supervised_packed(labels, seg) -> int:
    """Next-token targets of packed rows: a label counts when the token before it is in its segment."""
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] >= 0)
    return int(((labels[:, 1:] != -100) & same).sum())


def one_case(shape, variant, path, device, repeats, budget, hf_batch, r, seed):
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    samples, pixels = make_samples(shape, seed)
    qlora = variant.endswith("qlora")
    if variant.startswith("hf"):
        model, step = build_hf(path, device, dtype, qlora, r)
        batches = padded_batches(samples, pixels, hf_batch, device)
        row_tokens = sum(b[0].numel() for b in batches)
    else:
        model, step = build_fastvlm(path, device, dtype, qlora, r)
        batches = packed_batch(samples, pixels, budget, device)
        row_tokens = sum(b[0].numel() for b in batches)
    total_sup = sum(sum(x != -100 for x in s["labels"][1:]) for s in samples)
    losses = []

    def run():
        losses.append(step(batches, total_sup))
        model.zero_grad(set_to_none=True)

    # the first step is the memory measurement (a process high-water mark on CPU) and the warm-up
    peak = peak_memory(run, device.type)
    secs = median_time(run, repeats, warmup=0, device=device.type)
    tokens = sum(len(s["ids"]) for s in samples)
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if device.type == "cpu" else None
    return {"variant": variant, "process_peak_rss": rss, "seconds": secs, "tokens": tokens,
            "supervised_tokens": total_sup,
            "row_tokens": row_tokens, "tokens_per_s": tokens / secs, "supervised_tokens_per_s": total_sup / secs,
            "peak_bytes": peak, "loss": losses[0], "loss_spread": max(losses) - min(losses)}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--hf" or a.startswith("--hf=") for a in argv):
        # imported for --hf only: hf_sft pulls in PEFT and transformers' Trainer (~6 s of CPU per
        # process), which the parent and the fastvlm variant of the LLaVA benchmark never use
        import hf_sft

        return hf_sft.main(argv, __doc__, __file__)
    args, settings, env, rows = run_training_benchmark(
        argv, __doc__, "bench_train", __file__,
        lambda qlora: VARIANTS + (QLORA_VARIANTS if qlora else ()),
        one_case, write_checkpoint, lambda v: "hf+peft qlora" if v.endswith("qlora") else "hf+peft")
    if rows is None:
        return
    device, shape, budget = settings["device"], settings["shape"], settings["budget"]
    table = markdown_table(
        ["variant", "s/step", "tokens/s", "supervised tok/s", "row tokens", "step peak GiB", "process RSS GiB",
         "speedup", "memory", "loss", "loss gap"],
        [[r["variant"], f"{r['seconds']:.3f}", f"{r['tokens_per_s']:.0f}", f"{r['supervised_tokens_per_s']:.0f}",
          r["row_tokens"], f"{r['peak_bytes'] / 2**30:.2f}",
          "-" if r["process_peak_rss"] is None else f"{r['process_peak_rss'] / 2**30:.2f}",
          f"{r['speedup']:.2f}x", f"{r['memory_ratio']:.2f}x",
          f"{r['loss']:.4f}", f"{r['loss_gap']:.1e}"] for r in rows])
    note = (f"{len(make_samples(shape, args.seed)[0])} samples, {rows[0]['tokens']} real tokens "
            f"({rows[0]['supervised_tokens']} supervised); baseline micro-batches of {args.hf_batch} padded, "
            f"fastvlm rows of {budget} (row tokens; its training forward drops their padding and runs the real "
            f"tokens only); step peak = what one training step adds at its peak over the loaded "
            "model (" + ("CUDA allocator)" if device == "cuda" else
                         "RSS high-water growth in a fresh process per variant); process RSS = that process's "
                         "whole peak, imports and weights included"))
    print(table + "\n\n" + note)
    if args.smoke and args.out is None:
        return
    out = results_path(args.out, f"bench_train_{shape}", env)
    save_results(f"bench_train_{shape}", env, {"env": env, "args": vars(args) | {"out": str(args.out)},
                                              "rows": rows, "note": note}, table + "\n\n" + note, out)


if __name__ == "__main__":
    sys.exit(main())
