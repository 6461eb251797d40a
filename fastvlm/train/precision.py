"""Precision policy for training: fp32, bf16 / fp16 mixed precision, or pure bf16.

- mixed (``bf16`` / ``fp16``): trainable parameters stay fp32 (master weights, which
  the optimizer updates); matmuls run in the compute dtype under ``torch.autocast``;
  frozen weights may be stored in the compute dtype to save memory, norms stay fp32.
- ``fp16`` adds a dynamic loss scaler (``torch.amp.GradScaler``): a step whose
  gradients hold inf/NaN is skipped and the scale backs off; skips are counted.
- ``pure_bf16``: every parameter, trainable ones included, is stored in bf16 and
  there is no autocast; half the memory of master weights, at the cost of
  updates smaller than bf16's resolution being lost.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def is_norm(module: nn.Module) -> bool:
    # Norm scales are tiny and precision-sensitive (RMSNorm, LayerNorm, GroupNorm, HF's *RMSNorm).
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()


@dataclass
class MixedPrecision:
    """One training step's precision handling: ``autocast()``, ``backward(loss)``, ``step(opt)``."""

    precision: str = "bf16"
    pure_bf16: bool = False
    init_scale: float = 2.0 ** 16
    growth_interval: int = 2000  # good fp16 steps before the scale doubles

    def __post_init__(self):
        if self.precision not in DTYPES:
            raise ValueError(f"precision: expected one of {', '.join(DTYPES)}, got {self.precision!r}")
        if self.pure_bf16 and self.precision != "bf16":
            raise ValueError(f"pure_bf16: needs precision='bf16', got {self.precision!r}")
        self.compute_dtype = DTYPES[self.precision]
        self.scaler = None
        self.skipped_steps = 0
        self.steps = 0

    @property
    def uses_autocast(self) -> bool:
        return self.precision != "fp32" and not self.pure_bf16

    def prepare(self, model: nn.Module, cast_frozen: bool = True) -> nn.Module:
        """Set parameter dtypes: trainable -> fp32 master (or bf16 if pure), frozen
        floating tensors -> compute dtype except norms. Quantized weights are untouched."""
        if self.precision == "fp32":
            return model
        for module in model.modules():
            keep_fp32 = is_norm(module)
            for p in module.parameters(recurse=False):
                if not p.is_floating_point():
                    continue  # packed NF4 / int8 storage
                if self.pure_bf16:
                    p.data = p.data.to(torch.bfloat16)
                elif p.requires_grad or keep_fp32:
                    p.data = p.data.float()
                elif cast_frozen:
                    p.data = p.data.to(self.compute_dtype)
        return model

    def autocast(self, device_type: str):
        if not self.uses_autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.compute_dtype)

    def backward(self, loss: torch.Tensor):
        if self.precision == "fp16":
            if self.scaler is None:
                self.scaler = torch.amp.GradScaler(loss.device.type, init_scale=self.init_scale,
                                                   growth_interval=self.growth_interval)
            loss = self.scaler.scale(loss)
        loss.backward()

    @property
    def loss_scale(self) -> float:
        return self.scaler.get_scale() if self.scaler is not None else 1.0

    def unscale_(self, optimizer: torch.optim.Optimizer):
        """Bring gradients to their true scale (e.g. before clipping); safe to call once per step."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """optimizer.step() unless fp16 gradients overflowed; returns whether it stepped."""
        self.steps += 1
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        # GradScaler lowers the scale exactly when it found inf/NaN and skipped the step.
        skipped = self.scaler.get_scale() < before
        self.skipped_steps += int(skipped)
        return not skipped
