"""Drop-in fastvlm for Hugging Face transformers VLMs: ``patch(model)`` / ``unpatch(model)``.

Built on transformers' own extension points wherever they exist, so that a
release rarely breaks it (Liger-Kernel copies whole ``forward`` methods):

- attention: ``AttentionInterface`` + ``AttentionMaskInterface`` functions
  registered as ``"fastvlm"`` and selected for the text model only with
  ``set_attn_implementation({"text_config": "fastvlm"})``; the vision tower
  keeps its own implementation (see fastvlm.integrations.hf_attention);
- the layout: the model's own ``forward`` is wrapped on the instance (same
  signature, plus ``segment_ids=``) to derive the AttentionLayout once per
  forward and pass it down as a keyword transformers forwards to every layer
  (fastvlm.integrations.hf_layout);
- connector: the projector module is swapped for a FusedMLPConnector holding
  the same Linear modules (state-dict keys and parameters unchanged);
- vision tower: each layer's forward runs under the checkpointing policy;
- loss: with ``labels``, the wrapped forward runs the base model and computes
  transformers' causal-LM loss through ``linear_cross_entropy`` on the
  ``lm_head`` module as it is at call time (LoRA / 4-bit honoured); the output
  then has ``logits=None``.

Two places have no extension point and are replaced on the instance: Qwen's
vision attention (routed by ``cu_seqlens`` to multimodal_attention_varlen) and,
as said, the top-level forward wrapper. Gemma 3's sliding-window layers run
fastvlm attention on the layout with its ``window``. Per family:

============================================  ====================  ==========================  =========
class                                         layout kind           connector fused             vision
============================================  ====================  ==========================  =========
LlavaForConditionalGeneration                 causal                multi_modal_projector       CLIP/SigLIP layers
LlavaNextForConditionalGeneration             causal                multi_modal_projector       CLIP layers
Gemma3ForConditionalGeneration                image_bidirectional   none (pool + norm + matmul) SigLIP layers
PaliGemmaForConditionalGeneration             prefix_lm             none (one Linear)           SigLIP layers
Qwen2VLForConditionalGeneration               causal                visual.merger.mlp           blocks, varlen attn
Qwen2_5_VLForConditionalGeneration            causal                visual.merger.mlp           blocks, varlen attn
============================================  ====================  ==========================  =========
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

from torch import nn

from fastvlm.integrations import hf_attention
from fastvlm.integrations.hf_layout import ForwardLayouts, build_layout
from fastvlm.integrations.hf_modules import (
    HFFusedProjector,
    checkpointed_forward,
    fused_lm_loss,
    output_class,
    projector_parts,
    replace_child,
)
from fastvlm.nn.checkpointing import CheckpointPolicy

SUPPORTED_TRANSFORMERS = ("5.23", "5.24")  # [min, max): the range the tests ran on; pyproject's `hf` extra


@dataclass(frozen=True)
class Family:
    kind: str                       # AttentionLayout kind of the decoder
    projector: str | None           # path of a Linear-act-Linear connector, from the top model
    vision: str                     # path of the vision tower
    token_types: bool = False       # the layout reads token_type_ids (Gemma 3, PaliGemma)
    qwen_vision: bool = False       # vision attention by cu_seqlens


FAMILIES = {
    "LlavaForConditionalGeneration": Family("causal", "model.multi_modal_projector", "model.vision_tower"),
    "LlavaNextForConditionalGeneration": Family("causal", "model.multi_modal_projector", "model.vision_tower"),
    "Gemma3ForConditionalGeneration": Family("image_bidirectional", None, "model.vision_tower", token_types=True),
    "PaliGemmaForConditionalGeneration": Family("prefix_lm", None, "model.vision_tower", token_types=True),
    "Qwen2VLForConditionalGeneration": Family("causal", "model.visual.merger.mlp", "model.visual",
                                              qwen_vision=True),
    "Qwen2_5_VLForConditionalGeneration": Family("causal", "model.visual.merger.mlp", "model.visual",
                                                 qwen_vision=True),
}


class UnsupportedModelError(ValueError):
    """The model class or the installed transformers is outside what patch() supports."""


@dataclass
class PatchState:
    family: Family
    forwards: list = field(default_factory=list)     # (module, previous instance forward or None)
    modules: list = field(default_factory=list)      # (path, original module)
    configs: list = field(default_factory=list)      # (config, original _attn_implementation_internal)
    fused_loss: bool = False
    notes: list = field(default_factory=list)        # what was left unpatched, and why


def check_transformers_version(version: str | None = None) -> None:
    from packaging.version import Version

    if version is None:
        import transformers

        version = transformers.__version__
    low, high = SUPPORTED_TRANSFORMERS
    if not Version(low) <= Version(version) < Version(high):
        raise UnsupportedModelError(
            f"transformers {version} is not supported by fastvlm.integrations.transformers: it is tested on "
            f"transformers>={low},<{high} (pip install 'fastvlm[hf]')")


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel and/or torch.compile wrapper."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and model.get_base_model() is not model:
            model = model.get_base_model()
        else:
            return model


def family_of(model: nn.Module) -> Family:
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILIES and cls.__module__.startswith("transformers."):
            return FAMILIES[cls.__name__]
    raise UnsupportedModelError(f"model: {type(model).__name__} is not supported; fastvlm patches "
                                f"{', '.join(FAMILIES)}")


def _set_forward(state: PatchState, module: nn.Module, forward) -> None:
    state.forwards.append((module, module.__dict__.get("forward")))
    module.forward = forward


def _all_configs(model: nn.Module):
    from transformers import PreTrainedModel

    seen, todo = {}, [model.config] + [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while todo:
        cfg = todo.pop()
        if id(cfg) not in seen:
            seen[id(cfg)] = cfg
            todo.extend(c for c in (getattr(cfg, k, None) for k in getattr(cfg, "sub_configs", {})) if c is not None)
    return list(seen.values())


def _patch_attention(model, state: PatchState) -> None:
    text = model.config.get_text_config()
    if getattr(text, "attn_logit_softcapping", None) is not None:
        raise UnsupportedModelError(f"model: attention logit soft-capping ({text.attn_logit_softcapping}) is not "
                                    f"supported by fastvlm attention; patch with attention=False")
    hf_attention.register()
    state.configs = [(cfg, cfg._attn_implementation_internal) for cfg in _all_configs(model)]
    model.set_attn_implementation({"text_config": hf_attention.NAME})
    if state.family.qwen_vision:
        for module in model.get_submodule(state.family.vision).modules():
            if type(module).__name__.endswith("VisionAttention"):
                _set_forward(state, module, functools.partial(hf_attention.qwen_vision_attention_forward, module))


def _patch_connector(model, state: PatchState) -> None:
    path = state.family.projector
    parts = projector_parts(model.get_submodule(path)) if path else None
    if parts is None:
        state.notes.append(f"connector: {'no Linear-activation-Linear projector' if path else 'none in family'}"
                           f"{' at ' + path if path else ''}; left as is")
        return
    state.modules.append((path, replace_child(model, path, HFFusedProjector.adopt(*parts))))


def _patch_vision_layers(model, state: PatchState, policy: CheckpointPolicy) -> None:
    from transformers.modeling_layers import GradientCheckpointingLayer

    for container in model.get_submodule(state.family.vision).modules():
        if isinstance(container, nn.ModuleList):
            for i, layer in enumerate(container):
                if isinstance(layer, GradientCheckpointingLayer):
                    _set_forward(state, layer, functools.partial(checkpointed_forward, layer, layer.forward,
                                                                 policy, i))


def _layout_for(model, family: Family, kwargs: dict, segment_ids):
    """The AttentionLayout of this call, or None where the fastvlm path does not apply
    (decode steps with a filled cache; a 4-D or per-layer mask given by the caller)."""
    past = kwargs.get("past_key_values")
    if past is not None and past.get_seq_length() > 0:
        return None
    mask = kwargs.get("attention_mask")
    if mask is not None and (not hasattr(mask, "dim") or mask.dim() != 2):
        return None
    tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if tokens is None:
        return None
    layout = build_layout(family.kind, tokens.shape[0], tokens.shape[1], tokens.device, attention_mask=mask,
                          position_ids=kwargs.get("position_ids"), segment_ids=segment_ids,
                          token_type_ids=kwargs.get("token_type_ids") if family.token_types else None)
    return ForwardLayouts(layout)


def _wrapped_forward(model, original, state: PatchState, attention: bool):
    names = [n for n, p in inspect.signature(original).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def forward(*args, segment_ids=None, **kwargs):
        kwargs.update(zip(names, args))
        if attention:
            kwargs[hf_attention.LAYOUT_KWARG] = _layout_for(model, state.family, kwargs, segment_ids)
        elif segment_ids is not None:
            raise ValueError("segment_ids: packed segments need the fastvlm attention (patch with attention=True)")
        if not (state.fused_loss and kwargs.get("labels") is not None):
            return original(**kwargs)
        labels = kwargs.pop("labels")
        kwargs.pop("logits_to_keep", None)
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "shift_labels", "ignore_index")
                       if k in kwargs}
        kwargs["return_dict"] = True
        outputs = model.model(**kwargs)
        loss = fused_lm_loss(model, outputs.last_hidden_state, labels, **loss_kwargs)
        cls = output_class(model)
        rest = {k: v for k, v in outputs.items() if k in cls.__dataclass_fields__ and k not in ("loss", "logits")}
        return cls(loss=loss, logits=None, **rest)

    functools.update_wrapper(forward, original)
    sig = inspect.signature(original)
    params = list(sig.parameters.values())
    extra = inspect.Parameter("segment_ids", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind == p.VAR_KEYWORD), len(params))
    forward.__signature__ = sig.replace(parameters=params[:at] + [extra] + params[at:])
    return forward


def patch(model: nn.Module, attention: bool = True, connector: bool = True, checkpointing: str | None = "selective",
          fused_loss: bool = True) -> nn.Module:
    """Run a transformers VLM on fastvlm ops, in place; returns `model` (a PeftModel or a
    torch.compile'd module is patched inside). See the module docstring for what each flag
    changes per family. ``checkpointing``: a fastvlm.nn.checkpointing policy string for the
    vision-tower layers ("selective", "full", "every_k:2", ...) or None / "none"."""
    check_transformers_version()
    hf = unwrap(model)
    family = family_of(hf)
    if "_fastvlm_patch" in hf.__dict__:
        raise ValueError("model: already patched by fastvlm; call unpatch(model) first")
    policy = None if checkpointing in (None, False, "none") else CheckpointPolicy.parse(checkpointing)
    state = PatchState(family)
    text = hf.config.get_text_config()
    try:
        if attention:
            _patch_attention(hf, state)
        if connector:
            _patch_connector(hf, state)
        if policy is not None:
            _patch_vision_layers(hf, state, policy)
        if fused_loss and getattr(text, "final_logit_softcapping", None) is not None:
            state.notes.append("fused_loss: final logit soft-capping is applied on full logits; left as is")
        else:
            state.fused_loss = bool(fused_loss)
        _set_forward(state, hf, _wrapped_forward(hf, hf.forward, state, attention))
    except Exception:
        _undo(hf, state)
        raise
    hf._fastvlm_patch = state
    return model


def _undo(hf: nn.Module, state: PatchState) -> None:
    for module, previous in reversed(state.forwards):
        if previous is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous
    for path, original in reversed(state.modules):
        replace_child(hf, path, original)
    for cfg, impl in state.configs:
        cfg._attn_implementation_internal = impl


def unpatch(model: nn.Module) -> nn.Module:
    """Undo patch(): the original modules, forwards and attention implementations."""
    hf = unwrap(model)
    state = hf.__dict__.pop("_fastvlm_patch", None)
    if state is None:
        raise ValueError("model: not patched by fastvlm")
    _undo(hf, state)
    return model


def patch_notes(model: nn.Module) -> list[str]:
    """What patch() left unchanged on this model, and why."""
    state = unwrap(model).__dict__.get("_fastvlm_patch")
    return [] if state is None else list(state.notes)
