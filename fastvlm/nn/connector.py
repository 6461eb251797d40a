"""Connectors: vision features -> the LLM's embedding width.

- FusedMLPConnector: LLaVA-1.5's ``mlp2x_gelu`` projector (Linear, GELU, Linear)
  as one fused op; it *is* that nn.Sequential (same children, same state-dict
  keys), so projector checkpoints load unchanged.
- MultiLevelConnector: several feature tensors (layers of one encoder and/or
  encoders of different widths) into one MLP without materialising their
  concatenation.
- ResamplerConnector: a fixed budget of learnable queries cross-attending once
  to the image tokens (Qwen-VL / Perceiver style).

The MLP connectors take an optional 2x2 token reduction (``reduce``), read by
the first GEMM in place (see fastvlm.ops.token_reduction for the token order).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastvlm.ops.activations import FUSED_ACTIVATIONS, quick_gelu
from fastvlm.ops.activations import activation as _activation
from fastvlm.ops.fused_mlp import fused_mlp
from fastvlm.ops.token_reduction import REDUCE_MODES
from fastvlm.utils.checks import as_int


class QuickGELU(nn.Module):
    """CLIP's x * sigmoid(1.702 x)."""

    def forward(self, x):
        return quick_gelu(x)


def activation_module(name: str) -> nn.Module:
    modules = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
               "quick_gelu": QuickGELU, "silu": nn.SiLU}
    return modules[_activation(name).name]()


def activation_name(module: nn.Module) -> str:
    """The fused activation equal to `module` (nn.GELU, nn.SiLU, a QuickGELU)."""
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    if isinstance(module, nn.SiLU):
        return "silu"
    if "quickgelu" in type(module).__name__.lower():  # ours, open_clip's, HF's QuickGELUActivation
        return "quick_gelu"
    raise ValueError(f"activation: no fused equivalent of {type(module).__name__}")


def _mlp_input_multiplier(reduce: str | None) -> int:
    if reduce is not None and reduce not in REDUCE_MODES:
        raise ValueError(f"reduce: expected None or one of {REDUCE_MODES}, got {reduce!r}")
    return 4 if reduce == "pixel_shuffle" else 1


def _positive_sizes(**sizes) -> tuple[int, ...]:
    """The sizes as ints >= 1, in order; an `out_features` of None means hidden_features."""
    if sizes.get("out_features", 0) is None:
        sizes["out_features"] = sizes["hidden_features"]
    return tuple(as_int(v, name, minimum=1) for name, v in sizes.items())


class FusedMLPConnector(nn.Sequential):
    """Linear(in, hidden) -> activation -> Linear(hidden, out), run as fused_mlp.

    `in_features` is the first Linear's width; with ``reduce="pixel_shuffle"``
    that is 4x the encoder width (the input is [B, H*W, in_features / 4]).
    Backward keeps nothing but the input by default (``recompute=True``): it reruns
    the first GEMM, which costs one GEMM of the smaller layer (+7% of the step's
    FLOPs for 1024 -> 4096 -> 4096) and keeps ~0.11x of eager's activations, where
    keeping the pre-activation (``recompute=False``) keeps ~0.56x.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 activation: str = "gelu", bias: bool = True, *, reduce: str | None = None,
                 grid: tuple[int, int] | None = None, recompute: bool = True, backend: str = "auto",
                 device=None, dtype=None):
        in_features, hidden_features, out_features = _positive_sizes(
            in_features=in_features, hidden_features=hidden_features, out_features=out_features)
        if reduce == "pixel_shuffle" and in_features % 4:
            raise ValueError(f"in_features: pixel_shuffle needs a multiple of 4, got {in_features}")
        _mlp_input_multiplier(reduce)
        factory = dict(device=device, dtype=dtype)
        super().__init__(nn.Linear(in_features, hidden_features, bias, **factory),
                         activation_module(activation),
                         nn.Linear(hidden_features, out_features, bias, **factory))
        self.activation, self.reduce, self.grid = activation, reduce, grid
        self.recompute, self.backend = recompute, backend

    @classmethod
    def from_sequential(cls, seq: nn.Sequential, **options) -> "FusedMLPConnector":
        """A fused copy of an existing (Linear, activation, Linear) projector, same weights."""
        if len(seq) != 3 or not isinstance(seq[0], nn.Linear) or not isinstance(seq[2], nn.Linear):
            raise ValueError("seq: expected nn.Sequential(nn.Linear, activation, nn.Linear)")
        first, last = seq[0], seq[2]
        if (first.bias is None) != (last.bias is None):
            raise ValueError("seq: both Linears must have a bias, or neither")
        fused = cls(first.in_features, first.out_features, last.out_features, activation_name(seq[1]),
                    first.bias is not None, device=first.weight.device, dtype=first.weight.dtype, **options)
        fused.load_state_dict(seq.state_dict())
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, last = self[0], self[2]
        return fused_mlp(x, first.weight, first.bias, last.weight, last.bias, self.activation,
                         reduce=self.reduce, grid=self.grid, recompute=self.recompute, backend=self.backend)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, reduce={self.reduce!r}, recompute={self.recompute}"


class MultiLevelConnector(nn.Module):
    """An MLP over several feature tensors [B, T, K_i] (same tokens, any widths).

    mode="sum" (COMM-style): per input LayerNorm(K_i) + Linear(K_i, hidden),
    summed, then activation and Linear(hidden, out). mode="concat": Linear over
    the concatenated features (optionally LayerNorm'd per input first). In both
    modes the first GEMM accumulates over the inputs in one kernel; only the
    per-input LayerNorm outputs are materialised, never the [M, sum K] concat.
    LayerNorm acts per encoder token, before any token reduction.
    """

    def __init__(self, in_features: Sequence[int], hidden_features: int, out_features: int | None = None,
                 *, mode: str = "sum", layer_norm: bool | None = None, activation: str = "gelu",
                 reduce: str | None = None, grid: tuple[int, int] | None = None, recompute: bool = True,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if mode not in ("sum", "concat"):
            raise ValueError(f"mode: expected 'sum' or 'concat', got {mode!r}")
        _activation(activation, table=FUSED_ACTIVATIONS)
        if isinstance(in_features, int) or not len(in_features):
            raise ValueError(f"in_features: expected a non-empty list of input widths, got {in_features!r}")
        self.in_features = [as_int(k, "in_features", minimum=1) for k in in_features]
        hidden_features, out_features = _positive_sizes(hidden_features=hidden_features, out_features=out_features)
        mult = _mlp_input_multiplier(reduce)
        factory = dict(device=device, dtype=dtype)
        layer_norm = mode == "sum" if layer_norm is None else layer_norm
        self.norms = nn.ModuleList(nn.LayerNorm(k, **factory) for k in self.in_features) if layer_norm else None
        if mode == "sum":
            self.proj = nn.ModuleList(nn.Linear(mult * k, hidden_features, **factory) for k in self.in_features)
        else:
            self.proj = nn.Linear(mult * sum(self.in_features), hidden_features, **factory)
        self.out = nn.Linear(hidden_features, out_features, **factory)
        self.mode, self.activation, self.reduce, self.grid = mode, activation, reduce, grid
        self.recompute, self.backend = recompute, backend

    def first_layer(self):
        """(weights, bias) of the first GEMM: per-input weights and the summed biases, or the
        concat Linear's."""
        if self.mode == "concat":
            return self.proj.weight, self.proj.bias
        return [p.weight for p in self.proj], torch.stack([p.bias for p in self.proj]).sum(0)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(features, torch.Tensor) or len(features) != len(self.in_features):
            raise ValueError(f"features: expected a list of {len(self.in_features)} tensors "
                             f"of widths {self.in_features}")
        for i, (x, k) in enumerate(zip(features, self.in_features)):
            if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-1] != k:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"features: input {i} must be [B, T, {k}] (in_features[{i}]), got {got}")
        xs = list(features) if self.norms is None else [n(x) for n, x in zip(self.norms, features)]
        w1, b1 = self.first_layer()
        return fused_mlp(xs, w1, b1, self.out.weight, self.out.bias, self.activation, reduce=self.reduce,
                         grid=self.grid, recompute=self.recompute, backend=self.backend)


def sincos_2d(h: int, w: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """[h*w, dim] fixed 2-D sine-cosine positions (half the channels per axis)."""
    if dim % 4:
        raise ValueError(f"dim: 2-D sin-cos positions need a multiple of 4, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    parts = [f(pos.reshape(-1, 1) * freqs) for pos in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, 1).to(device=device, dtype=dtype)


class ResamplerConnector(nn.Module):
    """`num_queries` learnable queries, one multi-head cross-attention to the
    image tokens (plus 2-D sin-cos key positions), LayerNorm and a projection:
    every image becomes exactly `num_queries` tokens of width `out_features`.

    forward(x [B, T, in_features], key_padding_mask [B, T] bool, True = padding)
    -> [B, num_queries, out_features]. Positions assume a square grid of T
    tokens unless `grid` is given; pass ``positions=False`` to omit them.
    """

    def __init__(self, in_features: int, out_features: int, num_queries: int = 64, num_heads: int = 8,
                 *, grid: tuple[int, int] | None = None, positions: bool = True, device=None, dtype=None):
        super().__init__()
        in_features, out_features, num_queries, num_heads = _positive_sizes(
            in_features=in_features, out_features=out_features, num_queries=num_queries, num_heads=num_heads)
        if out_features % num_heads:
            raise ValueError(f"num_heads: {num_heads} does not divide out_features={out_features}")
        factory = dict(device=device, dtype=dtype)
        self.query = nn.Parameter(torch.randn(num_queries, out_features, **factory) * 0.02)
        self.kv_proj = nn.Linear(in_features, out_features, bias=False, **factory)
        self.ln_q = nn.LayerNorm(out_features, **factory)
        self.ln_kv = nn.LayerNorm(out_features, **factory)
        self.q_proj = nn.Linear(out_features, out_features, **factory)
        self.k_proj = nn.Linear(out_features, out_features, **factory)
        self.v_proj = nn.Linear(out_features, out_features, **factory)
        self.o_proj = nn.Linear(out_features, out_features, **factory)
        self.ln_post = nn.LayerNorm(out_features, **factory)
        self.proj = nn.Linear(out_features, out_features, **factory)
        self.num_heads, self.grid, self.positions = num_heads, grid, positions

    def key_positions(self, tokens: int, like: torch.Tensor) -> torch.Tensor:
        h, w = self.grid or (math.isqrt(tokens),) * 2
        if h * w != tokens:
            raise ValueError(f"x: {tokens} tokens are not a square grid; pass grid=(H, W) or positions=False")
        return sincos_2d(h, w, like.shape[-1], device=like.device, dtype=like.dtype)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.kv_proj.in_features:
            raise ValueError(f"x: expected [B, T, {self.kv_proj.in_features}], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        b, t, _ = x.shape
        kv = self.ln_kv(self.kv_proj(x))
        keys = kv + self.key_positions(t, kv) if self.positions else kv
        q = self.q_proj(self.ln_q(self.query)).expand(b, -1, -1)
        heads = self.num_heads

        def split(z):  # [B, L, D] -> [B, heads, L, D / heads]
            return z.unflatten(-1, (heads, -1)).transpose(1, 2)

        mask = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != (b, t) or key_padding_mask.dtype != torch.bool:
                raise ValueError(f"key_padding_mask: expected bool [B={b}, T={t}], got "
                                 f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
            mask = ~key_padding_mask[:, None, None, :]
        attn = F.scaled_dot_product_attention(split(q), split(self.k_proj(keys)), split(self.v_proj(kv)),
                                              attn_mask=mask)
        out = self.o_proj(attn.transpose(1, 2).flatten(2))
        return self.proj(self.ln_post(out))
