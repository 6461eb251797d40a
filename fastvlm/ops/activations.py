"""The activations fastvlm's layers and fused kernels share: one table, by name.

Each entry holds the plain-torch function (the reference of the fused epilogues,
and what the encoders run) and its code in the fused GEMM's epilogue
(fastvlm/kernels/fused_mlp.py ``_act_and_grad``).
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
    code: int  # the fused kernels' ACT constexpr (0 is the identity)
    fn: Callable[[torch.Tensor], torch.Tensor]


ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (
    Activation("gelu", 1, F.gelu),
    Activation("gelu_tanh", 2, functools.partial(F.gelu, approximate="tanh")),
    Activation("quick_gelu", 3, quick_gelu),
    Activation("silu", 4, F.silu),
)}


def activation(name: str, arg: str = "activation") -> Activation:
    """The table's entry for `name`; a ValueError naming `arg` for any other name."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{arg}: expected one of {tuple(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]
