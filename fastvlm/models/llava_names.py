"""Parameter names of transformers' LLaVA in fastvlm.VLM, and back.

transformers writes LLaVA in two layouts: 4.x ``vision_tower.* / multi_modal_projector.* /
language_model.model.* / language_model.lm_head.*`` (also what 5.x saves to disk) and
5.x's module names ``model.vision_tower.* / model.multi_modal_projector.* /
model.language_model.* / lm_head.*`` (what PEFT adapters trained on transformers 5
hold). Both are read; the 5.x module names are written, since those are what PEFT
matches. The vision tower's inner names are fastvlm.models.hf_vision's table; the
projector's ``linear_1`` / ``linear_2`` are fastvlm's ``0`` / ``2`` (an nn.Sequential
with the activation at 1).
"""
from __future__ import annotations

import re

from fastvlm.models import hf_vision
from fastvlm.models.vision import VisionConfig

# (HF prefix after an optional leading "model.", part); first match wins, so the 4.x
# "language_model.model." is tried before 5.x's bare "language_model.".
HF_PARTS = [("vision_tower.", "vision"), ("multi_modal_projector.", "projector"),
            ("language_model.model.", "llm"), ("language_model.lm_head.", "head"), ("lm_head.", "head"),
            ("language_model.", "llm")]
FASTVLM_PARTS = {"vision": "vision_tower.", "projector": "multi_modal_projector.",
                 "llm": "language_model.model.", "head": "language_model.lm_head."}
HF5_PARTS = {"vision": "model.vision_tower.", "projector": "model.multi_modal_projector.",
             "llm": "model.language_model.", "head": "lm_head."}
_HF_PROJECTOR = re.compile(r"linear_(?P<n>[12])\.(?P<rest>.+)$")
_OUR_PROJECTOR = re.compile(r"(?P<i>[02])\.(?P<rest>.+)$")


def split_hf_name(key: str) -> tuple[str | None, str]:
    """(part, the name inside that part) of an HF LLaVA parameter; (None, key) if unknown."""
    short = key[len("model."):] if key.startswith("model.") else key
    for prefix, part in HF_PARTS:
        if short.startswith(prefix):
            return part, short[len(prefix):]
    return None, key


def from_hf(key: str, vision: VisionConfig) -> str | None:
    """fastvlm name of an HF LLaVA parameter (either layout); None where fastvlm has no
    such parameter (the vision tower's final norm). KeyError for unknown names."""
    part, rest = split_hf_name(key)
    if part == "vision":
        inner = hf_vision.fastvlm_name(rest, vision)
        return None if inner is None else FASTVLM_PARTS[part] + inner
    if part == "projector":
        match = _HF_PROJECTOR.match(rest)
        if match is None:
            raise KeyError(key)
        rest = f"{2 * (int(match['n']) - 1)}.{match['rest']}"
    if part is None:
        raise KeyError(key)
    return FASTVLM_PARTS[part] + rest


def to_hf(name: str, vision: VisionConfig) -> str:
    """The transformers 5 module-layout name of a fastvlm.VLM parameter. KeyError if none."""
    for part, prefix in FASTVLM_PARTS.items():
        if name.startswith(prefix):
            rest = name[len(prefix):]
            break
    else:
        raise KeyError(name)
    if part == "vision":
        rest = hf_vision.hf_name(rest, vision)
    elif part == "projector":
        match = _OUR_PROJECTOR.match(rest)
        if match is None:
            raise KeyError(name)
        rest = f"linear_{int(match['i']) // 2 + 1}.{match['rest']}"
    return HF5_PARTS[part] + rest
