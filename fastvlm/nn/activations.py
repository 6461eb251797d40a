"""Activation functions by fastvlm name, and the Hugging Face config names they implement."""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}
# transformers' ACT2FN names -> ours; "gelu_new" is the same tanh approximation as "gelu_pytorch_tanh"
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                  "quick_gelu": "quick_gelu", "silu": "silu", "swish": "silu", "relu": "relu"}


def activation_from_hf(name, field: str, supported=ACTIVATIONS) -> str:
    """fastvlm's name for transformers' activation `name` of config field `field`; an
    activation we do not implement (among `supported`) is refused, never replaced."""
    ours = HF_ACTIVATIONS.get(name)
    if ours not in supported:
        names = sorted(k for k, v in HF_ACTIVATIONS.items() if v in supported)
        raise ValueError(f"config.json: {field} {name!r} not supported; expected one of {names}")
    return ours
