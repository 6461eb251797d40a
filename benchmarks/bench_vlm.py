"""One training step (forward + backward) of a VLM: tokens/s and peak memory, with
fastvlm's pieces against what users run today, in the same run on the same batch:

- ``fastvlm``: multimodal_attention on the batch's layout + the fused LM-head loss;
- ``naive head``: the same, but the loss through full fp32 logits;
- ``dense-mask SDPA``: the same, but attention as SDPA with the dense [B, N, N] mask.

    python benchmarks/bench_vlm.py --device cuda       # LLaVA-1.5-7B shapes, random weights, bf16
    python benchmarks/bench_vlm.py                     # CPU: a small VLM, fp32
    python benchmarks/bench_vlm.py --smoke             # seconds; what the tests run

Batches are packed rows of LLaVA-1.5 samples (text, one 576-token image, text),
with the `--kind` layout (default mmca). Weights are random; all of them train.
"""
from __future__ import annotations

import argparse
import contextlib
import random
from pathlib import Path

import torch
import torch.nn.functional as F

import fastvlm.models.llm as llm_module
from fastvlm.models.llm import LLMConfig, shift_labels
from fastvlm.models.vision import CLIP_L14_336, VisionConfig
from fastvlm.models.vlm import VLM, VLMConfig
from fastvlm.ops import KINDS
from fastvlm.ops.linear_cross_entropy import linear_cross_entropy

from common import environment, markdown_table, median_time, peak_memory, print_header, run_isolated, save_results

SHAPES = {
    "llava-1.5-7b": dict(vision=VisionConfig.clip(**CLIP_L14_336),
                         llm=dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                  num_attention_heads=32, max_position_embeddings=4096)),
    "small": dict(vision=VisionConfig.clip(image_size=112, patch_size=14, hidden_size=128, num_layers=4, num_heads=4,
                                           intermediate_size=512),
                  llm=dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)),
    "smoke": dict(vision=VisionConfig.clip(image_size=28, patch_size=14, hidden_size=32, num_layers=2, num_heads=2,
                                           intermediate_size=64),
                  llm=dict(vocab_size=2000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=512)),
}
VARIANTS = ("fastvlm", "naive head", "dense-mask SDPA")


def make_batch(model: VLM, rows: int, seq_len: int, seed: int):
    """Packed rows of (text, image, text) samples; labels on the answer text only."""
    rng = random.Random(seed)
    cfg = model.config
    image_token = cfg.image_token_id
    image_tokens = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    ids = torch.zeros(rows, seq_len, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    seg = torch.full((rows, seq_len), -1, dtype=torch.int32)
    images = 0
    for r in range(rows):
        pos, s = 0, 0
        while pos + image_tokens + 8 <= seq_len:
            q, a = rng.randint(4, 40), rng.randint(8, 200)
            length = min(q + image_tokens + a, seq_len - pos)
            ids[r, pos:pos + length] = torch.randint(0, image_token, (length,))
            ids[r, pos + q:pos + q + image_tokens] = image_token
            labels[r, pos + q + image_tokens:pos + length] = ids[r, pos + q + image_tokens:pos + length]
            seg[r, pos:pos + length] = s
            pos, s, images = pos + length, s + 1, images + 1
    pixels = torch.randn(images, 3, cfg.vision.image_size, cfg.vision.image_size)
    return ids, labels, seg, pixels


@contextlib.contextmanager
def dense_mask_attention():
    """The usual baseline: SDPA with the dense boolean mask of the layout (padding
    rows get their own diagonal so that SDPA returns no NaN)."""
    original = llm_module.multimodal_attention

    def sdpa(q, k, v, layout):
        mask = layout.dense() | torch.diag_embed(layout.segment_ids < 0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=k.shape[1] != q.shape[1])

    llm_module.multimodal_attention = sdpa
    try:
        yield
    finally:
        llm_module.multimodal_attention = original


def step_fn(model: VLM, batch, variant: str, dtype):
    ids, labels, seg, pixels = batch

    def step():
        with torch.autocast(ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
            layout = model.layout(ids, segment_ids=seg)
            h = model.language_model.hidden_states(inputs_embeds=model.embed(ids, pixels), layout=layout)
            backend = "reference" if variant == "naive head" else "auto"
            loss = linear_cross_entropy(h[:, :-1], model.language_model.lm_head, shift_labels(labels, seg),
                                        backend=backend)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def one_case(shape, variant, rows, seq_len, kind, device, repeats, seed=0):
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    s = SHAPES[shape]
    llm = LLMConfig.from_dict(s["llm"])
    cfg = VLMConfig(vision=s["vision"], llm=llm, image_token_id=llm.vocab_size - 1, attention_kind=kind)
    model = VLM(cfg).to(device)
    batch = tuple(t.to(device) for t in make_batch(model, rows, seq_len, seed))
    step = step_fn(model, batch, variant, dtype)
    with dense_mask_attention() if variant == "dense-mask SDPA" else contextlib.nullcontext():
        # The first step is measured for memory: on CPU the peak is a process high-water
        # mark, which a warm-up step would already have raised. It also warms up the timing.
        peak = peak_memory(step, device)
        secs = median_time(step, repeats, warmup=0, device=device)
    tokens = int((batch[2] >= 0).sum())
    return {"variant": variant, "peak_bytes": peak, "seconds": secs, "tokens": tokens,
            "tokens_per_s": tokens / secs, "images": int(batch[3].shape[0])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", choices=list(SHAPES), default=None, help="default: llava-1.5-7b on cuda, small on cpu")
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--kind", choices=KINDS, default="mmca")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: one variant in a fresh process
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    shape = "smoke" if args.smoke else (args.shape or ("llava-1.5-7b" if gpu else "small"))
    rows = args.rows or (1 if args.smoke else 2)
    seq_len = args.seq_len or {"smoke": 64, "small": 1024, "llava-1.5-7b": 4096}[shape]
    repeats = 1 if args.smoke else args.repeats
    if args.case:
        import json

        print(json.dumps(one_case(shape, args.case, rows, seq_len, args.kind, "cpu", repeats)))
        return None
    env = environment(args.device)
    print_header("VLM training step (bench_vlm.py)", env)
    results = []
    for variant in VARIANTS:
        if gpu:
            res = one_case(shape, variant, rows, seq_len, args.kind, "cuda", repeats)
        else:
            res = run_isolated(__file__, ["--case", variant, "--rows", str(rows), "--seq-len", str(seq_len),
                                          "--kind", args.kind, "--repeats", str(repeats)]
                               + (["--smoke"] if args.smoke else ["--shape", shape]))
        results.append(res)
        print(f"  {variant:16s} {res['tokens_per_s']:10.0f} tokens/s  peak {res['peak_bytes'] / 2**20:9.1f} MiB",
              flush=True)
    base = results[0]
    md = markdown_table(
        ["variant", "tokens/s", "step ms", "peak MiB", "fastvlm speedup", "fastvlm memory saving"],
        [[r["variant"], f"{r['tokens_per_s']:.0f}", f"{r['seconds'] * 1e3:.1f}", f"{r['peak_bytes'] / 2**20:.0f}",
          f"{r['seconds'] / base['seconds']:.2f}x", f"{r['peak_bytes'] / max(base['peak_bytes'], 1):.2f}x"]
         for r in results])
    print(f"shape={shape} rows={rows} seq_len={seq_len} kind={args.kind} images={base['images']}")
    print(md)
    payload = {"benchmark": "bench_vlm", "env": env, "shape": shape, "rows": rows, "seq_len": seq_len,
               "kind": args.kind, "results": results}
    if args.out or not args.smoke:
        save_results(f"bench_vlm_{shape}", env, payload, md, args.out)
    return payload


if __name__ == "__main__":
    main()
