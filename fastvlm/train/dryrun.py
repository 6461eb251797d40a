"""`fastvlm train RECIPE --dry-run`: what each stage would train and hold, with no weight loaded.

The model is built on the meta device from its configuration files, shaped per
stage exactly as training would (fastvlm.train.build), and measured:
parameters per group (total / trainable), bytes of weights, gradients and
optimizer states, an activation estimate at the stage's micro-batch, and the
number of optimizer steps (the run's own batch plan over the data: the same count the
run takes).

Activations follow Korthikanti et al. (2022) for a transformer layer in 16-bit
with a fused attention kernel (no s^2 term): 34 * tokens * width bytes per layer
kept for backward; full checkpointing keeps 2 * tokens * width per layer plus one
layer recomputed at a time, selective about 24. A frozen tower without autograd
keeps nothing; the LLM keeps its activations whenever a gradient flows through
it (align: to the connector below it).

With ``world_size`` W > 1 the numbers are per process under ``run.distributed``:
FSDP shards weights, gradients and optimizer states over W (plus one block
gathered at a time), DDP keeps all of them on every rank plus its reducer's
gradient buckets (one more copy of the trainable gradients). Activations are per
micro-batch either way.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from transformers import AutoConfig

from fastvlm.data import estimate_length
from fastvlm.data.packing import pack
from fastvlm.data.preference import PreferencePair
from fastvlm.integrations.hf_load import family_class_name, stored_dtype
from fastvlm.integrations.hf_trainable import HFVLM
from fastvlm.integrations.transformers import UnsupportedModelError, patch
from fastvlm.models.vlm import VLM
from fastvlm.train.build import finish_stage, model_config, prepare_stage, trainable_by_group
from fastvlm.train.lora import lora_layers
from fastvlm.train.recipe import TUNING_STAGES, Recipe, Stage
from fastvlm.train.stage_data import MissingPath, StageBatches, prepare_data, stage_samples

BYTES_PER_LAYER_TOKEN = {"none": 34, "selective": 24, "full": 2}
OPTIMIZER_STATE_BYTES = {"adamw": 8, "paged_adamw": 8, "adamw8bit": 2, "paged_adamw8bit": 2}


def _gib(n: float) -> str:
    return f"{n / 2**30:8.3f} GiB"


def _policy_bytes(policy: str) -> int:
    mode = policy.split("+")[0].split(":")[0]
    return BYTES_PER_LAYER_TOKEN.get(mode, BYTES_PER_LAYER_TOKEN["selective"])  # every_k: between


def activation_bytes(model, stage: Stage, tokens: int, images: int) -> int:
    cfg = model.config
    llm_grads = stage.type in ("lm", "align", *TUNING_STAGES)
    vision_grads = any(p.requires_grad for p in model.vision_tower.parameters())
    total = 0
    if llm_grads:
        per = _policy_bytes(stage.checkpointing.get("llm", "none"))
        total += cfg.llm.num_hidden_layers * tokens * cfg.llm.hidden_size * per
    if vision_grads:
        t = images * (cfg.vision.grid_size ** 2 + cfg.vision.num_prefix_tokens)
        per = _policy_bytes(stage.checkpointing.get("vision", "none"))
        total += cfg.vision.num_layers * t * cfg.vision.hidden_size * per
    return total


def stage_memory(model, stage: Stage, tokens: int, images: int) -> dict:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"weights": weights, "gradients": trainable * 4, "optimizer": trainable * OPTIMIZER_STATE_BYTES[
        stage.optimizer], "activations": activation_bytes(model, stage, tokens, images)}


def micro_batch_size(stage: Stage, samples: list, image_tokens: int) -> tuple[int, int]:
    """(tokens, images) of an average micro-batch, from estimated lengths."""
    if not samples:
        return 0, 0
    samples = [_as_row(s) if isinstance(s, PreferencePair) else s for s in samples]
    lengths = [min(estimate_length(s, image_tokens), stage.packing_budget) for s in samples]
    packed = stage.packing and stage.type != "contrastive"
    rows = len(pack(lengths, stage.packing_budget)) if packed else len(samples) / stage.batch_size
    micro = max(1, math.ceil(rows / stage.batch_size) if packed else math.ceil(rows))
    per_sample = len(samples) / micro
    images = 0 if stage.type == "lm" else round(per_sample * sum(len(s.images) for s in samples) / len(samples))
    tokens = stage.batch_size * stage.packing_budget if packed else round(per_sample * sum(lengths) / len(lengths))
    return tokens, images


def _as_row(pair: PreferencePair) -> SimpleNamespace:
    """A preference pair as the conversation its shared-prompt row holds: the prompt, then both answers."""
    answers = [{"from": "gpt", "value": a} for a in (pair.chosen, pair.rejected)]
    return SimpleNamespace(conversations=[*pair.prompt, *answers], images=pair.images)


def _run_data(recipe: Recipe, out: Path | None):
    """(RunData, None), or (None, why) when a data file or folder the recipe names does not
    exist (the memory estimate needs the configs alone). Writes nothing."""
    with tempfile.TemporaryDirectory(prefix="fastvlm-dryrun-") as tmp:
        try:
            return prepare_data(recipe, out if out is not None else Path(tmp), write=False, scratch=Path(tmp)), None
        except MissingPath as err:
            return None, str(err)


def per_process(mem: dict, mode: str, world: int, largest_block: int) -> dict:
    """Memory per rank of a job of `world` processes (see the module docstring)."""
    if world <= 1 or mode == "none":
        return mem
    if mode == "ddp":
        return {**mem, "ddp_buckets": mem["gradients"]}
    sharded = {k: math.ceil(v / world) for k, v in mem.items() if k != "activations"}
    return {**sharded, "gathered": largest_block, "activations": mem["activations"]}


def _largest_block(model) -> int:
    blocks = list(model.language_model.model.layers) + list(model.vision_tower.blocks)
    return max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks)


def dry_run(recipe: Recipe, out: Path | None = None, world_size: int = 1) -> str:
    if recipe.model.source == "hf":
        return hf_dry_run(recipe, out, world_size)
    data, missing = _run_data(recipe, out)
    cfg = model_config(recipe, data.tokenizer if data is not None else None)
    with torch.device("meta"):
        model = VLM(cfg)
    lines = [f"recipe {recipe.name} (hash {recipe.digest()}): {recipe.model.source} model, "
             f"{sum(p.numel() for p in model.parameters()):,} parameters, {model.image_tokens} tokens per image"]
    if missing:
        lines.append(f"no data ({missing}): optimizer steps only where max_steps sets them")
    mode = recipe.run.distributed
    if world_size > 1:
        lines.append(f"run.distributed = {mode!r} on {world_size} processes: memory per process"
                     + (" (one process: run.distributed is 'none')" if mode == "none" else ""))
    for i, stage in enumerate(recipe.stages):
        with torch.device("meta"):
            prepare_stage(model, _unquantized(stage), recipe, torch.device("meta"))
        if data is not None:  # the steps the run takes: its own batches, planned from the same data
            source = stage_samples(stage, data)[0]
            steps = stage.max_steps or StageBatches(stage, recipe, data, model, seed=recipe.run.seed + i).total_steps()
        else:
            steps, source = stage.max_steps, []
        tokens, images = micro_batch_size(stage, source, model.image_tokens)
        mem = stage_memory(model, stage, tokens, images)
        if stage.type in TUNING_STAGES and stage.finetune == "qlora":  # 4-bit bases: a quarter of bf16's bytes
            mem["weights"] -= _quantized_saving(model)
        mem = per_process(mem, mode, world_size, _largest_block(model))
        lines.append(f"\n[{i + 1}] {stage.name} ({stage.type}): {steps} optimizer steps, micro-batch ~{tokens} "
                     f"tokens / {images} images, {stage.grad_accum} micro-batch(es) per step, "
                     f"precision {stage.precision}")
        lines += _group_and_memory_lines(model, stage, mem, "activations per micro-batch")
        finish_stage(model, stage)
    return "\n".join(lines)


def _group_and_memory_lines(model, stage: Stage, mem: dict, note: str) -> list[str]:
    lines = []
    for group, (total, trainable) in trainable_by_group(model).items():
        lr = f"lr {stage.lr[group]:g}" if group in stage.lr else "frozen"
        lines.append(f"    {group:10s} {total:>14,} total {trainable:>14,} trainable   {lr}")
    for key, value in mem.items():
        lines.append(f"    {key:12s} {_gib(value)}")
    lines.append(f"    {'sum':12s} {_gib(sum(mem.values()))}   (estimate; {note})")
    return lines


def hf_model_on_meta(recipe: Recipe) -> HFVLM:
    """The Hugging Face VLM of model.path built on the meta device from its config.json
    alone (its class, patched as the run patches it, in the dtype the run loads it in; no
    weight read)."""
    path = Path(recipe.model.path).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"model.path: {path} holds no config.json (a transformers model directory)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    try:
        cls = getattr(transformers, family_class_name(config))
    except UnsupportedModelError as err:
        raise ValueError(f"model.{err}") from None
    with torch.device("meta"):  # in the dtype the run loads it in (fastvlm.train.hf_build.build_hf_model)
        hf = cls._from_config(config, dtype=stored_dtype(path))
    return HFVLM(patch(hf, checkpointing=recipe.stages[0].checkpointing.get("vision", "none")))


def hf_dry_run(recipe: Recipe, out: Path | None = None, world_size: int = 1) -> str:
    """dry_run of a Hugging Face VLM recipe: parameters per group, weights, gradients and
    optimizer states per stage from the config alone; the LLM's activations (as for
    fastvlm.VLM) at a full micro-batch of packed rows (or padded ones at the budget); the
    vision tower's are not estimated (its token count depends on each image's size)."""
    model = hf_model_on_meta(recipe)
    text = model.hf.config.get_text_config()
    try:
        data, missing = _run_data(recipe, out)
    except ValueError as err:  # no processor beside a bare config: the plan needs one
        data, missing = None, str(err)
    loaded = sum(p.numel() * p.element_size() for p in model.parameters())
    lines = [f"recipe {recipe.name} (hash {recipe.digest()}): hf model {type(model.hf).__name__}, "
             f"{sum(p.numel() for p in model.parameters()):,} parameters, loaded in "
             f"{str(next(model.parameters()).dtype).removeprefix('torch.')} ({_gib(loaded).strip()})"]
    if missing:
        lines.append(f"no data ({missing}): optimizer steps only where max_steps sets them")
    mode = recipe.run.distributed
    for i, stage in enumerate(recipe.stages):
        prepare_stage(model, _unquantized(stage), recipe, torch.device("meta"))
        steps = stage.max_steps
        if data is not None and not steps:
            steps = StageBatches(stage, recipe, data, model, seed=recipe.run.seed + i).total_steps()
        tokens = stage.batch_size * stage.packing_budget
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        activations = text.num_hidden_layers * tokens * text.hidden_size * _policy_bytes(
            stage.checkpointing.get("llm", "none"))
        mem = {"weights": sum(p.numel() * p.element_size() for p in model.parameters()), "gradients": trainable * 4,
               "optimizer": trainable * OPTIMIZER_STATE_BYTES[stage.optimizer], "activations": activations}
        if stage.type == "instruct" and stage.finetune == "qlora":
            mem["weights"] -= _quantized_saving(model)
        blocks = model.fsdp_units()
        mem = per_process(mem, mode, world_size, max(sum(p.numel() * p.element_size() for p in b.parameters())
                                                     for b in blocks))
        lines.append(f"\n[{i + 1}] {stage.name} ({stage.type}): {steps} optimizer steps, micro-batch <= {tokens} "
                     f"tokens, {stage.grad_accum} micro-batch(es) per step, precision {stage.precision}")
        lines += _group_and_memory_lines(model, stage, mem,
                                         "LLM activations per micro-batch, vision tower's not counted")
        finish_stage(model, stage)
    return "\n".join(lines)


def _unquantized(stage: Stage) -> Stage:
    # NF4 quantization needs real weights; on meta tensors LoRA stands in and the bytes are corrected.
    from dataclasses import replace

    return replace(stage, finetune="lora") if stage.finetune == "qlora" else stage


def _quantized_saving(model) -> int:
    return sum(m.base_layer.weight.numel() * (m.base_layer.weight.element_size() - 0.5)
               for m in lora_layers(model.language_model).values())



