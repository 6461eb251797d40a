"""LoRALinear: a frozen base Linear (plain or bitsandbytes 4-bit) plus a trainable
low-rank update, the module every adapter in fastvlm is.

Attaching adapters to a model, freezing, and PEFT's file format live in
``fastvlm.train.lora``; this file holds only the layer.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from fastvlm.ops.lora_linear import lora_delta, lora_linear


def check_rank_and_dropout(r, dropout):
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"r: LoRA rank must be a positive int, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: must be in [0, 1), got {dropout!r}")


def lora_scaling(r: int, alpha: float, rslora: bool) -> float:
    # rsLoRA (Kalajdzievski 2023): alpha/sqrt(r) keeps the update's scale stable as r grows.
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALinear(nn.Module):
    """y = base(x) + s · dropout(x) Aᵀ Bᵀ with A: [r, in], B: [out, r], s = alpha/r (or alpha/√r).

    ``base_layer`` is an ``nn.Linear`` or a bitsandbytes ``Linear4bit`` and stays
    frozen. A starts kaiming-uniform and B at zero, so a fresh adapter is a no-op.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, backend: str = "auto"):
        super().__init__()
        check_rank_and_dropout(r, dropout)
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = lora_scaling(r, alpha, rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.backend = backend
        # Adapters live in fp32 (master precision) whatever the base dtype; autocast or
        # the precision policy decides the compute dtype.
        dev = _weight_device(base_layer)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=dev))
        self.merged = False
        self.disabled = False  # adapters_disabled(): the base layer alone (a preference stage's reference)
        self.reset_lora_parameters()
        base_layer.requires_grad_(False)
        if self.quantized:
            keep_trainable_4bit_format(base_layer)

    def reset_lora_parameters(self):
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init
        nn.init.zeros_(self.lora_B)

    @property
    def quantized(self) -> bool:
        # bitsandbytes' Linear4bit subclasses nn.Linear; its packed weight is not floating.
        return not self.base_layer.weight.is_floating_point()

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self):
        """Fold s·BA into the base weight (inference); forward then skips the adapter."""
        if self.merged:
            return
        if self.quantized:
            raise ValueError(f"merge: base layer is quantized ({type(self.base_layer).__name__}); merging "
                             "into NF4 weights would re-quantize them, keep the adapter separate")
        w = self.base_layer.weight
        w += self.delta_weight().to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        w = self.base_layer.weight
        w -= self.delta_weight().to(w.dtype)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        if self.quantized or (self.training and not isinstance(self.dropout, nn.Identity)):
            # Dropout puts a different x on the adapter branch, and NF4 bases run their own
            # matmul: both need the unfused form.
            return self.base_layer(x) + lora_delta(self.dropout(x), self.lora_A, self.lora_B, self.scaling)
        base = self.base_layer
        return lora_linear(x, base.weight, base.bias, self.lora_A, self.lora_B, self.scaling,
                           backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"scaling={self.scaling:.4g}, merged={self.merged}")


def keep_trainable_4bit_format(linear4bit: nn.Module) -> nn.Module:
    """Stop bitsandbytes from repacking this Linear4bit for CPU inference.

    bitsandbytes (0.50) switches a Linear4bit's weight, on its first eval-mode forward
    without grad on a CPU with AVX512-BF16, to a packed inference format for good: the
    format has no backward (later training steps get wrong gradients, with only a
    UserWarning), its absmax is rounded to bf16 (the weights change), and it requires
    out_features % 32 == 0 and in_features % blocksize == 0 (other widths crash in
    eval). The flag it checks is per module; with it off, eval runs the same
    dequantize + matmul as training, for any width.
    """
    state = getattr(linear4bit.weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError("base_layer: bitsandbytes already repacked this Linear4bit into its CPU inference "
                         "format (an eval forward ran before the adapter was attached), which cannot be "
                         "trained; wrap the layer before evaluating it, or reload it")
    linear4bit.support_avx512bf16_for_cpu = False
    return linear4bit


def _weight_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def set_submodule(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of `model`, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Every LoRALinear of `model` runs its base layer alone inside the block: the model as it
    was before its adapters (what DPO's reference is when only adapters train), with no second
    copy. Merged adapters are in the weights and cannot be switched off: an error."""
    layers = list(lora_layers(model).items())
    merged = [name for name, m in layers if m.merged]
    if merged:
        raise ValueError(f"model: adapter {merged[0]!r} is merged into its base weight and cannot be switched off")
    previous = [m.disabled for _, m in layers]
    for _, m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for (_, m), was in zip(layers, previous):
            m.disabled = was


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight an NF4 Linear4bit actually multiplies by (for inspection, merging and tests)."""
    import bitsandbytes.functional as bnbf  # bitsandbytes is core, but slow to import: only where NF4 is used

    return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)

