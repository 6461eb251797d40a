"""`fastvlm export RUN OUT --format hf-llava|peft|fastvlm|hf`: a trained model in the formats people serve.

A run of a Hugging Face VLM (``model.source = "hf"``) exports as ``hf`` (its family's own
``save_pretrained`` directory, LoRA merged, the processor beside it) or ``peft`` (an
adapter for its family's class): fastvlm.train.hf_export. The rest of this docstring is
about fastvlm.VLM runs:

- ``hf-llava``: a directory ``transformers.LlavaForConditionalGeneration.from_pretrained``
  loads with the same logits (LoRA merged; fastvlm.models.hf_export holds the mapping),
  the tokenizer files, a processor config (``AutoProcessor`` gives a ``LlavaProcessor``
  whose image processor produces fastvlm's pixel values and expands each image token as
  fastvlm does) and ``chat_template.jinja``: the run's prompt template
  (fastvlm.data.chat_jinja), so ``processor.apply_chat_template`` renders what training did.
- ``peft``: OUT is a PEFT LoRA adapter for ``LlavaForConditionalGeneration``
  (``PeftModel.from_pretrained(llava, OUT)``): every LoRA layer (LLM and vision tower)
  under transformers' names, the connector in ``modules_to_save`` when the adapter's stage
  trained it or it differs from the base, and ``base_model_name_or_path`` naming the base
  the adapter applies to: the run's HF LLaVA directory (``model.source = "pretrained"``)
  when its weights are still the model's base, else ``OUT/base``, an hf-llava export of the
  base written with the adapter (``parts`` and ``tiny`` runs, or a base an earlier stage
  trained). ``AutoPeftModel.from_pretrained(OUT)`` loads base and adapter in one call.
  OUT holds the tokenizer and processor files too.
- ``fastvlm``: the native directory (``VLM.save_pretrained``), LoRA merged.

RUN is a run directory (its ``final/`` model; for ``peft`` its newest complete checkpoint,
which still holds the adapters final/ has merged), one checkpoint directory (see
fastvlm.train.checkpoint.load_for_inference), RUN/final (exported as RUN), or a bare
fastvlm / HF LLaVA model directory (its tokenizer read from tokenizer/ or beside it).
Each export is built in a temporary folder beside OUT and renamed to OUT once complete:
a failed export leaves no OUT behind.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import uuid
from collections import Counter
from pathlib import Path

import torch

from fastvlm.data import load_tokenizer
from fastvlm.data.chat_jinja import chat_template_of
from fastvlm.data.tokenizer import CHAT_TEMPLATE_FILE
from fastvlm.models.hf_export import (
    added_token_ids,
    check_exportable,
    image_processor_config,
    merged_state_dict,
    processor_config,
    to_hf_llava,
)
from fastvlm.models.llm import load_state_dict
from fastvlm.models.vlm import VLM, VLMConfig, _from_hf_llava
from fastvlm.train import checkpoint as ckpt
from fastvlm.train import peft_llava
from fastvlm.train.build import stage_model
from fastvlm.train.distributed import load_model_from_dcp
from fastvlm.train.hf_export import export_hf_run, load_hf_run
from fastvlm.train.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, LoRAConfig, apply_lora, lora_layers
from fastvlm.train.recipe import load_recipe
from fastvlm.train.stage_data import preprocessor_for
from fastvlm.utils.io import atomic_write, atomic_write_text, read_json

FORMATS = ("hf-llava", "peft", "fastvlm", "hf")
HF_RUN_FORMATS = ("hf", "peft")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {format!r}")


def export(run_or_checkpoint, out, format: str = "hf-llava", *, allow_causal: bool = False,
           dtype: torch.dtype | None = None) -> Path:
    """Export a run or checkpoint; returns the output directory."""

    _check_format(format)
    source = Path(run_or_checkpoint)
    if not source.exists():
        raise ValueError(f"run: {source} does not exist (expected a run directory, one of its checkpoints, or a "
                         "model directory such as RUN/final)")
    if source.name == "final" and (source.parent / "recipe.toml").is_file():
        source = source.parent  # its run: the tokenizer, the template and (peft) the unmerged adapters
    if not any((source / name).is_file() for name in ("recipe.toml", "meta.json", "config.json")):
        raise ValueError(f"run: {source} is neither a run directory (recipe.toml), a checkpoint (meta.json) nor a "
                         "model directory (config.json)")
    hf_run = _hf_run_dir(source)
    if hf_run is not None:
        if format not in HF_RUN_FORMATS:
            raise ValueError(f"format: a Hugging Face VLM run (model.source = 'hf') exports as "
                             f"{' or '.join(HF_RUN_FORMATS)}, got {format!r}")
        _check_dtype(dtype)
        recipe = load_recipe(hf_run / "recipe.toml")
        return _into_new_dir(out, lambda tmp, final: export_hf_run(source, hf_run, recipe, tmp, final, format,
                                                                    dtype))
    if format == "hf":
        raise ValueError(f"format: 'hf' exports a Hugging Face VLM run (model.source = 'hf'); {source} is not one "
                         "(use hf-llava, peft or fastvlm)")
    if (source / "config.json").is_file() and not (source / "recipe.toml").is_file() and \
            not (source / "meta.json").is_file():
        model, tokenizer = _load_model_dir(source)  # a bare model directory
        options = {}
    else:
        if format == "peft" and not ckpt.NAME.match(source.name):
            found = ckpt.complete_checkpoints(source / "checkpoints")
            if not found:
                raise ValueError(f"run: {source} holds no complete checkpoint; final/ has its LoRA merged, so "
                                 "there is no adapter to export (use --format hf-llava or fastvlm)")
            source = found[-1]
        model, tokenizer, recipe = load_for_inference(source)
        options = {"template": recipe.data.template}
        if format == "peft":
            stage = recipe.stages[read_json(source / "meta.json", "run")["stage_index"]]
            options.update(base=_recipe_base(recipe),
                           trained=("multi_modal_projector",) if "connector" in stage.lr else ())
    return export_model(model, out, format, tokenizer=tokenizer, preprocessor=preprocessor_for(model),
                        allow_causal=allow_causal, dtype=dtype, **options)


def _hf_run_dir(source: Path) -> Path | None:
    """The run directory of `source` (a run or one of its checkpoints) when its recipe
    trains a Hugging Face VLM, else None."""
    run_dir = source.parent.parent if ckpt.NAME.match(source.name) else source
    if not (run_dir / "recipe.json").is_file():
        return None
    recipe = read_json(run_dir / "recipe.json", "run")["recipe"]
    return run_dir if recipe["model"]["source"] == "hf" else None


def _recipe_base(recipe) -> Path | None:
    """The run's starting model directory (source = "pretrained"), if it is still there."""
    m = recipe.model
    path = Path(m.path).expanduser()
    return path if m.source == "pretrained" and (path / "config.json").is_file() else None


def _load_model_dir(path: Path):
    """A fastvlm or HF LLaVA directory, with its tokenizer beside it (tokenizer/ or the dir itself) if any."""

    model = VLM.from_pretrained(path).eval()
    for folder in (path / "tokenizer", path):
        if (folder / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(folder)
            if tokenizer.image_token_id == model.config.image_token_id:
                return model, tokenizer
    return model, None


def export_model(model, out, format: str = "hf-llava", *, tokenizer=None, preprocessor=None, template=None,
                 base=None, trained=(), allow_causal: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Export a live VLM to the new directory `out` (refused if it exists and is not empty).

    `tokenizer` (fastvlm.data Tokenizer) and `preprocessor` (ImagePreprocessor) go beside
    an hf-llava or peft export; `template` (a fastvlm.data template name or Template) is
    written as their chat template (default: the tokenizer's own, if any). peft only:
    `base`, the HF LLaVA directory the model started from (named as the adapter's base
    while the model's base weights equal it, its connector aside), and `trained`, the
    fastvlm modules the adapter carries whole (e.g. ``("multi_modal_projector",)``)."""
    _check_format(format)
    if format == "hf":
        raise ValueError("format: 'hf' exports a Hugging Face VLM run (export(RUN, OUT, 'hf')), not a fastvlm.VLM")
    _check_dtype(dtype)

    def write(tmp: Path, final: Path) -> None:
        if format == "hf-llava":
            _export_hf_llava(model, tmp, tokenizer, preprocessor, template, allow_causal, dtype)
        elif format == "peft":
            _export_peft(model, tmp, final, tokenizer, preprocessor, template, base, trained, allow_causal, dtype)
        else:
            _export_fastvlm(model, tmp, dtype)

    return _into_new_dir(out, write)


def _check_dtype(dtype) -> None:
    if dtype is not None and dtype not in HF_DTYPE_NAMES:
        raise ValueError(f"dtype: expected one of {sorted(map(str, HF_DTYPE_NAMES))}, got {dtype}")


def _into_new_dir(out, write) -> Path:
    """``write(tmp, final)`` fills a temporary folder beside `out` (`final`: the path it is
    renamed to once complete); a failed export leaves no `out` behind."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out: {out} exists and is not an empty directory; export into a new one")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{uuid.uuid4().hex}-{out.name}"
    tmp.mkdir()
    try:
        write(tmp, out.resolve())
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _cast(state: dict, dtype: torch.dtype | None) -> dict:
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _save_tensors(path: Path, state: dict) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda p: save_file(state, p, metadata={"format": "pt"}))


def _write_json(path: Path, value: dict) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def _export_hf_llava(model, out: Path, tokenizer, preprocessor, template, allow_causal: bool, dtype,
                     merge_lora: bool = True) -> None:
    token_ids, vocab = {}, model.config.llm.vocab_size
    if tokenizer is not None:
        _check_tokenizer(model, tokenizer)
        token_ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id}
        vocab = max(vocab, tokenizer.vocab_size)
    vocab = max(vocab, model.config.image_token_id + 1)
    config, state = to_hf_llava(model, allow_causal=allow_causal, token_ids=token_ids, vocab_size=vocab,
                                merge_lora=merge_lora)
    dtype = dtype or model.language_model.model.embed_tokens.weight.dtype
    config["dtype"] = HF_DTYPE_NAMES[dtype]
    _save_tensors(out / "model.safetensors", _cast(state, dtype))
    _write_json(out / "config.json", config)
    generation = {k: v for k, v in token_ids.items() if v is not None}
    added = added_token_ids(model, vocab)
    if added:  # their logits are 0, not -inf: never let generation pick them
        generation["suppress_tokens"] = added
    _write_json(out / "generation_config.json", generation)
    _write_processor(model, out, tokenizer, preprocessor, template)


def _write_processor(model, out: Path, tokenizer, preprocessor, template) -> None:
    """Tokenizer files, chat_template.jinja (`template` as Jinja, else the tokenizer's own) and
    the LlavaProcessor / image processor configs."""
    if tokenizer is not None:
        if template is not None:
            tokenizer = copy.copy(tokenizer)  # the caller's keeps its own chat template
            tokenizer.chat_template = chat_template_of(template, tokenizer)
        tokenizer.save(out)
        if tokenizer.chat_template:  # where transformers 5 reads it (tokenizer and processor)
            atomic_write_text(out / CHAT_TEMPLATE_FILE, tokenizer.chat_template)
        _write_json(out / "processor_config.json", processor_config(model, tokenizer.image_token))
    if preprocessor is not None:
        _write_json(out / "preprocessor_config.json", image_processor_config(preprocessor, model.config.vision.family))


def _check_tokenizer(model, tokenizer) -> None:
    if tokenizer.image_token_id != model.config.image_token_id:
        raise ValueError(f"tokenizer: its image token {tokenizer.image_token!r} has id {tokenizer.image_token_id}, "
                         f"the model's image_token_id is {model.config.image_token_id}")


def _export_fastvlm(model, out: Path, dtype) -> None:

    plain = VLM(model.config)
    state = {k: v for k, v in merged_state_dict(model).items() if not k.startswith("contrastive_heads.")}
    plain.load_state_dict(state)
    if dtype is not None:
        plain.to(dtype)
    plain.save_pretrained(out)


def _export_peft(model, out: Path, final: Path, tokenizer, preprocessor, template, base, trained,
                 allow_causal: bool, dtype) -> None:
    """The adapter into `out` (to be renamed `final`), and the base into out/base unless `base` is it."""
    check_exportable(model, allow_causal)
    trained = list(trained)
    differing = _differing_from(model, base) if base is not None else None
    if differing is not None and all(n.startswith("multi_modal_projector.") for n in differing):
        if differing and "multi_modal_projector" not in trained:
            trained.append("multi_modal_projector")  # trained since: the adapter carries it
    else:
        base = None  # no HF LLaVA base holds the model's base weights: write one
    tensors, config = _peft_adapter(model, trained)
    if base is None:
        (out / "base").mkdir()
        _export_hf_llava(model, out / "base", tokenizer, preprocessor, template, allow_causal, dtype,
                         merge_lora=False)
        base = final / "base"
    config["base_model_name_or_path"] = str(Path(base).resolve())
    _save_tensors(out / ADAPTER_WEIGHTS, _cast(tensors, dtype))
    _write_json(out / ADAPTER_CONFIG, config)
    _write_processor(model, out, tokenizer, preprocessor, template)


def _differing_from(model, base) -> list[str] | None:
    """The model's base weights (LoRA layers' own) that differ from HF LLaVA directory `base`
    (compared in the model's dtype); None when `base` is not an HF LLaVA directory."""

    raw = read_json(Path(base) / "config.json", "base")
    if raw.get("model_type") != "llava":
        return None
    weights = load_state_dict(Path(base))
    with torch.device("meta"):  # only the renamed weights are wanted, not a model
        _, reference = _from_hf_llava(raw, weights)
    ours = merged_state_dict(model, merge_lora=False)
    return sorted(k for k, v in ours.items() if k not in reference or reference[k].shape != v.shape
                  or not torch.equal(reference[k].to(v.dtype), v.detach().cpu()))


def _peft_adapter(model, trained: list[str]) -> tuple[dict, dict]:
    """(adapter_model.safetensors tensors, adapter_config.json) of every LoRA layer in the VLM
    (wherever apply_lora put them) and the modules `trained`, under transformers' LLaVA names.
    Layers with another rank or alpha than most get PEFT's rank_pattern / alpha_pattern."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model: has no LoRA adapters (its last stage trained none, or they were merged); use "
                         "--format hf-llava or fastvlm")
    if len({layer.rslora for layer in layers.values()}) > 1:
        raise ValueError("model: some LoRA layers use rsLoRA and some do not; a PEFT adapter has one use_rslora")
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.lora_A.weight"] = layer.lora_A.detach()
        tensors[f"{name}.lora_B.weight"] = layer.lora_B.detach()
    for module in trained:
        for name, p in model.get_submodule(module).named_parameters():
            tensors[f"{module}.{name}"] = p.detach()
    renamed, targets, modules = peft_llava.to_hf(model, tensors, trained)
    (r, alpha), _ = Counter((layer.r, layer.alpha) for layer in layers.values()).most_common(1)[0]
    first = next(iter(layers.values()))
    config = LoRAConfig(r, alpha, dropout=getattr(first.dropout, "p", 0.0), targets=targets, trainable=modules,
                        rslora=first.rslora).to_peft()
    other = {re.escape(peft_llava.module_to_hf(n, model)): layer for n, layer in layers.items()
             if (layer.r, layer.alpha) != (r, alpha)}
    config.update(modules_to_save=modules or None, rank_pattern={k: v.r for k, v in other.items()},
                  alpha_pattern={k: v.alpha for k, v in other.items()},
                  auto_mapping={"base_model_class": "LlavaForConditionalGeneration", "parent_library": "transformers"})
    return {PEFT_PREFIX + k: v.contiguous().cpu() for k, v in renamed.items()}, config


def load_for_inference(run_or_checkpoint) -> tuple:
    """(model, tokenizer, recipe) of a run directory (RUN/final if written, else its newest
    complete checkpoint) or of one checkpoint directory; LoRA layers come back as trained.
    A Hugging Face VLM run's: (HFVLM, its RunProcessor, recipe)."""
    path = Path(run_or_checkpoint)
    if not path.exists():
        raise ValueError(f"run_or_checkpoint: {path} does not exist")
    run_dir = path.parent.parent if ckpt.NAME.match(path.name) else path
    recipe = load_recipe(run_dir / "recipe.toml")
    if _hf_run_dir(path) is not None:  # a Hugging Face VLM run: its model and processor (the "tokenizer")
        return (*load_hf_run(path, run_dir, recipe), recipe)
    tokenizer = load_tokenizer(run_dir / "tokenizer", image_token=recipe.model.image_token)
    if not ckpt.NAME.match(path.name):
        if (path / "final" / "config.json").is_file():
            return VLM.from_pretrained(path / "final"), tokenizer, recipe
        found = ckpt.complete_checkpoints(path / "checkpoints")
        if not found:
            raise ValueError(f"run_or_checkpoint: {path} holds neither final/ nor a complete checkpoint")
        path = found[-1]
    lora = json.loads((path / "lora.json").read_text())
    if lora.get("llm_nf4"):  # a QLoRA stage's: its NF4 base is re-quantized from the run's source
        with torch.random.fork_rng():
            model = stage_model(recipe, tokenizer, json.loads((path / "meta.json").read_text())["stage_index"],
                                run_dir, torch.device("cpu"))
        if (path / "dcp").is_dir():
            load_model_from_dcp(path / "dcp", model)
        else:
            ckpt.load_weights(path / "model.safetensors", model)
        return model.eval(), tokenizer, recipe
    model = VLM(VLMConfig.from_dict(json.loads((path / "config.json").read_text())["config"]))
    for part, attr in (("llm", "language_model"), ("vision", "vision_tower")):
        if lora.get(part):
            cfg = LoRAConfig(**lora[part])
            apply_lora(getattr(model, attr), cfg.targets, cfg.r, cfg.alpha, cfg.dropout, cfg.trainable, cfg.rslora)
    if (path / "dcp").is_dir():  # a distributed run's: the weights of its sharded model
        load_model_from_dcp(path / "dcp", model)
        return model.eval(), tokenizer, recipe
    ckpt.load_weights(path / "model.safetensors", model, skip=lambda key: key.startswith("contrastive_heads."))
    return model.eval(), tokenizer, recipe
