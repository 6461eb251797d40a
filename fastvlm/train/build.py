"""From a recipe to a model, and from a stage to what it trains.

``build_model`` makes the run's starting model (a Hugging Face LLaVA / fastvlm
directory, separate vision + LLM parts, or the built-in tiny configuration from
scratch). ``prepare_stage`` puts the model in a stage's shape — freezing,
contrastive heads, a frozen bf16 tower, LoRA / QLoRA, checkpointing policies,
attention kind — and ``finish_stage`` undoes what must not outlive the stage
(heads are dropped, LoRA merged into the weights). Both are deterministic, so
resuming replays them over the stages already done before loading a checkpoint.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from fastvlm.integrations.hf_trainable import HFVLM
from fastvlm.models.hf_vision import config_from_hf
from fastvlm.models.llm import LLMConfig
from fastvlm.models.vision import VisionConfig
from fastvlm.models.vlm import VLM, VLMConfig, _from_hf_llava
from fastvlm.nn.lora import LoRALinear, set_submodule
from fastvlm.train import distributed
from fastvlm.train.checkpoint import nf4_source_path, save_tensors
from fastvlm.train.hf_build import build_hf_model, shape_hf_stage
from fastvlm.train.lora import apply_lora, resolve_lora_targets
from fastvlm.train.precision import MixedPrecision
from fastvlm.train.quant import apply_qlora, merge_quantized, quantized_state_keys
from fastvlm.train.recipe import TUNING_STAGES, Recipe, Stage
from fastvlm.utils.io import read_tensors

GROUP_PATTERNS = VLM.GROUP_PATTERNS


def bf16_supported(device: torch.device) -> bool:
    """bf16 matmuls run natively: CUDA with bf16, or a CPU with AVX512-BF16 / AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def native_bf16(device: torch.device, recipe: Recipe) -> bool:
    """Whether the stage's bf16 runs as bf16 where it trains. On the meta device (a dry run) that
    is where the recipe would run, not this host: run.device = 'cpu', this host's CPU; else a
    GPU (bf16 as asked)."""
    if device.type == "meta":
        return recipe.run.device != "cpu" or bf16_supported(torch.device("cpu"))
    return bf16_supported(device)


def _existing(path: str, key: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"{key}: {path} does not exist")
    return p


def model_options(recipe: Recipe) -> dict:
    """VLMConfig fields the recipe's model section sets."""
    m = recipe.model
    return dict(connector=m.connector, select_layer=m.select_layer, select_layers=list(m.select_layers) or None,
                multilevel_mode=m.multilevel_mode, token_reduction=m.token_reduction or None,
                resampler_queries=m.resampler_queries, vision_feature=m.vision_feature,
                attention_kind=m.attention_kind)


def tiny_config(recipe: Recipe, vocab_size: int, image_token_id: int) -> VLMConfig:
    t = recipe.model.tiny
    presets = {"clip": VisionConfig.clip, "siglip": VisionConfig.siglip, "dinov2": VisionConfig.dinov2}
    if t.vision_family not in presets:
        raise ValueError(f"model.tiny.vision_family: expected one of {', '.join(presets)}, got {t.vision_family!r}")
    vision = presets[t.vision_family](image_size=t.image_size, patch_size=t.patch_size, hidden_size=t.vision_hidden,
                                      num_layers=t.vision_layers, num_heads=t.vision_heads,
                                      intermediate_size=4 * t.vision_hidden)
    llm = LLMConfig(vocab_size=vocab_size, hidden_size=t.llm_hidden, intermediate_size=t.llm_intermediate,
                    num_hidden_layers=t.llm_layers, num_attention_heads=t.llm_heads,
                    max_position_embeddings=t.max_position_embeddings)
    return VLMConfig(vision=vision, llm=llm, image_token_id=image_token_id, **model_options(recipe))


def model_config(recipe: Recipe, tokenizer) -> VLMConfig:
    """The starting model's configuration, read without loading any weight (for --dry-run too)."""
    m = recipe.model
    if m.source == "tiny":
        return tiny_config(recipe, tokenizer.vocab_size if tokenizer is not None else m.tiny.vocab_size,
                           tokenizer.image_token_id if tokenizer is not None else m.tiny.vocab_size - 1)
    if m.source == "parts":
        vision = config_from_hf(json.loads((_existing(m.vision, "model.vision") / "config.json").read_text()))
        llm = LLMConfig.from_hf(json.loads((_existing(m.llm, "model.llm") / "config.json").read_text()))
        return VLMConfig(vision=vision, llm=llm, image_token_id=_image_token_id(tokenizer, llm),
                         **model_options(recipe))
    raw = json.loads((_existing(m.path, "model.path") / "config.json").read_text())
    if raw.get("model_type") == "fastvlm_vlm":
        return VLMConfig.from_dict(raw["config"])
    with torch.device("meta"):
        return _from_hf_llava(raw, {})[0].config


def _image_token_id(tokenizer, llm: LLMConfig) -> int:
    if tokenizer is None:
        return llm.vocab_size
    return tokenizer.image_token_id


def build_model(recipe: Recipe, tokenizer, seed: int) -> VLM:
    """The run's starting model (weights from disk, or a seeded random init)."""
    m = recipe.model
    if m.source == "hf":
        return build_hf_model(recipe)
    if m.source == "pretrained":
        model = VLM.from_pretrained(_existing(m.path, "model.path"))
        if tokenizer.image_token_id != model.config.image_token_id:
            raise ValueError(f"model.tokenizer: image token {tokenizer.image_token!r} has id "
                             f"{tokenizer.image_token_id}, the model expects {model.config.image_token_id}")
        return model
    if m.source == "parts":
        return VLM.from_parts(_existing(m.vision, "model.vision"), _existing(m.llm, "model.llm"),
                              image_token_id=tokenizer.image_token_id, **model_options(recipe))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return VLM(tiny_config(recipe, tokenizer.vocab_size, tokenizer.image_token_id))


def prepare_stage(model: VLM, stage: Stage, recipe: Recipe, device: torch.device) -> dict:
    """Freeze all but the groups the stage trains, add its adapters/heads; returns the
    stage's runtime settings (precision policy, ...)."""
    if isinstance(model, HFVLM):
        return _prepare_hf_stage(model, stage, recipe, device)
    model.requires_grad_(False)
    tower = model.vision_tower
    if stage.type == "contrastive":
        c = stage.contrastive
        model.add_contrastive_heads(c.embed_dim, c.kind, c.image_pool)
        model.contrastive_heads.to(device)
        model.contrastive_heads.requires_grad_("heads" in stage.lr)
        _unfreeze_tower(tower)
        tower.requires_grad_("vision" in stage.lr)
    elif stage.type == "lm":
        model.language_model.requires_grad_(True)
    elif stage.type == "align":
        if not tower.frozen:
            tower.freeze(torch.bfloat16 if native_bf16(device, recipe) else None)
    else:  # instruct, preference
        _prepare_instruct(model, stage, device)
    model.multi_modal_projector.requires_grad_("connector" in stage.lr)
    model.config.attention_kind = stage.attention_kind or recipe.model.attention_kind
    tower.set_checkpointing(stage.checkpointing.get("vision", "none"))
    model.language_model.set_checkpointing(stage.checkpointing.get("llm", "none"))
    mp = MixedPrecision(stage_precision(stage, recipe, device))
    mp.prepare(model, cast_frozen=stage.type != "contrastive")
    return {"precision": mp}


def stage_precision(stage: Stage, recipe: Recipe, device: torch.device) -> str:
    if stage.precision == "bf16" and not native_bf16(device, recipe):
        return "fp32"  # emulated bf16 on a CPU without it is slower and no more useful
    return stage.precision


def _prepare_hf_stage(model: HFVLM, stage: Stage, recipe: Recipe, device: torch.device) -> dict:
    """The model is loaded in its stored dtype (bf16...), and each stage's precision casts it:
    the weights then have the dtypes they had when the run loaded it in float32. Only the first
    stage's shaping sees the load's dtype, so its QLoRA quantizes from float32 (exact), as then."""
    mp = MixedPrecision(stage_precision(stage, recipe, device))
    if mp.precision == "fp32":  # an fp32 stage runs all of it in float32
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
    first = not getattr(model, "stage_prepared", False)
    shape_hf_stage(model, stage, quantize_from=torch.float32 if first else None)
    model.to(device)
    mp.prepare(model)
    model.stage_prepared = True
    return {"precision": mp}


def _unfreeze_tower(tower) -> None:
    if tower.frozen:
        tower.frozen_dtype = None
        tower.float()
        tower.train()


def _prepare_instruct(model: VLM, stage: Stage, device: torch.device) -> None:
    lora = stage.lora
    if "llm" in stage.lr:
        if stage.finetune == "full":
            model.language_model.requires_grad_(True)
        elif stage.finetune == "lora":
            apply_lora(model.language_model, lora.targets, lora.r, lora.alpha, lora.dropout)
        else:
            apply_qlora(model.language_model, lora.targets, lora.r, lora.alpha, lora.dropout,
                        compute_dtype="bf16" if stage.precision == "bf16" else "fp16")
    if "vision" in stage.lr:
        tower = model.vision_tower
        _unfreeze_tower(tower)
        if stage.finetune == "full" and not lora.vision_blocks:
            tower.requires_grad_(True)
        else:
            n = len(tower.blocks)
            blocks = "|".join(str(i) for i in range(max(0, n - lora.vision_blocks), n))
            names = "|".join(t.strip() for t in lora.vision_targets.split(","))
            apply_lora(tower, rf"blocks\.({blocks})\.(attn|mlp)\.({names})", lora.r, lora.alpha, lora.dropout)
    model.to(device)


def finish_stage(model: VLM, stage: Stage) -> None:
    """What must not outlive the stage: contrastive heads; LoRA (merged into its base; an NF4
    base is dequantized, so the next stage and the saved model hold plain Linears)."""
    if stage.type == "contrastive" and hasattr(model, "contrastive_heads"):
        del model.contrastive_heads
    for part in (model.language_model, model.vision_tower):
        if getattr(part, "lora_config", None) is None:
            continue
        for name, module in list(part.named_modules()):
            if isinstance(module, LoRALinear) and module.quantized:
                set_submodule(part, name, merge_quantized(module))
            elif isinstance(module, LoRALinear):
                module.merge()
                set_submodule(part, name, module.base_layer)
        part.lora_config = None


def stage_model(recipe: Recipe, tokenizer, index: int, run_dir: Path, device: torch.device) -> VLM:
    """The model as stage `index` starts training it, rebuilt without training: the starting
    model, the earlier stages' shaping replayed, the weights a QLoRA stage quantizes restored
    from their source (``load_nf4_source``). Its trained weights come from a checkpoint."""
    model = build_model(recipe, tokenizer, recipe.run.seed).to(device)
    for stage in recipe.stages[:index]:
        prepare_stage(model, stage, recipe, device)
        finish_stage(model, stage)
    load_nf4_source(model, recipe, index, run_dir)
    prepare_stage(model, recipe.stages[index], recipe, device)
    return model


def nf4_source(model: VLM, recipe: Recipe, index: int, run_dir: Path) -> tuple[Path | None, list[str]]:
    """(file, keys) of the weights QLoRA stage `index` quantizes, when they must be kept: an
    earlier stage trained them, so rebuilding the starting model does not give them back.
    (None, []) otherwise."""
    stage = recipe.stages[index]
    keys = quantized_targets(model, stage)
    if not keys or not llm_trained_before(recipe, index):
        return None, []
    return nf4_source_path(Path(run_dir) / "checkpoints", index, stage.name), keys


def save_nf4_source(model: VLM, recipe: Recipe, index: int, run_dir: Path) -> None:
    """Keep the weights QLoRA stage `index` is about to quantize (see nf4_source)."""
    path, keys = nf4_source(model, recipe, index, run_dir)
    if path is not None:
        state = model.state_dict()
        save_tensors(path, {k: state[k] for k in keys})


def load_nf4_source(model: VLM, recipe: Recipe, index: int, run_dir: Path) -> None:
    """Put back the weights QLoRA stage `index` quantized when it first started."""
    path, keys = nf4_source(model, recipe, index, run_dir)
    if path is None:
        return
    if not path.is_file():
        raise ValueError(f"--resume: {path} is missing: stage {recipe.stages[index].name!r} quantizes weights an "
                         "earlier stage trained, and that file holds them as the stage found them")
    tensors = read_tensors(path)
    if sorted(tensors) != sorted(keys):
        raise ValueError(f"--resume: {path} holds other weights than stage {recipe.stages[index].name!r} "
                         "quantizes (was the recipe changed?)")
    with torch.no_grad():
        state = model.state_dict()
        for k, v in tensors.items():
            state[k].copy_(v)


def llm_trained_before(recipe: Recipe, index: int) -> bool:
    """Whether a stage before `index` changes the LLM's weights (so they are not the
    starting model's any more)."""
    return any(s.type == "lm" or (s.type in TUNING_STAGES and "llm" in s.lr) for s in recipe.stages[:index])


def quantized_targets(model: VLM, stage: Stage) -> list[str]:
    """State-dict keys of the weights (and biases) a QLoRA stage quantizes, before it does."""
    if not (stage.type in TUNING_STAGES and stage.finetune == "qlora" and "llm" in stage.lr):
        return []
    lora = stage.lora
    found = resolve_lora_targets(model.language_model, lora.targets, lora.r, lora.alpha, lora.dropout, ())[2]
    llm = next(n for n, m in model.named_modules() if m is model.language_model)
    return [f"{llm}.{name}.{p}" for name, m in found.items() for p, _ in m.named_parameters()]


def trainable_by_group(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{group: (total, trainable)} parameter counts."""
    patterns = model.GROUP_PATTERNS  # fastvlm.VLM's, or a Hugging Face VLM's own
    counts: dict[str, list[int]] = {g: [0, 0] for g in patterns}
    compiled = {g: re.compile(p) for g, p in patterns.items()}
    for name, p in model.named_parameters():
        group = next(g for g, rx in compiled.items() if rx.fullmatch(name))
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)  # NF4 packs two weights per byte
        counts[group][0] += n
        counts[group][1] += n if p.requires_grad else 0
    return {g: (t, tr) for g, (t, tr) in counts.items() if t}


def unsharded(model: VLM, recipe: Recipe, tokenizer, index: int, device: torch.device, run_dir: Path) -> VLM:
    """The FSDP-sharded model of stage `index` as a plain one on every rank (for evaluation,
    merging LoRA and the next stage): the same model rebuilt by replaying the stages' shaping,
    with the gathered weights loaded."""
    full = distributed.full_model_state(model)
    with torch.random.fork_rng():  # replaying must not move the run's random stream
        fresh = stage_model(recipe, tokenizer, index, run_dir, device)
    nf4 = quantized_state_keys(fresh, fresh.state_dict())  # re-quantized by the rebuild, as at the stage's start
    fresh.load_state_dict({k: v for k, v in full.items() if k not in nf4}, strict=not nf4)
    return fresh

