"""LoRA adapters for any nn.Module, saved and loaded in PEFT's file format.

``apply_lora`` swaps targeted ``nn.Linear`` layers for ``LoRALinear`` (frozen
base + trainable low-rank A, B), freezes everything else except the modules
named ``trainable`` (e.g. the connector), and records the configuration on the
model so ``save_adapter`` can write PEFT's ``adapter_config.json`` and
``adapter_model.safetensors`` (keys ``base_model.model.<path>.lora_A.weight``),
which ``peft.PeftModel.from_pretrained`` loads on the same architecture. A
fastvlm.VLM's adapters are written under transformers' LLaVA names and read from
them (fastvlm.train.peft_llava), so they load on ``LlavaForConditionalGeneration``
and back. On a VLM, ``llm=`` / ``vision=`` pick layers inside one part.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from fastvlm.nn.lora import LoRALinear, check_rank_and_dropout, lora_layers, set_submodule  # noqa: F401
from fastvlm.train import peft_llava
from fastvlm.utils.io import atomic_write

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_SUFFIX_LIST = re.compile(r"^[\w.]+(\s*,\s*[\w.]+)*$")


@dataclass
class LoRAConfig:
    r: int
    alpha: float
    dropout: float = 0.0
    targets: list[str] | str = field(default_factory=list)  # suffix list, or a full-match regex
    trainable: list[str] = field(default_factory=list)  # modules trained fully (PEFT's modules_to_save)
    rslora: bool = False

    def to_peft(self) -> dict:
        """The adapter_config.json PEFT reads (fields it needs; the rest take PEFT's defaults)."""
        return {"peft_type": "LORA", "task_type": None, "r": self.r, "lora_alpha": self.alpha,
                "lora_dropout": self.dropout, "target_modules": self.targets, "bias": "none",
                "use_rslora": self.rslora, "fan_in_fan_out": False,
                "modules_to_save": list(self.trainable) or None, "inference_mode": True,
                "init_lora_weights": True, "base_model_name_or_path": None}

    @classmethod
    def from_peft(cls, cfg: dict) -> "LoRAConfig":
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"adapter_config.json: peft_type {cfg.get('peft_type')!r} is not LORA")
        unsupported = {k: cfg[k] for k in ("rank_pattern", "alpha_pattern", "layers_to_transform",
                                           "layers_pattern", "use_dora", "fan_in_fan_out", "lora_bias",
                                           "exclude_modules", "target_parameters",
                                           "trainable_token_indices", "layer_replication") if cfg.get(k)}
        if cfg.get("bias", "none") != "none":
            unsupported["bias"] = cfg["bias"]
        if unsupported:
            raise ValueError(f"adapter_config.json: unsupported PEFT options {unsupported}")
        return cls(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
                   targets=cfg["target_modules"], trainable=list(cfg.get("modules_to_save") or []),
                   rslora=bool(cfg.get("use_rslora", False)))


def parse_targets(targets, arg: str = "targets") -> list[str] | str:
    """A list of name suffixes, or one full-match regex (PEFT's two forms).

    A string of identifiers, dots and commas ("q_proj,v_proj") is a suffix list;
    any other string is a regex.
    """
    if isinstance(targets, str):
        if _SUFFIX_LIST.match(targets.strip()):
            return [t.strip() for t in targets.split(",")]
        try:
            re.compile(targets)
        except re.error as e:
            raise ValueError(f"{arg}: invalid regex {targets!r}: {e}") from None
        return targets
    targets = list(targets or [])
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"{arg}: expected a regex or a non-empty list of module names, got {targets!r}")
    return targets


def name_matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _match_modules(model: nn.Module, targets, arg: str) -> dict[str, nn.Module]:
    """Named modules matched by `targets`; every list entry must match something."""
    found = {n: m for n, m in model.named_modules() if n and name_matches(n, targets)}
    entries = [targets] if isinstance(targets, str) else targets
    for t in entries:
        if not any(name_matches(n, [t] if isinstance(targets, list) else t) for n in found):
            raise ValueError(f"{arg}: no module of {type(model).__name__} is named {t!r} "
                             f"(names look like {_example_names(model)})")
    return found


def _example_names(model: nn.Module, k: int = 4) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:k]
    return ", ".join(repr(n) for n in names) or "no nn.Linear found"


# The names a VLM's parts go by: fastvlm.VLM, transformers' LLaVA (4.x and 5.x layouts),
# LLaVA's own code. The outermost module with one of these names is that part.
TOWER_NAMES = {"llm": ("language_model",),
               "vision": ("vision_tower", "vision_model", "vision_encoder", "visual"),
               "connector": ("multi_modal_projector", "connector", "mm_projector", "projector")}


def tower_roots(model: nn.Module) -> dict[str, list[str]]:
    """{part: [module names]} for the parts (llm / vision / connector) `model` has."""
    names = [n for n, _ in model.named_modules() if n]
    roots = {}
    for part, leaves in TOWER_NAMES.items():
        hits = [n for n in names if n.rpartition(".")[2] in leaves]
        outer = [n for n in hits if not any(n.startswith(h + ".") for h in hits)]
        if outer:
            roots[part] = outer
    return roots


def _tower_modules(model: nn.Module, part: str, spec) -> dict[str, nn.Module]:
    """Modules matched by `spec` (suffix list or regex over names inside the tower) in each root of `part`."""
    roots = tower_roots(model).get(part)
    if not roots:
        raise ValueError(f"{part}: {type(model).__name__} has no {part} part (a module named one of "
                         f"{', '.join(TOWER_NAMES[part])})")
    spec = parse_targets(spec, part)
    found = {}
    for root in roots:
        inner = _match_modules(model.get_submodule(root), spec, part)
        found.update({f"{root}.{n}": m for n, m in inner.items()})
    return found


def _resolve_part_aliases(model: nn.Module, trainable: list[str]) -> list[str]:
    """"connector" (or "llm", "vision") names that part where no module is called so."""
    names = [n for n, _ in model.named_modules() if n]
    roots = tower_roots(model)
    out = []
    for t in trainable:
        if t in roots and not any(name_matches(n, [t]) for n in names):
            out += roots[t]
        else:
            out.append(t)
    return out


def resolve_lora_targets(model: nn.Module, targets, r, alpha, dropout, trainable, llm=None, vision=None):
    """Validate an adapter configuration against `model` without changing it.

    Returns (targets, trainable names, {name: Linear to wrap}, {name: module to train});
    with `llm` / `vision`, targets is the explicit list of the modules they matched.
    """
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("model: already has LoRA adapters (apply_lora was called on it before)")
    check_rank_and_dropout(r, dropout)
    if alpha <= 0:
        raise ValueError(f"alpha: must be positive, got {alpha!r}")
    if targets is None and llm is None and vision is None:
        raise ValueError("targets: no adapter targets; give llm= and/or vision= (module names inside the LLM "
                         "or the vision tower), or targets= (names anywhere in the model)")
    found = {}
    if targets is not None:
        targets = parse_targets(targets)
        found.update(_match_modules(model, targets, "targets"))
    for part, spec in (("llm", llm), ("vision", vision)):
        if spec is not None:
            found.update(_tower_modules(model, part, spec))
    if llm is not None or vision is not None:
        targets = sorted(found)
    trainable = parse_targets(trainable, "trainable") if trainable else []
    if isinstance(trainable, list):
        trainable = _resolve_part_aliases(model, trainable)
    not_linear = {n: type(m).__name__ for n, m in found.items() if not isinstance(m, nn.Linear)}
    if not_linear:
        raise ValueError(f"targets: LoRA wraps nn.Linear layers only; matched non-Linear modules {not_linear}")
    keep = _match_modules(model, trainable, "trainable") if trainable else {}
    if isinstance(trainable, str):  # PEFT's modules_to_save is a name list: the outermost matches
        trainable = [n for n in keep if not any(n.startswith(k + ".") for k in keep)]
    return targets, list(trainable), found, keep


def apply_lora(model: nn.Module, targets=None, r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
               trainable=(), rslora: bool = False, backend: str = "auto", *, llm=None, vision=None) -> nn.Module:
    """Replace targeted nn.Linear layers by LoRALinear in place; freeze all else but `trainable`.

    For a VLM, `llm` and `vision` name the layers to adapt inside the language model
    and inside the vision tower (LLaVA's recipe adapts the LLM only:
    ``llm="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"``); `targets` names
    layers anywhere in the model, as PEFT's target_modules does (so a suffix such as
    "q_proj" also hits the vision tower's q_proj). Each takes a list (or comma string)
    of module-name suffixes or a full-match regex. `trainable` lists modules trained
    fully (PEFT's modules_to_save); "connector" names a VLM's projector whatever its
    module is called.
    """
    targets, trainable, found, keep = resolve_lora_targets(model, targets, r, alpha, dropout, trainable,
                                                           llm, vision)
    model.requires_grad_(False)
    for name, module in found.items():
        set_submodule(model, name, LoRALinear(module, r, alpha, dropout, rslora, backend))
    for module in keep.values():
        module.requires_grad_(True)
    model.lora_config = LoRAConfig(r, alpha, dropout, targets, trainable, rslora)
    return model


def merge(model: nn.Module):
    """Fold the adapters into their base weights in place (``unmerge`` undoes it); the
    LoRA layers stay, so the model keeps adapter keys. To save a plain model, use
    ``merge_and_unload``."""
    for m in lora_layers(model).values():
        m.merge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base Linear and put that Linear back in its place.

    The result has the modules and state-dict keys of the model before ``apply_lora``
    (no ``base_layer``, no ``lora_A``), so ``save_pretrained`` writes a checkpoint that
    loads as a plain model. Parameters keep their requires_grad flags. NF4 bases are
    refused: folding into them would re-quantize the weights.
    """
    layers = lora_layers(model)
    quantized = [n for n, m in layers.items() if m.quantized]
    if quantized:
        raise ValueError(f"model: LoRA layers {quantized[:4]} have NF4 (quantized) bases; merging would "
                         "re-quantize them: load the base in full precision and load_adapter onto it to merge")
    for name, layer in layers.items():
        layer.merge()
        set_submodule(model, name, layer.base_layer)
    if getattr(model, "lora_config", None) is not None:
        del model.lora_config
    return model


def unmerge(model: nn.Module):
    for m in lora_layers(model).values():
        m.unmerge()


def lora_parameter_count(model: nn.Module) -> int:
    """Σ r·(in + out) over LoRA layers: the adapter's own parameters."""
    return sum(m.r * (m.in_features + m.out_features) for m in lora_layers(model).values())


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter + fully-trained modules under PEFT's key names."""
    cfg = _config_of(model)
    out = {}
    for name, m in lora_layers(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach()
    for name in _match_modules(model, cfg.trainable, "trainable") if cfg.trainable else {}:
        for pname, p in model.get_submodule(name).named_parameters():
            out[f"{PEFT_PREFIX}{name}.{pname}"] = p.detach()
    return out


def _config_of(model: nn.Module) -> LoRAConfig:
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("model: has no LoRA adapters; call apply_lora first")
    return cfg


def save_adapter(model: nn.Module, directory: str):
    """Write adapter_model.safetensors + adapter_config.json (PEFT's format), atomically.

    A fastvlm.VLM's adapter is written under transformers' LLaVA names (see
    fastvlm.train.peft_llava), so PEFT loads it on LlavaForConditionalGeneration.
    """
    from safetensors.torch import save_file

    cfg = _config_of(model)
    tensors = {k[len(PEFT_PREFIX):]: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    peft_cfg = cfg.to_peft()
    if peft_llava.is_vlm(model):
        tensors, targets, modules = peft_llava.to_hf(model, tensors, _trained_modules(model, cfg))
        peft_cfg.update(target_modules=targets, modules_to_save=modules or None)
    tensors = {PEFT_PREFIX + k: v for k, v in tensors.items()}
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, ADAPTER_WEIGHTS),
                 lambda p: save_file(tensors, p, metadata={"format": "pt"}))

    def write_config(p):
        with open(p, "w") as f:
            json.dump(peft_cfg, f, indent=2)
    atomic_write(os.path.join(directory, ADAPTER_CONFIG), write_config)


def _trained_modules(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    return list(_match_modules(model, cfg.trainable, "trainable")) if cfg.trainable else []


def load_adapter(model: nn.Module, directory: str, backend: str = "auto") -> nn.Module:
    """Apply LoRA as adapter_config.json says (unless already applied) and load the weights.

    Reads adapters PEFT saved too: keys may carry PEFT's adapter name
    (``lora_A.default.weight``) or not. On a fastvlm.VLM, adapters saved for
    transformers' LLaVA (4.x or 5.x names) load too; the adapted modules are those the
    weights name.
    """
    from safetensors.torch import load_file

    with open(os.path.join(directory, ADAPTER_CONFIG)) as f:
        cfg = LoRAConfig.from_peft(json.load(f))
    saved = load_file(os.path.join(directory, ADAPTER_WEIGHTS))
    saved = {re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", k): v for k, v in saved.items()}
    if peft_llava.is_vlm(model):
        if not all(k.startswith(PEFT_PREFIX) for k in saved):
            raise ValueError(f"{directory}: adapter keys do not start with PEFT's {PEFT_PREFIX!r}")
        tensors, cfg.targets, cfg.trainable = peft_llava.from_hf(
            model, {k[len(PEFT_PREFIX):]: v for k, v in saved.items()}, list(cfg.trainable))
        saved = {PEFT_PREFIX + k: v for k, v in tensors.items()}
    if getattr(model, "lora_config", None) is None:
        apply_lora(model, cfg.targets, cfg.r, cfg.alpha, cfg.dropout, cfg.trainable, cfg.rslora, backend)
    elif _shape_of(model.lora_config) != _shape_of(cfg):
        raise ValueError(f"model: has LoRA config {model.lora_config}, adapter in {directory} has {cfg}")
    expected = adapter_state_dict(model)
    missing, unexpected = expected.keys() - saved.keys(), saved.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(f"{directory}: adapter keys do not fit the model; missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]}")
    with torch.no_grad():
        for k, dst in expected.items():
            if dst.shape != saved[k].shape:
                raise ValueError(f"{directory}: {k} has shape {tuple(saved[k].shape)}, model expects "
                                 f"{tuple(dst.shape)}")
            dst.copy_(saved[k])
    return model


def _shape_of(cfg: LoRAConfig) -> tuple:
    """What must agree for weights to load into adapters already applied (which
    modules: the key check)."""
    return cfg.r, cfg.alpha, cfg.rslora
