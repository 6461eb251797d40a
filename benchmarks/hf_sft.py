"""``bench_train.py --hf FAMILY``: a LoRA SFT step on a Hugging Face VLM, fastvlm against
the stacks users run, the same samples and weights in the same run.

- ``fastvlm``: the model as ``fastvlm train`` builds an ``instruct`` stage of a
  ``model.source = "hf"`` run: loaded and patched by ``fastvlm.integrations.hf_load.load_patched``
  (fastvlm attention on the packed layout, fused LM-head loss, vision checkpointing policy),
  shaped by ``fastvlm.train.hf_build.shape_hf_stage`` (fastvlm's LoRALinear on the same LLM
  projections with the same rank, alpha and dropout as the PEFT variants; decoder layers
  recomputed in backward), driven through ``HFVLM``; the samples through
  ``HFProcessorDataset`` (the processor's chat template, labels from character offsets)
  and packed by ``HFPackedCollator`` into rows of ``--budget`` tokens, one row per
  micro-batch (the patched forward runs a row's live tokens only, not its padding);
- ``trl``: TRL's ``SFTTrainer`` with a ``peft_config``, as its docs set up a VLM: a
  conversational dataset (``messages`` + ``images``), its vision collator (padded: TRL
  refuses packing and padding-free for vision data), ``assistant_only_loss`` (the chat
  templates mark the answers with ``{% generation %}``, so TRL supervises the tokens
  fastvlm does), ``--hf-batch`` samples per micro-batch, gradient accumulation over all
  samples; the step is timed by a callback between ``on_step_begin`` and ``on_step_end``;
- ``hf+peft``: the unpatched model with the same PEFT LoRA in a plain loop over padded
  micro-batches of ``--hf-batch`` (``HFPaddedCollator``: the same labels as fastvlm).

Every variant: fp32 on CPU (bf16 autocast on CUDA), HF gradient checkpointing on the LLM,
the vision tower and projector frozen, AdamW with gradient clipping at 1.0, one step =
forward + backward over all samples + the optimizer step. The loss of the first step
(equal weights: LoRA's B starts at zero) is the mean over supervised tokens; the variants
must agree on it (checked, loudly).
"""
from __future__ import annotations

import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from common import (
    environment,
    markdown_table,
    median_time,
    peak_memory,
    print_header,
    results_path,
    run_isolated,
    save_results,
    training_step_parser,
    training_step_settings,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tiny tokenizers of tests/hf_processors.py (benchmarks run from a checkout)
from tests.hf_processors import build_tokenizer  # noqa: E402

FAMILIES = ("qwen2.5-vl", "gemma3")
VARIANTS = ("trl", "hf+peft", "fastvlm")
LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = rf".*language_model.*\.({'|'.join(LLM_TARGETS)})"
# token ids of the tiny tokenizer (tests/hf_processors.py): its specials sit at 88..95
VOCAB_TOKENS = 96
IMAGE, BOI, EOI, VIDEO = VOCAB_TOKENS - 1, VOCAB_TOKENS - 3, VOCAB_TOKENS - 2, VOCAB_TOKENS - 4

# Chat templates shaped as each family's own, with the answers (and their end-of-turn
# token) in {% generation %} blocks: TRL's assistant_only_loss then supervises exactly the
# tokens HFProcessorDataset derives from character offsets.
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['role'] == 'assistant' %}"
    "{% generation %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}<|im_end|>{% endgeneration %}"
    "\n{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else 'user' }}\n{% if message['role'] == 'assistant' %}"
    "{% generation %}{% for part in message['content'] %}{{ part['text'] | trim }}{% endfor %}<end_of_turn>"
    "{% endgeneration %}\n{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<start_of_image>{% else %}{{ part['text'] | trim }}{% endif %}{% endfor %}<end_of_turn>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

# per shape: LLM, vision tower, image side (pixels), samples, answer characters (lo, hi)
SHAPES = {
    "smoke": dict(llm=dict(hidden=32, inter=64, layers=2, heads=4, kv=2, vocab=VOCAB_TOKENS),
                  vision=dict(hidden=32, inter=64, layers=2, heads=4), image=56, samples=4, answer=(4, 40)),
    "quick": dict(llm=dict(hidden=512, inter=1376, layers=4, heads=8, kv=8, vocab=32000),
                  vision=dict(hidden=256, inter=1024, layers=4, heads=4), image=224, samples=8, answer=(20, 400)),
}
# the released models' shapes (random weights; GPU): Qwen2.5-VL-7B, Gemma 3 4B
SHAPES_7B = {
    "qwen2.5-vl": dict(llm=dict(hidden=3584, inter=18944, layers=28, heads=28, kv=4, vocab=152064),
                       vision=dict(hidden=1280, inter=3420, layers=32, heads=16), image=448, samples=16,
                       answer=(40, 600)),
    "gemma3": dict(llm=dict(hidden=2560, inter=10240, layers=34, heads=8, kv=4, vocab=262208, head_dim=256),
                   vision=dict(hidden=1152, inter=4304, layers=27, heads=16), image=896, samples=16,
                   answer=(40, 600)),
}
WORDS = ("the", "a", "red", "cat", "sits", "on", "blue", "mat", "two", "dogs", "run", "near", "green", "tree",
         "what", "is", "shown", "here", "left", "right", "of", "and", "small", "large", "house", "sky")


def shape_of(family: str, shape: str) -> dict:
    return SHAPES_7B[family] if shape == "7b" else SHAPES[shape]


def _qwen_model(s: dict):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    llm, vis = s["llm"], s["vision"]
    half = llm["hidden"] // llm["heads"] // 2  # M-RoPE sections (t, h, w) over half the head dim, as 7B's 16/24/24
    t = half // 4
    text = dict(hidden_size=llm["hidden"], intermediate_size=llm["inter"], num_hidden_layers=llm["layers"],
                num_attention_heads=llm["heads"], num_key_value_heads=llm["kv"], vocab_size=llm["vocab"],
                rope_parameters={"rope_type": "default",
                                 "mrope_section": [t, (half - t) // 2, half - t - (half - t) // 2]})
    depth = vis["layers"]
    vision = dict(depth=depth, hidden_size=vis["hidden"], intermediate_size=vis["inter"], num_heads=vis["heads"],
                  out_hidden_size=llm["hidden"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  in_channels=3, window_size=112, fullatt_block_indexes=list(range(depth // 4 - 1, depth, depth // 4))
                  if depth >= 4 else [depth - 1])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, vision_start_token_id=BOI,
                           vision_end_token_id=EOI, video_token_id=VIDEO, attn_implementation="sdpa")
    return Qwen2_5_VLForConditionalGeneration(cfg)


def _gemma3_model(s: dict):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    llm, vis = s["llm"], s["vision"]
    head_dim = llm.get("head_dim", llm["hidden"] // llm["heads"])
    layers = ["full_attention" if (k + 1) % 6 == 0 or k == llm["layers"] - 1 else "sliding_attention"
              for k in range(llm["layers"])]  # Gemma 3's 5 local : 1 global
    text = dict(model_type="gemma3_text", hidden_size=llm["hidden"], intermediate_size=llm["inter"],
                num_hidden_layers=llm["layers"], num_attention_heads=llm["heads"], num_key_value_heads=llm["kv"],
                head_dim=head_dim, vocab_size=llm["vocab"], sliding_window=512 if llm["vocab"] > 1000 else 3,
                layer_types=layers, query_pre_attn_scalar=head_dim)
    patches = s["image"] // 14
    vision = dict(model_type="siglip_vision_model", hidden_size=vis["hidden"], intermediate_size=vis["inter"],
                  num_hidden_layers=vis["layers"], num_attention_heads=vis["heads"], image_size=s["image"],
                  patch_size=14)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=image_tokens("gemma3", s),
                       image_token_id=IMAGE, boi_token_id=BOI, eoi_token_id=EOI, attn_implementation="sdpa")
    assert patches % 2 == 0
    return Gemma3ForConditionalGeneration(cfg)


def image_tokens(family: str, s: dict) -> int:
    """Tokens per image: Qwen merges 2x2 patches of 14; Gemma 3 pools its patch grid 4x (2x2)
    below 896 px, 16x (4x4) at 896 as the released model does."""
    patches = s["image"] // 14
    pool = 4 if s["image"] >= 896 else 2
    return (patches // 2) ** 2 if family == "qwen2.5-vl" else (patches // pool) ** 2


def build_processor(family: str, s: dict):
    import transformers as tf

    if family == "qwen2.5-vl":
        tok = build_tokenizer("qwen2_5_vl")
        pixels = s["image"] ** 2
        image = tf.Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=pixels,
                                         max_pixels=pixels)
        video = tf.Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
        proc = tf.Qwen2_5_VLProcessor(image, tok, video)
        proc.chat_template = QWEN_TEMPLATE
    else:
        tok = build_tokenizer("gemma3")
        image = tf.Gemma3ImageProcessor(size={"height": s["image"], "width": s["image"]})
        proc = tf.Gemma3Processor(image, tok, image_seq_length=image_tokens("gemma3", s))
        proc.chat_template = GEMMA3_TEMPLATE
    return proc


def write_checkpoint(family: str, shape: str, path: Path, seed: int) -> None:
    """Random weights of the shape (fp32), the tiny processor, the images and the samples
    (samples.json: LLaVA records), all in `path`."""
    from PIL import Image

    s = shape_of(family, shape)
    torch.manual_seed(seed)
    model = _qwen_model(s) if family == "qwen2.5-vl" else _gemma3_model(s)
    model.save_pretrained(path)
    build_processor(family, s).save_pretrained(path)
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(s["samples"]):
        files = []
        for k in range(rng.randint(1, 2)):
            pixels = torch.randint(0, 256, (s["image"], s["image"], 3), generator=g, dtype=torch.uint8)
            files.append(f"img{i}_{k}.png")
            Image.fromarray(pixels.numpy()).save(path / files[-1])
        prompt = sample_text(rng, rng.randint(8, 60))
        answer = sample_text(rng, rng.randint(*s["answer"]))
        records.append({"id": f"s{i}", "images": files, "conversations": [
            {"from": "human", "value": "<image>\n" * len(files) + prompt}, {"from": "gpt", "value": answer}]})
    (path / "samples.json").write_text(json.dumps(records))


def sample_text(rng: random.Random, chars: int) -> str:
    """Words drawn by `rng` up to about `chars` characters, as a sentence."""
    words = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(WORDS))
    return " ".join(words).capitalize() + "."


def read_records(path: Path) -> list[dict]:
    return json.loads((Path(path) / "samples.json").read_text())


# ---- the variants --------------------------------------------------------------------------
def _lora(r: int):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")


def _items(path: Path):
    from fastvlm.data.formats import Sample
    from fastvlm.data.hf_processor import HFProcessorDataset

    samples = [Sample(r["id"], r["images"], r["conversations"]) for r in read_records(path)]
    data = HFProcessorDataset(samples, path, path, strict=True)
    return [data[i] for i in range(len(data))], data.processor.tokenizer.pad_token_id


def optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def _step_fn(model, micro, total_sup, device, dtype):
    """One training step over `micro` [(loss fn, supervised targets)] with the global token mean."""
    opt = optimizer(model)

    def step():
        loss_sum = 0.0
        for loss_of, sup in micro:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = loss_of()
            (loss * (sup / total_sup)).backward()
            loss_sum += float(loss) * sup / total_sup
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss_sum

    return step


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def build_fastvlm(path, device, dtype, batch_size, budget, r):
    """The model as ``fastvlm train`` builds an ``instruct`` stage of a ``model.source = "hf"``
    run (fastvlm.train.hf_build: load + patch, fastvlm's LoRALinear on the same projections,
    the tower and projector frozen, each decoder layer recomputed in backward)."""
    from fastvlm.data.hf_collate import HFPackedCollator
    from fastvlm.data.packing import pack
    from fastvlm.integrations.hf_load import load_patched
    from fastvlm.integrations.hf_trainable import HFVLM
    from fastvlm.train.hf_build import shape_hf_stage
    from fastvlm.train.recipe import LoRASection, Stage

    items, pad_id = _items(path)
    model = HFVLM(load_patched(path, torch.float32)).to(device)
    model.hf.config.use_cache = False
    shape_hf_stage(model, Stage(type="instruct", lr={"llm": 1e-4}, finetune="lora", checkpointing={"llm": "full"},
                                lora=LoRASection(r=r, alpha=2 * r, dropout=0.0, targets=",".join(LLM_TARGETS))))
    model.train()
    collate = HFPackedCollator(pad_id, budget)
    rows = [_to(collate([items[i] for i in row]), device)
            for row in pack([len(it["input_ids"]) for it in items], budget, "bfd")]
    total = sum(b["supervised_tokens"] for b in rows)
    micro = [(lambda b=b: model(**model.batch_inputs(b, device)), b["supervised_tokens"]) for b in rows]
    return model, _step_fn(model, micro, total, device, dtype), rows


def build_plain(path, device, dtype, batch_size, budget, r):
    import transformers
    from peft import get_peft_model

    from fastvlm.data.hf_collate import HFPaddedCollator
    from fastvlm.integrations.hf_load import family_class_name

    items, pad_id = _items(path)
    cls = getattr(transformers, family_class_name(transformers.AutoConfig.from_pretrained(path)))
    hf = cls.from_pretrained(path, dtype=torch.float32).to(device)
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.config.use_cache = False
    model = get_peft_model(hf, _lora(r)).train()
    collate = HFPaddedCollator(pad_id)
    batches = [_to(collate(items[b:b + batch_size]), device) for b in range(0, len(items), batch_size)]
    keep = ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "token_type_ids",
            "mm_token_type_ids")
    total = sum(b["supervised_tokens"] for b in batches)
    micro = [(lambda b=b: model(**{k: b[k] for k in keep if k in b}).loss, b["supervised_tokens"]) for b in batches]
    return model, _step_fn(model, micro, total, device, dtype), batches


class StepTimer(TrainerCallback):
    """TrainerCallback timing each optimizer step (collation is outside it: the Trainer
    fetches a step's micro-batches before on_step_begin) and its memory peak."""

    def __init__(self, device):
        self.device, self.times, self.peak, self.start, self.base = device, [], None, 0.0, 0

    def on_step_begin(self, args, state, control, **kw):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            grown = torch.cuda.max_memory_allocated() - self.base
        else:
            grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base) * 1024
        self.times.append(time.perf_counter() - self.start)
        if self.peak is None:
            self.peak = grown


def run_trl(path, device, dtype, batch_size, repeats, r):
    """(loss of the first step, median step seconds, first step's peak growth, supervised targets)."""
    import transformers
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoProcessor
    from trl import SFTConfig, SFTTrainer

    from fastvlm.integrations.hf_load import family_class_name

    records = read_records(path)
    rows = [{"messages": [{"role": "user", "content": c[0]["value"].replace("<image>\n", "")},
                          {"role": "assistant", "content": c[1]["value"]}],
             "images": [Image.open(Path(path) / f).convert("RGB") for f in rec["images"]]}
            for rec in records for c in [rec["conversations"]]]
    steps = 1 + repeats
    dataset = Dataset.from_list(rows * steps)  # one step = every sample once
    cls = getattr(transformers, family_class_name(transformers.AutoConfig.from_pretrained(path)))
    model = cls.from_pretrained(path, dtype=torch.float32).to(device)
    if len(records) % batch_size:
        raise ValueError(f"--hf-batch: {batch_size} does not divide the {len(records)} samples (one TRL step must "
                         "see each sample once)")
    accumulate = len(records) // batch_size
    config = SFTConfig(output_dir=str(Path(path) / "trl_out"), per_device_train_batch_size=batch_size,
                       gradient_accumulation_steps=accumulate, max_steps=steps, learning_rate=1e-4,
                       lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, max_length=None,
                       assistant_only_loss=True, gradient_checkpointing=True, bf16=dtype == torch.bfloat16,
                       use_cpu=device.type == "cpu", logging_steps=1, save_strategy="no", report_to="none",
                       dataloader_num_workers=0, seed=0, disable_tqdm=True, train_sampling_strategy="sequential")
    timer = StepTimer(device)
    sums, supervised = [], []

    class Trainer(SFTTrainer):  # records each micro-batch's loss as a sum over its supervised targets
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            count = int((inputs["labels"][:, 1:] != -100).sum())
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            value = float((loss[0] if return_outputs else loss).detach())
            # TRL divides the micro-batch's sum by num_items_in_batch (the step's targets) when the
            # Trainer passes it, else by the micro-batch's own targets
            sums.append(value * (count if num_items_in_batch is None else int(num_items_in_batch)))
            supervised.append(count)
            return loss

    trainer = Trainer(model=model, args=config, train_dataset=dataset,
                      processing_class=AutoProcessor.from_pretrained(path), peft_config=_lora(r), callbacks=[timer])
    trainer.train()
    first_loss = sum(sums[:accumulate]) / sum(supervised[:accumulate])
    return first_loss, sorted(timer.times[1:])[len(timer.times[1:]) // 2], timer.peak, sum(supervised[:accumulate])


def one_case(family, shape, variant, path, device, repeats, budget, batch_size, r):
    path, device = Path(path), torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    records = read_records(path)
    if variant == "trl":
        loss, secs, peak, total_sup = run_trl(path, device, dtype, batch_size, repeats, r)
        row_tokens = None
    else:
        build = build_fastvlm if variant == "fastvlm" else build_plain
        model, step, batches = build(path, device, dtype, batch_size, budget, r)
        total_sup = sum(b["supervised_tokens"] for b in batches)
        row_tokens = sum(b["row_tokens"] for b in batches)
        losses = []
        peak = peak_memory(lambda: losses.append(step()), device.type)  # the first step: equal weights
        loss = losses[0]
        secs = median_time(step, repeats, warmup=0, device=device.type)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if device.type == "cpu" else None
    tokens = sum(int(b["real_tokens"]) for b in batches) if row_tokens is not None else None
    return {"variant": variant, "family": family, "samples": len(records), "process_peak_rss": rss, "seconds": secs,
            "supervised_tokens": total_sup, "tokens": tokens, "row_tokens": row_tokens,
            "supervised_tokens_per_s": total_sup / secs, "peak_bytes": peak, "loss": loss}


# ---- the command ---------------------------------------------------------------------------
# fp32 on CPU: the variants differ by summation order and padding only, a few hundred ulps of
# the mean; bf16 autocast on CUDA: each variant's kernels round matmul inputs differently, a
# few bf16 ulps of the mean. A wrong mask or a misaligned label moves the loss by > 1e-2.
LOSS_RTOL = {"cpu": 2**10 * torch.finfo(torch.float32).eps, "cuda": 4 * torch.finfo(torch.bfloat16).eps}


def check_agreement(rows: list[dict], device: str) -> None:
    """Every variant saw the same supervised targets and, at equal weights, the same loss per
    supervised token; else a RuntimeError naming the variants."""
    base = rows[0]
    for r in rows[1:]:
        if r["supervised_tokens"] != base["supervised_tokens"]:
            raise RuntimeError(f"{r['variant']} supervised {r['supervised_tokens']} tokens, {base['variant']} "
                               f"{base['supervised_tokens']}: the variants do not train on the same targets")
        gap = abs(r["loss"] - base["loss"]) / abs(base["loss"])
        if gap > LOSS_RTOL[device]:
            raise RuntimeError(f"loss per supervised token: {r['variant']} {r['loss']:.8f} vs {base['variant']} "
                               f"{base['loss']:.8f} (relative gap {gap:.1e} > {LOSS_RTOL[device]:.1e}): the "
                               "variants do not compute the same loss at equal weights")


def main(argv, doc: str, script: str) -> None:
    p = training_step_parser(doc)
    p.add_argument("--hf", choices=FAMILIES, required=True, help="a Hugging Face VLM family (tiny processor)")
    args = p.parse_args(argv)
    s = training_step_settings(args)
    device, shape = s["device"], s["shape"]
    if args.case:
        case = json.loads(args.case)
        print(json.dumps(one_case(args.hf, shape, case["variant"], case["path"], device, s["repeats"], s["budget"],
                                  args.hf_batch, args.rank)))
        return
    name = f"bench_train_hf_{args.hf}_{shape}"
    env = start(name, f"LoRA r {args.rank}", device)
    flags = ["--smoke"] if args.smoke else ["--quick"] if shape == "quick" else []
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(args.hf, shape, Path(tmp), args.seed)
        rows = run_cases(script, VARIANTS, tmp, [*flags, "--hf", args.hf, "--device", device, "--budget",
                                                 str(s["budget"]), "--hf-batch", str(args.hf_batch), "--rank",
                                                 str(args.rank), "--repeats", str(s["repeats"])])
    check_agreement(rows, device)
    by = {r["variant"]: r for r in rows}
    for r in rows:
        for base in ("trl", "hf+peft"):
            r[f"speedup_vs_{base}"] = by[base]["seconds"] / r["seconds"]
            r[f"memory_vs_{base}"] = r["peak_bytes"] / by[base]["peak_bytes"] if by[base]["peak_bytes"] else None
        r["loss_gap"] = abs(r["loss"] - by["trl"]["loss"]) / abs(by["trl"]["loss"])

    def ratio(x):
        return "-" if x is None else f"{x:.2f}x"

    table = markdown_table(
        ["variant", "s/step", "supervised tok/s", "step peak GiB", "process RSS GiB", "tok/s vs TRL",
         "memory vs TRL", "tok/s vs hf+peft", "memory vs hf+peft", "loss / supervised token", "loss gap"],
        [[r["variant"], f"{r['seconds']:.3f}", f"{r['supervised_tokens_per_s']:.0f}", f"{r['peak_bytes'] / 2**30:.3f}",
          "-" if r["process_peak_rss"] is None else f"{r['process_peak_rss'] / 2**30:.2f}",
          ratio(r["speedup_vs_trl"]), ratio(r["memory_vs_trl"]), ratio(r["speedup_vs_hf+peft"]),
          ratio(r["memory_vs_hf+peft"]), f"{r['loss']:.6f}", f"{r['loss_gap']:.1e}"] for r in rows])
    ours = by["fastvlm"]
    note = (f"{args.hf}, {shape} shapes: {ours['samples']} samples, {ours['supervised_tokens']} supervised tokens, "
            f"{ours['tokens']} real tokens; one step = forward + backward over all samples + AdamW; medians of "
            f"{s['repeats']} steps after the first. fastvlm: packed rows of {s['budget']} ({ours['row_tokens']} row "
            f"tokens); TRL and hf+peft: micro-batches of {args.hf_batch} padded to their longest. Step peak = what "
            "the first step adds at its peak over the loaded model (" +
            ("CUDA allocator)" if device == "cuda" else "growth of the RSS high-water mark in a fresh process per "
             "variant); process RSS = that process's whole peak") +
            f". Issue target (CPU --quick): fastvlm >= 2x TRL's supervised tokens/s at <= 0.5x its step peak: "
            f"{ratio(ours['speedup_vs_trl'])}, {ratio(ours['memory_vs_trl'])}.")
    print(table + "\n\n" + note)
    if args.smoke and args.out is None:
        return
    out = results_path(args.out, name, env)
    save_results(name, env, {"env": env, "args": vars(args) | {"out": str(args.out)}, "rows": rows, "note": note},
                 table + "\n\n" + note, out)


def start(name: str, what: str, device: str) -> dict:
    """The run's environment (with the compared stacks' versions), printed as its header."""
    env = environment(device) | versions()
    print_header(f"{name} ({what})", env)
    print(f"transformers {env['transformers']}  peft {env['peft']}  trl {env['trl']}")
    return env


def run_cases(script: str, variants, path, case_args: list[str]) -> list[dict]:
    """Each variant in a fresh process of `script` (``--case``) on the checkpoint at `path`."""
    rows = []
    for v in variants:
        rows.append(run_isolated(script, [*case_args, "--case", json.dumps({"variant": v, "path": str(path)})]))
        print(f"  {v}: {rows[-1]['seconds']:.3f} s/step, loss {rows[-1]['loss']:.6f}", flush=True)
    return rows


def versions() -> dict:
    """The versions of the stacks compared (the results record them beside torch's)."""
    import peft
    import transformers
    import trl

    return {"transformers": transformers.__version__, "peft": peft.__version__, "trl": trl.__version__}
