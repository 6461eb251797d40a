"""A fastvlm.VLM's adapters under transformers' LLaVA names, both ways.

PEFT matches module names, and a fastvlm.VLM names its modules its own way
(``vision_tower.blocks.0.attn.q_proj`` is transformers'
``model.vision_tower.encoder.layers.0.self_attn.q_proj``). ``save_adapter`` on a VLM
therefore writes the names ``LlavaForConditionalGeneration`` has (the 5.x module
layout), with target_modules and modules_to_save as explicit module names: a suffix
or a regex over fastvlm's names would pick other modules there. ``load_adapter``
reads adapters under those names, the 4.x layout, or fastvlm's own; the adapted
modules are the ones the weights name. A module that has no counterpart, or a
trained module whose parameters are not one module on the other side, is a
ValueError, never a partial load. The names come from fastvlm.models.llava_names,
the table VLM.from_pretrained converts checkpoints with.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from fastvlm.models import llava_names
from fastvlm.models.vlm import VLM
from fastvlm.nn.lora import lora_layers

LORA_SUFFIX = re.compile(r"\.lora_[AB]\.weight$")


def module_to_hf(module: str, model) -> str:
    """A VLM module's name in transformers' LLaVA (5.x layout)."""
    return llava_names.to_hf(module + ".weight", model.config.vision, model.config.connector)[:-len(".weight")]


def _common_module(names: list[str]) -> str:
    """The deepest module holding every parameter in `names`."""
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _hf_or_none(name: str, model) -> str | None:
    try:
        return llava_names.to_hf(name, model.config.vision, model.config.connector)
    except KeyError:
        return None


def _translate(name: str, model, what: str) -> str:
    theirs = _hf_or_none(name, model)
    if theirs is None:
        raise ValueError(f"{what}: fastvlm parameter {name!r} has no transformers LLaVA name")
    return theirs


def to_hf(model, tensors: dict[str, torch.Tensor], trainable: list[str]) -> tuple[dict, list[str], list[str]]:
    """(tensors under HF names, HF target_modules, HF modules_to_save) of a VLM's adapter.
    `tensors` are keyed by fastvlm names (no PEFT prefix)."""
    targets = sorted(module_to_hf(n, model) for n in lora_layers(model))
    params = dict(model.named_parameters())
    hf_of_all = {n: h for n in params if (h := _hf_or_none(n, model)) is not None}
    modules = []
    vision_root = llava_names.HF5_PARTS["vision"]
    for name in trainable:
        own = [n for n in params if n.startswith(name + ".")]
        module = _common_module([_translate(n, model, "trainable") for n in own])
        covered = sorted(n for n, h in hf_of_all.items() if h.startswith(module + ".") and n not in own)
        # transformers' vision tower holds parameters fastvlm's lacks (final norm, pooling head)
        if not module or covered or vision_root.startswith(module + "."):
            raise ValueError(f"trainable: fastvlm module {name!r} is not one module in transformers' LLaVA "
                             f"(its parameters lie under {module or 'the whole model'!r}"
                             f"{', with ' + repr(covered[:3]) if covered else ''}); PEFT could not load it")
        modules.append(module)
    renamed = {}
    for key, tensor in tensors.items():
        lora = LORA_SUFFIX.search(key)
        renamed[module_to_hf(key[:lora.start()], model) + lora.group() if lora
                else _translate(key, model, "trainable")] = tensor
    return renamed, targets, modules


def _from_hf_name(name: str, model, own: set[str]) -> str:
    """`name` as is where the model has it, else read as a transformers LLaVA name."""
    if name in own:
        return name
    try:
        ours = llava_names.from_hf(name, model.config.vision, model.config.connector)
    except KeyError:
        ours = None
    if ours is None:
        raise ValueError(f"adapter: {name!r} is neither a fastvlm.VLM name nor a transformers LLaVA name "
                         "with a fastvlm counterpart")
    return ours


def from_hf(model, tensors: dict[str, torch.Tensor], modules_to_save: list[str]):
    """(tensors under fastvlm names, adapted module names, trained module names) of an
    adapter saved for transformers' LLaVA (either layout) or for the VLM itself.
    `tensors` are keyed without PEFT's prefix and adapter name."""
    module_weights = {n + ".weight" for n, _ in model.named_modules()}  # LoRA keys name modules
    params = dict(model.named_parameters())
    renamed, targets, trained = {}, set(), {}
    for key, tensor in tensors.items():
        lora = LORA_SUFFIX.search(key)
        if lora:
            module = key[:lora.start()]
            ours = _from_hf_name(module + ".weight", model, module_weights)[:-len(".weight")]
            targets.add(ours)
            renamed[ours + lora.group()] = tensor
            continue
        ours = _from_hf_name(key, model, set(params))
        renamed[ours] = tensor
        saved_as = _saved_module(key, modules_to_save)
        trained.setdefault(saved_as, []).append(ours)
    modules = []
    for saved_as, ours in trained.items():
        module = _common_module(ours)
        held = sorted(n for n in params if n.startswith(module + "."))
        if not module or held != sorted(ours):
            raise ValueError(f"adapter: trained module {saved_as!r} is not one module of fastvlm.VLM (its "
                             f"parameters map to {sorted(ours)[:3]}...; the module {module!r} holds "
                             f"{held[:3]}...)")
        modules.append(module)
    return renamed, sorted(targets), modules


def _saved_module(key: str, modules_to_save: list[str]) -> str:
    """The modules_to_save module a trained parameter belongs to (PEFT's suffix match)."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if any(prefix.endswith(t) for t in modules_to_save):
            return prefix
    raise ValueError(f"adapter: {key!r} is neither a LoRA weight nor in a module of modules_to_save "
                     f"{modules_to_save}")


def is_vlm(model: nn.Module) -> bool:
    return isinstance(model, VLM)
