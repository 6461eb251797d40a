"""Random and hand-written layouts shared by the tests."""
import random

import torch

from fastvlm.ops import KINDS, AttentionLayout


def random_metadata(rng: random.Random, batch: int, n: int, kind: str):
    """Packed rows: segments with padding gaps, image runs inside segments, and
    (prefix_lm) one prefix run per segment, usually at its start."""
    seg = torch.full((batch, n), -1, dtype=torch.int32)
    img = torch.full((batch, n), -1, dtype=torch.int32)
    pre = torch.zeros((batch, n), dtype=torch.bool)
    for b in range(batch):
        pos, s = 0, 0
        while pos < n:
            if rng.random() < 0.15:
                pos += rng.randint(1, 9)
                continue
            length = min(n - pos, rng.randint(1, n // 2 + 1))
            seg[b, pos:pos + length] = s
            p_len = rng.randint(0, length)
            p_start = pos + (rng.randint(0, length - p_len) if rng.random() < 0.25 else 0)
            pre[b, p_start:p_start + p_len] = True
            i, image = pos, 0
            while i < pos + length:
                if rng.random() < 0.35:
                    run = min(pos + length - i, rng.randint(1, 24))
                    img[b, i:i + run] = image
                    image, i = image + 1, i + run
                else:
                    i += rng.randint(1, 8)
            s, pos = s + 1, pos + length
    return seg, img, (pre if kind == "prefix_lm" else None)


def random_layout(rng: random.Random, batch: int, n: int, kind: str, split_softmax=False, device="cpu"):
    seg, img, pre = random_metadata(rng, batch, n, kind)
    return AttentionLayout(seg.to(device), img.to(device), None if pre is None else pre.to(device),
                           kind, split_softmax=split_softmax)


def all_kinds():
    """(kind, split_softmax) pairs covering every mask the layout can express."""
    return [(k, False) for k in KINDS] + [("mmca", True)]


def parse_mask(picture: str) -> torch.Tensor:
    """Rows of 'x' / '.' -> bool [N, N]."""
    rows = [r.split()[-1] if len(r.split()) > 1 else r.strip() for r in picture.strip().splitlines()]
    return torch.tensor([[c == "x" for c in r] for r in rows])


def tile_classes_from_dense(dense: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    """Brute force: 0 empty, 1 partial, 2 full per tile, from a [B, N, N] mask."""
    b, n, _ = dense.shape
    tq, tk = -(-n // bq), -(-n // bk)
    out = torch.zeros(b, tq, tk, dtype=torch.uint8)
    for i in range(tq):
        for j in range(tk):
            tile = dense[:, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].flatten(1)
            out[:, i, j] = torch.where(tile.all(1), 2, torch.where(tile.any(1), 1, 0)).to(torch.uint8)
    return out
