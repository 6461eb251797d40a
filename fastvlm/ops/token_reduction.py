"""Visual token reduction by 2x2 neighbourhoods of the encoder's patch grid.

x: [B, T, C] with T = H * W patch tokens in row-major grid order (H, W even).
Both modes give T / 4 tokens in row-major order over the (H/2, W/2) grid:

- ``pixel_shuffle`` (space-to-depth): token (i, j) is the concatenation of the
  four tokens (2i+di, 2j+dj), in the order q = 2*di + dj, so its width is 4C:
  ``out[b, i*(W/2)+j, q*C + c] = x[b, (2i+di)*W + 2j+dj, c]``.
- ``avg_pool``: token (i, j) is the mean of those four tokens, width C.

This is the reference. The fused connector kernels read their first GEMM's
input through the same index map instead of materialising the result.
"""
from __future__ import annotations

import math

import torch

REDUCE_MODES = ("pixel_shuffle", "avg_pool")


def reduced_grid(tokens: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    """The (H, W) patch grid of `tokens` tokens: `grid` if given, else square."""
    if grid is None:
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"grid: {tokens} tokens are not a square grid; pass grid=(H, W)")
        grid = (side, side)
    h, w = (int(g) for g in grid)
    if h * w != tokens:
        raise ValueError(f"grid: {h}x{w} does not hold {tokens} tokens")
    if h % 2 or w % 2:
        raise ValueError(f"grid: 2x2 reduction needs an even grid, got {h}x{w}")
    return h, w


def check_reduce(mode: str | None, x: torch.Tensor, grid) -> tuple[int, int] | None:
    """Validates a reduction request on x; returns the grid (None for no reduction)."""
    if mode is None:
        return None
    if mode not in REDUCE_MODES:
        raise ValueError(f"reduce: expected None or one of {REDUCE_MODES}, got {mode!r}")
    if x.dim() != 3:
        raise ValueError(f"x: token reduction needs [B, T, C] input, got shape {tuple(x.shape)}")
    return reduced_grid(x.shape[1], grid)


def reduce_tokens(x: torch.Tensor, mode: str, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """[B, H*W, C] -> [B, H*W/4, 4C] (pixel_shuffle) or [B, H*W/4, C] (avg_pool)."""
    h, w = check_reduce(mode, x, grid)
    b, _, c = x.shape
    blocks = x.reshape(b, h // 2, 2, w // 2, 2, c)  # [b, i, di, j, dj, c]
    if mode == "avg_pool":
        return blocks.mean(dim=(2, 4)).reshape(b, h * w // 4, c)
    return blocks.permute(0, 1, 3, 2, 4, 5).reshape(b, h * w // 4, 4 * c)


def reduce_tokens_backward(grad: torch.Tensor, mode: str, grid: tuple[int, int]) -> torch.Tensor:
    """The gradient of reduce_tokens w.r.t. x, given the gradient of its output."""
    h, w = grid
    b = grad.shape[0]
    if mode == "avg_pool":
        c = grad.shape[-1]
        g = (grad * 0.25).reshape(b, h // 2, 1, w // 2, 1, c)
        return g.expand(b, h // 2, 2, w // 2, 2, c).reshape(b, h * w, c)
    c = grad.shape[-1] // 4
    g = grad.reshape(b, h // 2, w // 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5)
    return g.reshape(b, h * w, c)
