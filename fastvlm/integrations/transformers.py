"""Drop-in fastvlm for Hugging Face transformers VLMs: ``patch(model)`` / ``unpatch(model)``.

Built on transformers' own extension points wherever they exist, so that a
release rarely breaks it (Liger-Kernel copies whole ``forward`` methods):

- attention: ``AttentionInterface`` + ``AttentionMaskInterface`` functions
  registered as ``"fastvlm"`` and selected for the text model only with
  ``set_attn_implementation({"text_config": "fastvlm"})``; the vision tower
  keeps its own implementation (see fastvlm.integrations.hf_attention);
- the layout: the model's own ``forward`` is wrapped on the instance (same
  signature, plus ``segment_ids=``; a ``PatchedForward`` object, which deep
  copies and pickles with its model) to derive the AttentionLayout once per
  forward and pass it down as a keyword transformers forwards to every layer
  (fastvlm.integrations.hf_layout);
- connector: the projector module is swapped for a FusedMLPConnector holding
  the same Linear modules (state-dict keys and parameters unchanged);
- vision tower: each layer's forward runs under the checkpointing policy;
- loss: with ``labels``, the wrapped forward runs the base model and computes
  transformers' causal-LM loss through ``linear_cross_entropy`` on the
  ``lm_head`` module as it is at call time (LoRA / 4-bit honoured); the output
  then has ``logits=None``.

Three places have no extension point and are replaced on the instance: Qwen's
vision attention (routed by ``cu_seqlens`` to multimodal_attention_varlen),
Qwen3-VL's patch mergers (their MLP on fused_mlp, their LayerNorm as it is) and,
as said, the top-level forward wrapper. Gemma 3's sliding-window layers run
fastvlm attention on the layout with its ``window``. Per family:

======================================  ====================  ==========================  =========
class                                   layout kind           connector fused             vision
======================================  ====================  ==========================  =========
LlavaForConditionalGeneration           causal                multi_modal_projector       CLIP/SigLIP layers
LlavaNextForConditionalGeneration       causal                multi_modal_projector       CLIP layers
LlavaOnevisionForConditionalGeneration  causal                multi_modal_projector       SigLIP layers
Gemma3ForConditionalGeneration          image_bidirectional   none (pool + norm + matmul) SigLIP layers
PaliGemmaForConditionalGeneration       prefix_lm             none (one Linear)           SigLIP layers
Qwen2VLForConditionalGeneration         causal                visual.merger.mlp           blocks, varlen attn
Qwen2_5_VLForConditionalGeneration      causal                visual.merger.mlp           blocks, varlen attn
Qwen3VLForConditionalGeneration         causal                (deepstack) merger MLPs     blocks, varlen attn
Idefics3ForConditionalGeneration        causal                none (shuffle + one Linear) SigLIP-like layers
SmolVLMForConditionalGeneration         causal                none (shuffle + one Linear) SigLIP-like layers
======================================  ====================  ==========================  =========
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from fastvlm.integrations import hf_attention
from fastvlm.integrations.hf_layout import build_layout
from fastvlm.integrations.hf_modules import (
    HFFusedProjector,
    call_original,
    checkpointed_forward,
    fused_activation,
    fused_lm_loss,
    fused_merger_forward,
    original_signature,
    output_class,
    projector_parts,
    replace_child,
)
from fastvlm.integrations.hf_unpad import drop_padding
from fastvlm.nn.checkpointing import CheckpointPolicy

SUPPORTED_TRANSFORMERS = ("5.23", "5.24")  # [min, max): the range the tests ran on; pyproject's `hf` extra


@dataclass(frozen=True)
class Family:
    name: str                       # the family as users call it
    model_type: str                 # config.model_type of its checkpoints
    kind: str                       # AttentionLayout kind of the decoder
    projector: str | None           # path of a Linear-act-Linear connector, from the top model
    vision: str                     # path of the vision tower
    token_types: bool = False       # the layout reads token_type_ids (Gemma 3, PaliGemma)
    qwen_vision: bool = False       # vision attention by cu_seqlens
    merger: str | None = None       # class of norm + MLP mergers whose MLP runs fused (Qwen3-VL)



FAMILIES = {
    "LlavaForConditionalGeneration": Family("LLaVA", "llava", "causal", "model.multi_modal_projector",
                                            "model.vision_tower"),
    "LlavaNextForConditionalGeneration": Family("LLaVA-NeXT", "llava_next", "causal", "model.multi_modal_projector",
                                                "model.vision_tower"),
    "LlavaOnevisionForConditionalGeneration": Family("LLaVA-OneVision", "llava_onevision", "causal",
                                                     "model.multi_modal_projector", "model.vision_tower"),
    "Gemma3ForConditionalGeneration": Family("Gemma 3", "gemma3", "image_bidirectional", None, "model.vision_tower",
                                             token_types=True),
    "PaliGemmaForConditionalGeneration": Family("PaliGemma", "paligemma", "prefix_lm", None, "model.vision_tower",
                                                token_types=True),
    "Qwen2VLForConditionalGeneration": Family("Qwen2-VL", "qwen2_vl", "causal", "model.visual.merger.mlp",
                                              "model.visual", qwen_vision=True),
    "Qwen2_5_VLForConditionalGeneration": Family("Qwen2.5-VL", "qwen2_5_vl", "causal", "model.visual.merger.mlp",
                                                 "model.visual", qwen_vision=True),
    # Qwen3-VL's mergers (and deepstack mergers) hold their LayerNorm beside fc1/act/fc2 in one
    # module: their forward runs the MLP fused (hf_modules.fused_merger_forward)
    "Qwen3VLForConditionalGeneration": Family("Qwen3-VL", "qwen3_vl", "causal", None, "model.visual",
                                              qwen_vision=True, merger="Qwen3VLVisionPatchMerger"),
    # Idefics3 / SmolVLM: pixel shuffle, then one Linear (nothing to fuse)
    "Idefics3ForConditionalGeneration": Family("Idefics3", "idefics3", "causal", None, "model.vision_model"),
    "SmolVLMForConditionalGeneration": Family("SmolVLM", "smolvlm", "causal", None, "model.vision_model"),
}


@dataclass(frozen=True)
class SupportedFamily:
    name: str        # "Qwen3-VL"
    class_name: str  # the transformers class patch() takes: "Qwen3VLForConditionalGeneration"
    model_type: str  # config.model_type of its checkpoints: "qwen3_vl"


def supported_families() -> list[SupportedFamily]:
    """The transformers model classes patch() supports, with their family and model_type."""
    return [SupportedFamily(f.name, cls, f.model_type) for cls, f in FAMILIES.items()]


def supported_list() -> str:
    """The supported classes, for error messages."""
    return ", ".join(f"{cls} ({f.name})" for cls, f in FAMILIES.items())


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

    def __setstate__(self, state: dict) -> None:
        # a patched model unpickled in a fresh process needs the "fastvlm" functions registered
        self.__dict__.update(state)
        if self.configs:
            hf_attention.register()


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
                                f"{supported_list()}")


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
    if state.family.merger:
        mergers = [m for m in model.get_submodule(state.family.vision).modules()
                   if type(m).__name__ == state.family.merger]
        try:
            for merger in mergers:
                fused_activation(merger.act_fn)
        except ValueError as exc:
            state.notes.append(f"connector: {exc}; {state.family.merger} left as is")
            return
        for merger in mergers:
            _set_forward(state, merger, functools.partial(fused_merger_forward, merger))
        return
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
                    previous = layer.__dict__.get("forward")
                    _set_forward(state, layer, functools.partial(checkpointed_forward, layer, previous, policy, i))


def _layout_for(model, family: Family, kwargs: dict, segment_ids):
    """The ForwardLayouts of this call, or None where the fastvlm path does not apply
    (decode steps with a filled cache; a static cache, whose keys span its whole length and
    whose length is a tensor under torch.compile; a 4-D or per-layer mask given by the
    caller), none of which ``segment_ids`` can be combined with."""
    past = kwargs.get("past_key_values")
    mask = kwargs.get("attention_mask")
    if past is not None and (getattr(past, "is_compileable", False) or past.get_seq_length() > 0):
        if segment_ids is not None:
            raise ValueError(f"segment_ids: packed segments apply to a forward from position 0 without a static "
                             f"cache; this call has a {type(past).__name__} past_key_values that is static or "
                             f"already filled")
        return None
    if mask is not None and (not hasattr(mask, "dim") or mask.dim() != 2):
        if segment_ids is not None:
            raise ValueError(f"segment_ids: cannot be combined with a prepared attention_mask "
                             f"({type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}); pass a 2-D "
                             f"attention_mask [B, N] (0 = padding) or none with segment_ids")
        return None
    ids = kwargs.get("input_ids")
    tokens = ids if ids is not None else kwargs.get("inputs_embeds")
    if tokens is None:
        return None
    config = model.config
    image_tokens = [t for t in (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None))
                    if t is not None]
    is_image = None if ids is None or not image_tokens else torch.isin(ids, torch.tensor(image_tokens,
                                                                                        device=ids.device))
    return build_layout(family.kind, tokens.shape[0], tokens.shape[1], tokens.device, attention_mask=mask,
                        position_ids=kwargs.get("position_ids"), segment_ids=segment_ids,
                        token_type_ids=kwargs.get("token_type_ids") if family.token_types else None,
                        is_image=is_image)


def _output_attentions(model, kwargs: dict) -> bool:
    """Whether this call asks for attention maps, as transformers reads it (the argument,
    else the configs' flag)."""
    if kwargs.get("output_attentions") is not None:
        return bool(kwargs["output_attentions"])
    return any(getattr(cfg, "output_attentions", False) for cfg in (model.config, model.config.get_text_config()))


class PatchedForward:
    """The patched top-level forward, set on the model instance: the original forward
    (same signature, plus ``segment_ids=``) with the forward's layout passed down, and the
    fused loss. An object holding the model rather than a closure over it, so that
    ``copy.deepcopy`` and ``pickle`` carry it over to the copy's own model and weights."""

    def __init__(self, model: nn.Module, state: PatchState, attention: bool):
        self.model, self.state, self.attention = model, state, attention
        self.previous = model.__dict__.get("forward")  # an instance-level forward set before patch()

    @property
    def __signature__(self) -> inspect.Signature:
        sig = original_signature(self.model, self.previous)
        params = list(sig.parameters.values())
        extra = inspect.Parameter("segment_ids", inspect.Parameter.KEYWORD_ONLY, default=None)
        at = next((i for i, p in enumerate(params) if p.kind == p.VAR_KEYWORD), len(params))
        return sig.replace(parameters=params[:at] + [extra] + params[at:])

    def __call__(self, *args, segment_ids=None, **kwargs):
        model, state = self.model, self.state
        original = functools.partial(call_original, model, self.previous)
        names = [n for n, p in original_signature(model, self.previous).parameters.items()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        kwargs.update(zip(names, args))
        if self.attention:
            if _output_attentions(model, kwargs):  # reaches the attention function, which then runs eager
                kwargs["output_attentions"] = True
            if state.fused_loss and segment_ids is not None:  # a packed loss forward: its live tokens only
                kwargs, segment_ids = drop_padding(model, kwargs, segment_ids)
            kwargs[hf_attention.LAYOUT_KWARG] = _layout_for(model, state.family, kwargs, segment_ids)
        elif segment_ids is not None:
            raise ValueError("segment_ids: packed segments need the fastvlm attention (patch with attention=True)")
        if not (state.fused_loss and kwargs.get("labels") is not None):
            return original(**kwargs)
        labels = kwargs.pop("labels")
        kwargs.pop("logits_to_keep", None)
        return_dict = kwargs.pop("return_dict", None)
        return_dict = getattr(model.config, "return_dict", True) if return_dict is None else return_dict
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "shift_labels", "ignore_index")
                       if k in kwargs}
        outputs = model.model(**kwargs, return_dict=True)
        loss = fused_lm_loss(model, outputs.last_hidden_state, labels, **loss_kwargs)
        cls = output_class(model)
        rest = {k: v for k, v in outputs.items() if k in cls.__dataclass_fields__ and k not in ("loss", "logits")}
        out = cls(loss=loss, logits=None, **rest)
        return out if return_dict else out.to_tuple()


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
        _set_forward(state, hf, PatchedForward(hf, state, attention))
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
