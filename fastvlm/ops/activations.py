"""The activations fastvlm's layers and fused kernels share: one table, by name.

Each entry holds the plain-torch function (the reference of the fused epilogues,
and what the encoders and the LLM run) and its code in the fused GEMM's epilogue
(fastvlm/kernels/fused_mlp.py ``_act_and_grad``; None where the kernel has none).
transformers' config names map onto it through ``activation_from_hf``.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

QUICK_GELU_ALPHA = 1.702  # CLIP's sigmoid approximation of GELU


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(QUICK_GELU_ALPHA * x)


@dataclass(frozen=True)
class Activation:
    name: str
    code: int | None  # the fused kernels' ACT constexpr (0 is the identity); None: no fused epilogue
    fn: Callable[[torch.Tensor], torch.Tensor]


ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (
    Activation("gelu", 1, F.gelu),
    Activation("gelu_tanh", 2, functools.partial(F.gelu, approximate="tanh")),
    Activation("quick_gelu", 3, quick_gelu),
    Activation("silu", 4, F.silu),
    Activation("relu", None, F.relu),
)}
# what the fused GEMM epilogues (fused_mlp, fused_linear_act) implement
FUSED_ACTIVATIONS: dict[str, Activation] = {n: a for n, a in ACTIVATIONS.items() if a.code is not None}
# transformers' ACT2FN names -> ours; "gelu_new" is the same tanh approximation as "gelu_pytorch_tanh"
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                  "quick_gelu": "quick_gelu", "silu": "silu", "swish": "silu", "relu": "relu"}


def activation(name: str, arg: str = "activation", table: dict[str, Activation] = ACTIVATIONS) -> Activation:
    """The table's entry for `name`; a ValueError naming `arg` for any other name."""
    if name not in table:
        raise ValueError(f"{arg}: expected one of {tuple(table)}, got {name!r}")
    return table[name]


def activation_from_hf(name, field: str, supported: dict[str, Activation] = ACTIVATIONS) -> str:
    """fastvlm's name for transformers' activation `name` of config field `field`; an
    activation we do not implement (among `supported`) is refused, never replaced."""
    ours = HF_ACTIVATIONS.get(name)
    if ours not in supported:
        names = sorted(k for k, v in HF_ACTIVATIONS.items() if v in supported)
        raise ValueError(f"config.json: {field} {name!r} not supported; expected one of {names}")
    return ours
