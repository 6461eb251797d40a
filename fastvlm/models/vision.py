"""One Vision Transformer, configurable as CLIP-ViT, SigLIP or DINOv2.

The three families differ only in a handful of switches, all in VisionConfig:

| switch               | CLIP        | SigLIP    | DINOv2               |
| -------------------- | ----------- | --------- | -------------------- |
| class token          | yes         | no        | yes (+ registers)    |
| LayerNorm after embed| yes         | no        | no                   |
| patch conv bias      | no          | yes       | yes                  |
| MLP activation       | quick_gelu  | gelu_tanh | gelu                 |
| layer scale          | no          | no        | yes                  |
| position interpolation | opt-in    | opt-in    | always (bicubic)     |

`encoder(pixel_values, select_layers=[-2])` returns hidden states indexed like
transformers' `hidden_states` (0 = the input of the first block) and runs no
block past the deepest selected one. Loading Hugging Face checkpoints lives in
fastvlm/models/hf_vision.py; checkpointing policies in fastvlm/nn/checkpointing.py.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastvlm.models import hf_vision
from fastvlm.models.vision_config import CLIP_L14_336, FAMILIES, SIGLIP_SO400M_384, VisionConfig  # noqa: F401  (re-exported)
from fastvlm.nn.checkpointing import CheckpointPolicy, run_blocks
from fastvlm.ops.activations import activation
from fastvlm.utils.checks import check_finite


class Attention(nn.Module):
    """Full bidirectional self-attention. An unmasked square attention is exactly
    what SDPA's flash/efficient kernels are best at, so it goes there directly."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        dim, bias = config.hidden_size, config.qkv_bias
        self.num_heads = config.num_heads
        # Separate projections so LoRA can target q/k/v individually.
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape

        def heads(t):
            return t.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)),
                                             heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.act, "act").fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        dim, eps = config.hidden_size, config.layer_norm_eps
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(config)
        self.scale1 = LayerScale(dim) if config.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(config)
        self.scale2 = LayerScale(dim) if config.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.scale1(self.attn(self.norm1(x)))
        return x + self.scale2(self.mlp(self.norm2(x)))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        c = config.hidden_size
        self.patch_embed = nn.Conv2d(config.num_channels, c, config.patch_size, config.patch_size,
                                     bias=config.patch_bias)
        self.class_token = nn.Parameter(torch.randn(c) * 0.02) if config.class_token else None
        self.registers = (nn.Parameter(torch.randn(config.num_register_tokens, c) * 0.02)
                          if config.num_register_tokens else None)
        # Positions cover the class token (not the registers) and the patch grid.
        num_positions = int(config.class_token) + config.grid_size ** 2
        self.pos_embed = nn.Parameter(torch.randn(num_positions, c) * 0.02)
        self.pre_norm = nn.LayerNorm(c, eps=config.layer_norm_eps) if config.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.checkpointing = CheckpointPolicy()
        self.frozen_dtype: torch.dtype | None = None

    @classmethod
    def from_pretrained(cls, path, **overrides) -> VisionEncoder:
        """Load a local Hugging Face checkpoint directory (CLIP, SigLIP, DINOv2);
        `overrides` replace config fields, e.g. interpolate_pos=True."""
        config, state, unexpected = hf_vision.read_hf_vision(path, **overrides)
        encoder = cls(config)
        expected = encoder.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected += [k for k in state if k not in expected]  # e.g. registers for a config without
        shapes = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}"
                  for k, v in state.items() if k in expected and v.shape != expected[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(f"{path}: checkpoint does not match a {config.family} encoder: "
                             f"missing keys (fastvlm names) {missing}, unexpected keys {sorted(unexpected)}, "
                             f"shape mismatches {shapes}")
        encoder.load_state_dict(state)
        return encoder

    # -- modes -------------------------------------------------------------

    def set_checkpointing(self, policy: CheckpointPolicy | str) -> VisionEncoder:
        self.checkpointing = CheckpointPolicy.parse(policy)
        return self

    def freeze(self, dtype: torch.dtype | None = torch.bfloat16) -> VisionEncoder:
        """Frozen tower: no parameter trains and forward builds no autograd graph,
        even inside a training step; weights are cast to `dtype` (None keeps them)."""
        self.requires_grad_(False)
        self.eval()
        if dtype is not None:
            self.to(dtype)
        self.frozen_dtype = self.patch_embed.weight.dtype
        return self

    @property
    def frozen(self) -> bool:
        return self.frozen_dtype is not None

    # -- forward -----------------------------------------------------------

    def resolve_layers(self, select_layers: Sequence[int]) -> list[int]:
        """Map hidden-state indices (negative from the end) to 0..num_layers."""
        count = self.config.num_layers + 1
        if isinstance(select_layers, int) or not len(select_layers):
            raise ValueError(f"select_layers: expected a non-empty sequence of ints, got {select_layers!r}")
        resolved = []
        for index in select_layers:
            if not -count <= index < count:
                raise ValueError(f"select_layers: {index} out of range for {count} hidden states "
                                 f"(embeddings + {self.config.num_layers} layers)")
            resolved.append(index % count)
        return resolved

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        cfg = self.config
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"pixel_values: expected a [B, {cfg.num_channels}, H, W] tensor, got {shape}")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values: expected normalised floating-point pixels, got {pixel_values.dtype} "
                             "(raw image bytes?); make them with fastvlm.models.preprocess.ImagePreprocessor")
        batch, channels, height, width = pixel_values.shape
        if batch == 0:
            raise ValueError(f"pixel_values: empty batch, shape {tuple(pixel_values.shape)}")
        if channels != cfg.num_channels:
            raise ValueError(f"pixel_values: expected {cfg.num_channels} channels, got {channels}")
        if not cfg.interpolate_pos and (height, width) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"pixel_values: expected {cfg.image_size}x{cfg.image_size} images, got "
                             f"{height}x{width}; set interpolate_pos=True to resample the position grid")
        if height < cfg.patch_size or width < cfg.patch_size:
            raise ValueError(f"pixel_values: images must be at least one patch ({cfg.patch_size}) "
                             f"high and wide, got {height}x{width}")
        check_finite(pixel_values, "pixel_values", "NaN or inf pixels (a corrupt image or a bad normalisation?)")

    def position_embeddings(self, grid_h: int, grid_w: int) -> torch.Tensor:
        cfg = self.config
        n_cls = int(cfg.class_token)
        if (grid_h, grid_w) == (cfg.grid_size, cfg.grid_size):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:n_cls], self.pos_embed[n_cls:]
        grid = patch_pos.reshape(1, cfg.grid_size, cfg.grid_size, -1).permute(0, 3, 1, 2)
        # Resample in fp32: bicubic in half precision visibly shifts the embeddings.
        grid = F.interpolate(grid.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False,
                             antialias=cfg.interpolate_antialias).to(patch_pos.dtype)
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)])

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        b, c, grid_h, grid_w = patches.shape
        x = patches.flatten(2).transpose(1, 2)
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(b, 1, c), x], dim=1)
        x = x + self.position_embeddings(grid_h, grid_w)
        if self.registers is not None:  # after the class token, without positions
            x = torch.cat([x[:, :1], self.registers.expand(b, -1, -1), x[:, 1:]], dim=1)
        return self.pre_norm(x)

    def forward(self, pixel_values: torch.Tensor, select_layers: Sequence[int] = (-1,)) -> list[torch.Tensor]:
        """Hidden states at `select_layers` (0 = embeddings, -1 = last block), each [B, T, C]."""
        self.check_pixels(pixel_values)
        layers = self.resolve_layers(select_layers)
        if self.training and not self.frozen and self.config.dropout > 0:
            raise ValueError(f"dropout: the checkpoint's attention_dropout / hidden_dropout_prob / "
                             f"attention_probs_dropout_prob / drop_path_rate ({self.config.dropout}) is not "
                             "implemented; to train without it set "
                             "encoder.config = encoder.config.replace(dropout=0.0), or freeze the tower")
        if self.frozen:
            # no_grad rather than inference_mode: inference tensors could not be
            # saved for backward by the trainable connector that consumes them.
            with torch.no_grad(), torch.autocast(pixel_values.device.type, enabled=False):
                return self._forward(pixel_values.to(self.frozen_dtype), layers)
        return self._forward(pixel_values, layers)

    def _forward(self, pixel_values: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        x = self.embed(pixel_values)
        depth = max(layers)
        outputs = run_blocks(self.blocks[:depth], x, self.checkpointing,
                             keep=[i - 1 for i in layers if i > 0])
        states = dict(zip(sorted({i for i in layers if i > 0}), outputs))
        states[0] = x
        return [states[i] for i in layers]

