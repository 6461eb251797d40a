"""A DPO step on a LLaVA-style VLM: fastvlm's shared-prompt preference step against TRL's
DPOTrainer, the same pairs and the same weights in the same run.

Pairs shaped as LLaVA preference data: one image (many image tokens) and a short prompt,
two short answers. The model: a random-weight transformers ``LlavaForConditionalGeneration``
(CLIP tower, Llama LLM), saved once; both variants load it.

- ``fastvlm``: ``fastvlm.VLM`` loaded from that checkpoint, the tower frozen (no autograd),
  fastvlm LoRA on every LLM projection; the pairs through ``PreferenceDataset`` (template
  ``llava_v1``) as shared-prompt items ``[prompt | chosen | rejected]`` packed by
  ``PackedCollator`` into rows of ``--budget`` tokens; per row the vision tower runs once
  (its features feed both passes), the reference log-probs come from the same model with the
  adapters off under no_grad, the policy's from ``LLM.hidden_states`` on the branched layout
  and ``linear_logprob`` (no [tokens x vocab] logits), the loss from
  ``fastvlm.train.preference.dpo_loss``;
- ``trl``: TRL's ``DPOTrainer`` with a ``peft_config`` (the same LoRA) and no ``ref_model``
  (the reference is the adapters disabled), as its docs set up a VLM: a conversational
  dataset (``images``, ``prompt``, ``chosen``, ``rejected``), its vision collator
  (chosen and rejected as two padded sequences, each with the prompt and the image),
  ``--hf-batch`` pairs per micro-batch, gradient accumulation over all pairs.

Equal weights with a real margin: after building each variant, the LoRA matrices (A and B)
are set to the same seeded values in both (derived from each layer's index and projection
name), so the policy differs from the reference and the DPO loss is not the trivial ln 2.
The loss of the first step (the mean over pairs) must agree between the two (checked,
loudly). The processor's tokenizer is character-level and its chat template renders
``llava_v1`` exactly, so both stacks see the same tokens.

Every variant: fp32 on CPU (bf16 autocast on CUDA), gradient checkpointing on the LLM,
AdamW with clipping at 1.0; one step = the reference and policy passes, backward over all
pairs and the optimizer step. Reported: pairs/s (median step), peak memory (CPU: the RSS
high-water growth of the first step in a fresh process per variant; CUDA: the allocator),
the DPO loss, ratios to TRL.

    python benchmarks/bench_preference.py --quick     # CPU, small shapes
    python benchmarks/bench_preference.py             # GPU: LLaVA-1.5-7B shapes, bf16
    python benchmarks/bench_preference.py --smoke     # seconds; what the test runs
"""
from __future__ import annotations

import contextlib
import json
import random
import re
import resource
import string
import sys
import tempfile
import zlib
from pathlib import Path

import torch
from hf_sft import LOSS_RTOL, StepTimer, optimizer, run_cases, sample_text, start

from common import (
    markdown_table,
    median_time,
    peak_memory,
    results_path,
    save_results,
    training_step_parser,
    training_step_settings,
)

LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = ("trl", "fastvlm")
BETA = 0.1
SPECIALS = ("<pad>", "<s>", "</s>", "<image>")  # ids 0..3
CHARS = string.ascii_letters + string.digits + " \n.,?!:'-"
IMAGE_ID = SPECIALS.index("<image>")
# LLaVA-1.5's llava_v1 conversation (fastvlm.data.templates), as a transformers chat template
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'][0]['text'] }} "
    "{% elif m['role'] == 'user' %}USER: {% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n"
    "{% endif %}{% endfor %}{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %} {% else %}ASSISTANT: {% for p in m['content'] %}{{ p['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
# name -> (vision config, text config, pairs, prompt characters, answer characters)
SHAPES = {
    "7b": (dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16),
           dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, max_position_embeddings=4096), 16, (20, 120), (10, 120)),
    "quick": (dict(image_size=224, patch_size=14, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                   num_attention_heads=4),
              dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096), 8, (20, 80),
              (10, 60)),
    "smoke": (dict(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2),
              dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048), 4, (8, 30),
              (4, 20)),
}

def image_tokens(vision: dict) -> int:
    return (vision["image_size"] // vision["patch_size"]) ** 2


# ---- the checkpoint, the processor and the pairs ---------------------------------------------
def build_processor(vision: dict):
    """A LlavaProcessor: a character-level tokenizer (no merges, so a text tokenizes the same
    whole or in pieces), CLIP's image processor at the tower's size, the llava_v1 template."""
    import transformers as tf
    from tokenizers import Tokenizer, models

    vocab = {t: i for i, t in enumerate((*SPECIALS, *CHARS))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.add_special_tokens(list(SPECIALS))
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                     extra_special_tokens={"image_token": "<image>"})
    side = vision["image_size"]
    image = tf.CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return tf.LlavaProcessor(image, tok, patch_size=vision["patch_size"], vision_feature_select_strategy="default",
                             num_additional_image_tokens=1, chat_template=TEMPLATE)


def write_checkpoint(shape: str, path: Path, seed: int) -> None:
    """Random LLaVA weights, the processor, one image per pair (exactly the tower's size, so
    neither stack resizes it) and pairs.json (fastvlm's preference records)."""
    from PIL import Image
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision, text, count, prompt_chars, answer_chars = SHAPES[shape]
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**vision, projection_dim=vision["hidden_size"]),
                      text_config=LlamaConfig(**text), image_token_index=IMAGE_ID, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", image_seq_length=image_tokens(vision),
                      projector_hidden_act="gelu")
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    processor = build_processor(vision)
    processor.save_pretrained(path)
    processor.image_processor.save_pretrained(path)  # preprocessor_config.json: what fastvlm's ImagePreprocessor reads
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    side, records = vision["image_size"], []
    for i in range(count):
        pixels = torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(path / f"img{i}.png")
        chosen, rejected = (sample_text(rng, rng.randint(*answer_chars)) for _ in range(2))
        rejected = rejected if rejected != chosen else rejected + " no"
        records.append({"id": f"p{i}", "image": f"img{i}.png", "chosen": chosen, "rejected": rejected,
                        "conversations": [{"from": "human",
                                           "value": "<image>\n" + sample_text(rng, rng.randint(*prompt_chars))}]})
    (path / "pairs.json").write_text(json.dumps(records))


# ---- equal adapter weights in both stacks --------------------------------------------------
ADAPTER = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])")


@torch.no_grad()
def seed_adapters(model: torch.nn.Module, seed: int) -> int:
    """Set every LoRA matrix of the LLM (PEFT's ``...lora_A.default.weight`` or fastvlm's
    ``...lora_A``) to values drawn from (seed, layer, projection, A/B): the same in either
    stack. A ~ N(0, 1/in), B ~ N(0, 0.05^2): the policy's log-probs move by a fraction of a nat.
    Returns how many were set."""
    done = 0
    for name, p in model.named_parameters():
        m = ADAPTER.search(name)
        if m is None:
            continue
        layer, proj, which = m.groups()
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{layer}:{proj}:{which}".encode()))
        scale = p.shape[1] ** -0.5 if which == "A" else 0.05
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).mul_(scale).to(p.dtype))
        done += 1
    if not done:
        raise RuntimeError("seed_adapters: no LoRA parameter of the LLM found")
    return done


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module):
    """fastvlm LoRA switched off: each adapter's scaling set to 0 (its term is then an exact 0,
    the output the frozen base's), restored on exit."""
    from fastvlm.nn.lora import lora_layers

    layers = list(lora_layers(model).values())
    saved = [layer.scaling for layer in layers]
    for layer in layers:
        layer.scaling = 0.0
    try:
        yield
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling = scaling


# ---- the variants --------------------------------------------------------------------------
def build_fastvlm(path: Path, device, dtype, budget: int, r: int, seed: int, vision: dict):
    from fastvlm.data.collate import PackedCollator
    from fastvlm.data.packing import pack
    from fastvlm.data.preference import PreferenceDataset, read_preference
    from fastvlm.models.preprocess import ImagePreprocessor
    from fastvlm.models.vlm import VLM
    from fastvlm.ops.linear_logprob import linear_logprob
    from fastvlm.train.lora import apply_lora
    from fastvlm.train.preference import dpo_loss

    data = PreferenceDataset(read_preference(path / "pairs.json"), path, path, "llava_v1", image_tokens(vision),
                             ImagePreprocessor.from_pretrained(path), strict=True)
    items = [data[i] for i in range(len(data))]
    pad = data.tokenizer.pad_token_id
    collate = PackedCollator(pad, budget)
    rows = [collate([items[i] for i in row]) for row in pack([len(it["input_ids"]) for it in items], budget, "bfd")]
    model = VLM.from_pretrained(path).to(device)
    model.vision_tower.freeze(dtype if device.type == "cuda" else None)
    apply_lora(model, rf"language_model\..*\.({'|'.join(LLM_TARGETS)})", r=r, alpha=2 * r)
    seed_adapters(model, seed)
    model.language_model.set_checkpointing("selective")
    model.train()
    head = model.language_model.lm_head
    opt, pairs = optimizer(model), len(items)
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in rows]

    def step() -> dict:
        total = {"loss": 0.0, "chosen_logp": 0.0, "rejected_logp": 0.0}
        for b in batches:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                with torch.no_grad():  # the frozen tower, once per pair: its features feed both passes
                    features = model.vision_tower(b["images"], select_layers=model.feature_layers)
                layout = model.layout(b["input_ids"], segment_ids=b["segment_ids"], images=b["images"],
                                      branch_ids=b["branch_ids"])

                def logp():
                    embeds = model.embed(b["input_ids"], None, image_features=features)
                    hidden = model.language_model.hidden_states(inputs_embeds=embeds, layout=layout)
                    return linear_logprob(hidden, head, b["targets"], b["sequence_ids"], b["num_sequences"])[0]

                with torch.no_grad(), adapters_off(model):
                    ref = logp()
                policy = logp()
            loss, metrics = dpo_loss(policy[0::2], policy[1::2], ref[0::2], ref[1::2], beta=BETA)
            share = b["num_sequences"] // 2 / pairs  # the mean over all pairs
            (loss * share).backward()
            for key, value in (("loss", loss), ("chosen_logp", metrics["chosen_logp"]),
                               ("rejected_logp", metrics["rejected_logp"])):
                total[key] += float(value) * share
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    return step, sum(b["row_tokens"] for b in batches), sum(b["real_tokens"] for b in batches)


def run_trl(path: Path, device, dtype, batch: int, repeats: int, r: int, seed: int):
    """(the first step's loss and mean policy log-probs, median step seconds, its peak growth)."""
    from datasets import Dataset
    from peft import LoraConfig
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from trl import DPOConfig, DPOTrainer

    from fastvlm.data.templates import VICUNA_SYSTEM

    records = json.loads((path / "pairs.json").read_text())
    if len(records) % batch:
        raise ValueError(f"--hf-batch: {batch} does not divide the {len(records)} pairs (one TRL step must see "
                         "each pair once)")
    rows = [{"images": [Image.open(path / rec["image"]).convert("RGB")],
             "prompt": [{"role": "system", "content": VICUNA_SYSTEM},
                        {"role": "user", "content": rec["conversations"][0]["value"].removeprefix("<image>\n")}],
             "chosen": [{"role": "assistant", "content": rec["chosen"]}],
             "rejected": [{"role": "assistant", "content": rec["rejected"]}]} for rec in records]
    steps, accumulate = 1 + repeats, len(records) // batch
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).to(device)
    config = DPOConfig(output_dir=str(path / "trl_out"), per_device_train_batch_size=batch,
                       gradient_accumulation_steps=accumulate, max_steps=steps, learning_rate=1e-4,
                       lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, max_length=None, beta=BETA,
                       gradient_checkpointing=True, bf16=dtype == torch.bfloat16, use_cpu=device.type == "cpu",
                       logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0, seed=0,
                       disable_tqdm=True, train_sampling_strategy="sequential")
    lora = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                      target_modules=rf".*language_model.*\.({'|'.join(LLM_TARGETS)})")
    timer, seen = StepTimer(device), []

    class Trainer(DPOTrainer):  # records each micro-batch's loss and policy log-probs (means over its pairs)
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            logged = self._metrics["train"]
            seen.append({"loss": float((loss[0] if return_outputs else loss).detach()),
                         "chosen_logp": logged["logps/chosen"][-1], "rejected_logp": logged["logps/rejected"][-1]})
            return loss

    trainer = Trainer(model=model, args=config, train_dataset=Dataset.from_list(rows * steps),
                      processing_class=AutoProcessor.from_pretrained(path), peft_config=lora, callbacks=[timer])
    seed_adapters(trainer.model, seed)
    trainer.train()
    times = timer.times[1:]
    first = {key: sum(m[key] for m in seen[:accumulate]) / accumulate for key in seen[0]}  # equal micro-batches
    return first, sorted(times)[len(times) // 2], timer.peak


def one_case(shape, variant, path, device, repeats, budget, batch, r, seed):
    path, device = Path(path), torch.device(device)
    vision, text, count, *_ = SHAPES[shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    row_tokens = real_tokens = None
    if variant == "trl":
        first, secs, peak = run_trl(path, device, dtype, batch, repeats, r, seed)
    else:
        step, row_tokens, real_tokens = build_fastvlm(path, device, dtype, budget, r, seed, vision)
        firsts = []
        peak = peak_memory(lambda: firsts.append(step()), device.type)  # the first step: equal weights
        first = firsts[0]
        secs = median_time(step, repeats, warmup=0, device=device.type)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if device.type == "cpu" else None
    return {"variant": variant, "pairs": count, "seconds": secs, "pairs_per_s": count / secs, "peak_bytes": peak,
            "process_peak_rss": rss, **first, "row_tokens": row_tokens, "real_tokens": real_tokens}


# ---- the command ---------------------------------------------------------------------------
def main(argv=None):
    p = training_step_parser(__doc__)
    p.set_defaults(hf_batch=4)
    args = p.parse_args(argv)
    if args.qlora:
        p.error("--qlora: bench_preference compares LoRA steps only")
    if args.smoke and args.budget is None:
        args.budget = 512  # a smoke pair (system prompt, image, two answers) is ~250 tokens
    s = training_step_settings(args)
    device, shape, budget, repeats = s["device"], s["shape"], s["budget"], s["repeats"]
    if args.case:
        case = json.loads(args.case)
        print(json.dumps(one_case(shape, case["variant"], case["path"], device, repeats, budget, args.hf_batch,
                                  args.rank, args.seed)))
        return
    name = f"bench_preference_{shape}"
    env = start(name, f"DPO, LoRA r {args.rank}", device)
    flags = ["--smoke"] if args.smoke else ["--quick"] if shape == "quick" else []
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(shape, Path(tmp), args.seed)
        rows = run_cases(__file__, VARIANTS, tmp, [*flags, "--device", device, "--budget", str(budget), "--hf-batch",
                                                   str(args.hf_batch), "--rank", str(args.rank), "--repeats",
                                                   str(repeats), "--seed", str(args.seed)])
    by = {r["variant"]: r for r in rows}
    base, ours = by["trl"], by["fastvlm"]
    for key in ("loss", "chosen_logp", "rejected_logp"):  # the policy's log-probs: every answer token counts
        gap = abs(ours[key] - base[key]) / abs(base[key])
        if gap > LOSS_RTOL[device]:
            raise RuntimeError(f"{key}: fastvlm {ours[key]:.8f} vs TRL {base[key]:.8f} (relative gap {gap:.1e} > "
                               f"{LOSS_RTOL[device]:.1e}): the variants do not compute the same DPO step at equal "
                               "weights")
    for r in rows:
        r["speedup"] = base["seconds"] / r["seconds"]
        r["memory_ratio"] = r["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else None
        r["loss_gap"] = abs(r["loss"] - base["loss"]) / abs(base["loss"])
    table = markdown_table(
        ["variant", "s/step", "pairs/s", "step peak GiB", "process RSS GiB", "pairs/s vs TRL", "memory vs TRL",
         "DPO loss", "loss gap"],
        [[r["variant"], f"{r['seconds']:.3f}", f"{r['pairs_per_s']:.2f}", f"{r['peak_bytes'] / 2**30:.3f}",
          "-" if r["process_peak_rss"] is None else f"{r['process_peak_rss'] / 2**30:.2f}", f"{r['speedup']:.2f}x",
          "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}x", f"{r['loss']:.6f}",
          f"{r['loss_gap']:.1e}"] for r in rows])
    vision = SHAPES[shape][0]
    note = (f"{shape} shapes: {ours['pairs']} pairs, one {vision['image_size']} px image each "
            f"({image_tokens(vision)} image tokens); one step = reference + policy passes, backward and AdamW over "
            f"all pairs; medians of {repeats} steps after the first. fastvlm: shared-prompt rows of {budget} "
            f"({ours['real_tokens']} real tokens in {ours['row_tokens']}); TRL: {args.hf_batch} pairs per "
            "micro-batch, chosen and rejected as two padded sequences. Step peak = what the first step adds at its "
            "peak over the loaded model (" +
            ("CUDA allocator)" if device == "cuda" else "growth of the RSS high-water mark in a fresh process per "
             "variant); process RSS = that process's whole peak") +
            f". Issue target (CPU --quick): fastvlm >= 1.7x TRL's pairs/s at <= 0.6x its step peak: "
            f"{ours['speedup']:.2f}x, " + ("-" if ours["memory_ratio"] is None else f"{ours['memory_ratio']:.2f}x") +
            ".")
    print(table + "\n\n" + note)
    if args.smoke and args.out is None:
        return
    out = results_path(args.out, name, env)
    save_results(name, env, {"env": env, "args": vars(args) | {"out": str(args.out)}, "rows": rows, "note": note},
                 table + "\n\n" + note, out)


if __name__ == "__main__":
    sys.exit(main())
