"""Export of a Hugging Face VLM run (``model.source = "hf"``) back to its family's own format.

- ``hf``: OUT is the family's ``save_pretrained`` directory with the LoRA merged (the run's
  final/ model, or a checkpoint's model with its stage's adapters folded in), the processor
  and its chat template beside it: ``AutoModelForImageTextToText.from_pretrained(OUT)`` and
  ``AutoProcessor.from_pretrained(OUT)`` load the trained model. Its weights are in the base
  model's own dtype (``base_dtype``: ``dtype`` / ``torch_dtype`` of ``model.path``'s
  config.json, e.g. bfloat16 for Qwen and Gemma 3, float16 for llava-hf's; float32 where it names none or is
  gone), unless ``--dtype`` says otherwise.
- ``peft``: OUT is a PEFT LoRA adapter of the newest checkpoint (or the one given), whose
  stage still holds its adapters: ``adapter_config.json`` and ``adapter_model.safetensors``
  at the top of OUT, every LoRA layer under transformers' module names (float32 unless
  ``--dtype``), the trained projector in ``modules_to_save`` (its modules: PEFT wraps each
  in place of the original, so a container without a forward of its own, such as Qwen3-VL's
  ``deepstack_merger_list``, is given by its items), and ``base_model_name_or_path``
  naming the base: the run's ``model.path`` when the checkpoint's weights outside those
  modules and the adapters are still its own, else ``OUT/base``, written beside the adapter
  in the base's dtype as for ``hf`` (the base an earlier stage trained, or a connector
  parameter no module holds alone, which ``modules_to_save`` cannot carry: LLaVA-NeXT /
  OneVision's ``image_newline``, once its stage trained it; left out, and the base
  ``model.path``, while it is the base's value). ``PeftModel.from_pretrained(<family
  class>.from_pretrained(BASE), OUT)`` gives the trained model (for a QLoRA stage, whose base
  was NF4, the base in full precision).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from fastvlm.integrations.hf_load import config_dtype, load_patched, stored_dtype
from fastvlm.integrations.hf_trainable import HFVLM
from fastvlm.nn.lora import dequantized_weight, lora_layers
from fastvlm.train import checkpoint as ckpt
from fastvlm.train.build import finish_stage, stage_model
from fastvlm.train.distributed import load_model_from_dcp
from fastvlm.train.hf_build import RunProcessor
from fastvlm.train.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, LoRAConfig
from fastvlm.train.quant import quantized_state_keys
from fastvlm.train.recipe import Recipe
from fastvlm.utils.io import read_json


def run_processor(recipe: Recipe) -> RunProcessor:
    return RunProcessor.of_recipe(recipe)


def base_dtype(recipe: Recipe) -> torch.dtype:
    """The dtype the base model's config.json records (hf_load.config_dtype: ``dtype`` or
    ``torch_dtype``, the text config's where the top level has none), float32 where it
    records none or ``model.path`` is gone: what an export defaults to."""
    file = Path(recipe.model.path).expanduser() / "config.json"
    config = read_json(file, "model.path") if file.is_file() else {}
    try:
        return config_dtype(config) or torch.float32
    except ValueError as err:
        raise ValueError(f"model.path: {file} names {err} (pass --dtype)") from None


def checkpoint_model(recipe: Recipe, run_dir: Path, checkpoint: Path) -> tuple[HFVLM, int]:
    """The model of `checkpoint` (its stage's shaping replayed, adapters as trained), on CPU."""
    index = read_json(checkpoint / "meta.json", "checkpoint")["stage_index"]
    with torch.random.fork_rng():
        model = stage_model(recipe, None, index, run_dir, torch.device("cpu"))
    if (checkpoint / "dcp").is_dir():  # a distributed run's: the weights of its sharded model, of any world size
        load_model_from_dcp(checkpoint / "dcp", model)
    else:
        ckpt.load_weights(checkpoint / "model.safetensors", model)
    return model.eval(), index


def load_hf_run(source: Path, run_dir: Path, recipe: Recipe) -> tuple[HFVLM, RunProcessor]:
    """(model, processor) of a Hugging Face VLM run for inference (``fastvlm eval``): RUN/final
    when `source` is the run directory and it is written, else the checkpoint `source` (or the
    run's newest) with its stage's adapters as trained."""
    if not ckpt.NAME.match(source.name) and (run_dir / "final" / "config.json").is_file():
        final = run_dir / "final"  # in the dtype it is stored in (float32 where it mixes dtypes)
        model = HFVLM(load_patched(final, stored_dtype(final))).eval()
    else:
        model, _ = checkpoint_model(recipe, run_dir, source if ckpt.NAME.match(source.name) else _newest(run_dir))
    return model, run_processor(recipe)


def export_hf_run(source: Path, run_dir: Path, recipe: Recipe, out: Path, final: Path, format: str,
                  dtype: torch.dtype | None) -> None:
    """Write `format` ("hf" | "peft") of run `run_dir` (or its checkpoint `source`) into the
    empty directory `out`, which is renamed to `final` once complete."""
    processor = run_processor(recipe)
    checkpoint = source if ckpt.NAME.match(source.name) else None
    if format == "hf":
        if checkpoint is None and (run_dir / "final" / "config.json").is_file():
            hf = load_patched(run_dir / "final", dtype or base_dtype(recipe))
        else:
            checkpoint = checkpoint or _newest(run_dir)
            model, index = checkpoint_model(recipe, run_dir, checkpoint)
            finish_stage(model, recipe.stages[index])  # the adapters folded in (an NF4 base dequantized)
            hf = model.hf.to(dtype or base_dtype(recipe))
        hf.save_pretrained(out)
    else:
        model, index = checkpoint_model(recipe, run_dir, checkpoint or _newest(run_dir))
        tensors, config = peft_adapter(model)
        base = Path(recipe.model.path).expanduser()
        if _base_differs(model, base, config["modules_to_save"] or []):
            bare = _without_adapters(model).to(dtype or base_dtype(recipe))
            bare.save_pretrained(out / "base")
            processor.save(out / "base")
            base = final / "base"
        config["base_model_name_or_path"] = str(base.resolve())
        save_file({k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in tensors.items()},
                  str(out / ADAPTER_WEIGHTS))
        (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    processor.save(out)


def _newest(run_dir: Path) -> Path:
    found = ckpt.complete_checkpoints(run_dir / "checkpoints")
    if not found:
        raise ValueError(f"run: {run_dir} holds no complete checkpoint")
    return found[-1]


def _hf_name(model: HFVLM, name: str) -> str:
    """A module or parameter name of `model` as the transformers model names it."""
    prefix = next(n for n, m in model.named_modules() if m is model.hf) + "."
    return name.removeprefix(prefix)


# PEFT refuses these in modules_to_save (its wrapper stands in for the module, so it calls its
# forward; a container has none of its own): their items are named instead
CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def connector_modules(model: HFVLM) -> list[str]:
    """The outermost modules (transformers' names), containers aside, holding only connector
    parameters: what modules_to_save carries. A connector parameter outside all of them (a
    bare parameter of a larger module) is not in the adapter: the export compares it with the
    base's and writes a base of its own when it differs (``_base_differs``)."""
    connector = re.compile(model.GROUP_PATTERNS["connector"])
    params = {n for n, _ in model.named_parameters() if connector.fullmatch(n)}
    found = []
    for name, module in model.named_modules():  # parents before their children
        own = {f"{name}.{n}" for n, _ in module.named_parameters()}
        if name and own and own <= params and not isinstance(module, CONTAINERS) and \
                not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return [_hf_name(model, n) for n in found]


def peft_adapter(model: HFVLM) -> tuple[dict, dict]:
    """(adapter_model.safetensors tensors, adapter_config.json) of the model's LoRA layers
    and its projector (see the module docstring)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("run: the checkpoint's stage trained no LoRA adapter (final/ has them merged); use "
                         "--format hf")
    shapes = {(layer.r, layer.alpha, layer.rslora) for layer in layers.values()}
    if len(shapes) > 1:
        raise ValueError(f"model: LoRA layers of several ranks / alphas {sorted(shapes)}; one adapter has one")
    (r, alpha, rslora), = shapes
    tensors = {}
    for name, layer in layers.items():
        hf = _hf_name(model, name)
        tensors[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = layer.lora_A.detach().float().cpu()
        tensors[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = layer.lora_B.detach().float().cpu()
    modules = connector_modules(model)
    for module in modules:
        for name, p in model.hf.get_submodule(module).named_parameters():
            tensors[f"{PEFT_PREFIX}{module}.{name}"] = p.detach().float().cpu()
    first = next(iter(layers.values()))
    config = LoRAConfig(r, alpha, dropout=getattr(first.dropout, "p", 0.0),
                        targets=sorted(_hf_name(model, n) for n in layers), trainable=modules, rslora=rslora).to_peft()
    config["auto_mapping"] = {"base_model_class": type(model.hf).__name__, "parent_library": "transformers"}
    return tensors, config


def _base_weights(model: HFVLM) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' names with each LoRA layer's base (dequantized
    where NF4) in its place."""
    state = model.hf.state_dict()
    nf4 = quantized_state_keys(model.hf, state)
    out = {k: v for k, v in state.items() if k not in nf4 and ".lora_" not in k}
    for name, layer in lora_layers(model.hf).items():
        if layer.quantized:
            out[f"{name}.base_layer.weight"] = dequantized_weight(layer.base_layer)
    return {re.sub(r"\.base_layer\.", ".", k): v for k, v in out.items()}


def _base_differs(model: HFVLM, base: Path, trained: list[str]) -> bool:
    """Whether a weight outside `trained` modules differs from directory `base`'s (or `base`
    is gone): the adapter then needs a base of its own. An NF4 base is compared after
    quantization only when it is the directory's (the adapter applies to the full-precision one)."""
    if not (base / "config.json").is_file():
        return True
    # by transformers' own loading: a checkpoint may store older key names (Qwen2-VL's do)
    reference = type(model.hf).from_pretrained(base, dtype=stored_dtype(base)).state_dict()
    quantized = {f"{n}.weight" for n, m in lora_layers(model.hf).items() if m.quantized}
    for key, value in _base_weights(model).items():
        if any(key.startswith(t + ".") for t in trained) or key in quantized:
            continue
        ref = reference.get(key)
        if ref is None or ref.shape != value.shape or not torch.equal(ref.to(value.dtype), value.cpu()):
            return True
    return False


def _without_adapters(model: HFVLM):
    """The transformers model with each LoRA layer's base in its place (the adapter's base)."""
    with torch.device("meta"):
        bare = type(model.hf)(model.hf.config)
    bare.load_state_dict(_base_weights(model), strict=True, assign=True)
    return bare
