"""reduce_tokens (the reference) against an explicit per-token loop."""
import pytest
import torch

from fastvlm.ops.token_reduction import reduce_tokens, reduce_tokens_backward
from tests.utils import assert_close_float64


def loop_reduce(x, mode, h, w):
    b, _, c = x.shape
    grid = x.reshape(b, h, w, c)
    rows = []
    for i in range(h // 2):
        for j in range(w // 2):
            block = [grid[:, 2 * i + di, 2 * j + dj] for di in (0, 1) for dj in (0, 1)]
            rows.append(torch.cat(block, -1) if mode == "pixel_shuffle" else sum(block) / 4)
    return torch.stack(rows, 1)


@pytest.mark.parametrize("mode", ["pixel_shuffle", "avg_pool"])
@pytest.mark.parametrize("grid", [(4, 6), (24, 24)])
def test_matches_loop_and_backward(seed, mode, grid):
    x = torch.randn(2, grid[0] * grid[1], 5, dtype=torch.float64, requires_grad=True)
    out = reduce_tokens(x, mode, grid if grid[0] != grid[1] else None)
    assert out.shape[1] == grid[0] * grid[1] // 4
    want = loop_reduce(x, mode, *grid)
    if mode == "pixel_shuffle":  # a permutation: exact
        assert torch.equal(out, want)
    else:  # a mean of four, summed in some order: float64 vs float64, bound by the loop in fp32
        assert_close_float64(out, want, loop_reduce(x.detach().float(), mode, *grid))
    g = torch.randn_like(out)
    (expected,) = torch.autograd.grad(out, x, g)
    assert torch.equal(reduce_tokens_backward(g, mode, grid), expected)  # a permutation, or a copy / 4: exact


def test_bad_grid():
    with pytest.raises(ValueError, match="grid: 2x2 reduction needs an even grid, got 3x4"):
        reduce_tokens(torch.randn(1, 12, 2), "avg_pool", (3, 4))
    with pytest.raises(ValueError, match="reduce: expected"):
        reduce_tokens(torch.randn(1, 16, 2), "max_pool")
