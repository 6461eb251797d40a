"""Random and hand-written layouts shared by the tests."""
import random

import torch

from fastvlm.ops import KINDS, AttentionLayout


def random_metadata(rng: random.Random, batch: int, n: int, kind: str, padding: bool = True):
    """The one random layout generator: packed rows of samples (segments), with padding
    gaps between and after them (or rows filled end to end without `padding`), sometimes
    one sample filling the rest of its row; image runs inside samples, short ones and ones
    spanning many tiles, at a sample's start, middle or end (image ids restart in every
    sample: equal ids of two samples are two images); and (prefix_lm) one prefix run per
    sample, usually at its start."""
    seg = torch.full((batch, n), -1, dtype=torch.int32)
    img = torch.full((batch, n), -1, dtype=torch.int32)
    pre = torch.zeros((batch, n), dtype=torch.bool)
    for b in range(batch):
        pos, s = 0, 0
        while pos < n:
            if padding and rng.random() < 0.15:
                pos += rng.randint(1, 9)
                continue
            length = n - pos if rng.random() < 0.1 else min(n - pos, rng.randint(1, n // 2 + 1))
            seg[b, pos:pos + length] = s
            p_len = rng.randint(0, length)
            p_start = pos + (rng.randint(0, length - p_len) if rng.random() < 0.25 else 0)
            pre[b, p_start:p_start + p_len] = True
            i, image = pos, 0
            while i < pos + length:
                if rng.random() < 0.35:
                    room = pos + length - i
                    run = rng.randint(1, room) if rng.random() < 0.2 else min(room, rng.randint(1, 24))
                    img[b, i:i + run] = image
                    image, i = image + 1, i + run
                else:
                    i += rng.randint(1, 8)
            s, pos = s + 1, pos + length
    return seg, img, (pre if kind == "prefix_lm" else None)


def random_layout(rng: random.Random, batch: int, n: int, kind: str, split_softmax=False, device="cpu",
                  padding: bool = True) -> AttentionLayout:
    seg, img, pre = random_metadata(rng, batch, n, kind, padding)
    return AttentionLayout(seg.to(device), img.to(device), None if pre is None else pre.to(device),
                           kind, split_softmax=split_softmax)


def random_branch_metadata(rng: random.Random, seg: torch.Tensor, img: torch.Tensor, pre, max_branches: int = 3):
    """Shared-prompt rows from random_metadata's: most samples become a prompt (sometimes
    empty) and 1..max_branches answers of random lengths (some of one token); an image run
    that would cross a branch boundary is split there into two images, a prefix is cut at
    the end of the branch it starts in. -> (branch_ids, image_ids, prefix_mask)."""
    batch, n = seg.shape
    branch = torch.zeros_like(seg)
    for b in range(batch):
        for s in seg[b].unique().tolist():
            if s < 0 or rng.random() < 0.2:
                continue
            where = (seg[b] == s).nonzero().flatten()
            start, length = int(where[0]), len(where)
            k = rng.randint(1, max_branches)
            cuts = sorted(rng.randint(0, length) for _ in range(k))
            for i, c in enumerate(cuts):
                branch[b, start + c:start + length] = i + 1
    img, pre = img.clone(), None if pre is None else pre.clone()
    prev = torch.cat([torch.full_like(img[:, :1], -1), img[:, :-1]], 1)
    prev_branch = torch.cat([branch[:, :1], branch[:, :-1]], 1)
    crossing = (img >= 0) & (img == prev) & (branch != prev_branch)
    img = torch.where(img >= 0, img * (n + 1) + crossing.long().cumsum(1), -1).to(torch.int32)  # new id per part
    if pre is not None:
        for b in range(batch):
            on = pre[b].nonzero().flatten().tolist()
            for i in on:
                if branch[b, i] != branch[b, on[0]] or seg[b, i] != seg[b, on[0]]:
                    pre[b, i] = False
    return branch, img, pre


def random_branched_layout(rng: random.Random, batch: int, n: int, kind: str, split_softmax=False,
                           max_branches: int = 3, padding: bool = True, device="cpu") -> AttentionLayout:
    seg, img, pre = random_metadata(rng, batch, n, kind, padding)
    branch, img, pre = random_branch_metadata(rng, seg, img, pre, max_branches)
    return AttentionLayout(seg.to(device), img.to(device), None if pre is None else pre.to(device), kind,
                           split_softmax=split_softmax, branch_ids=branch.to(device))


def _branches_in_dtype(q, k, v, layout: AttentionLayout, scale: float):
    """Per softmax branch: (probabilities P [B, H, N, N], whether the row has a key)."""
    scores = (q @ k.transpose(-1, -2)) * scale
    for mask in layout.dense_split() if layout.split_softmax else (layout.dense(),):
        live = mask.any(-1, keepdim=True)[:, None]  # [B, 1, N, 1]
        allowed = (mask[:, None] | ~live)  # a row without keys softmaxes over all, then is zeroed
        yield torch.where(live, torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1), 0)


def attention_in_dtype(q, k, v, layout: AttentionLayout, scale: float) -> torch.Tensor:
    """Plain PyTorch attention over the layout's dense mask, computed in the inputs' dtype
    throughout (flash-attn's ``attention_ref(upcast=False)``): the baseline whose error
    against float64 bounds a kernel's (the reference itself computes half inputs in fp32).
    Rows without a key give 0."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return sum(p @ v for p in _branches_in_dtype(q, k, v, layout, scale))


def attention_grads_in_dtype(q, k, v, dout, layout: AttentionLayout, scale: float):
    """attention_in_dtype's output and dq, dk, dv, all in the inputs' dtype, by the
    FlashAttention backward: dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O)). Autograd's softmax backward,
    P ∘ (g − Σ P g), is exactly 0 for a query with one key; the flash form subtracts two
    rounded values there and leaves ~u·|dO|·|V| (what the kernels and the blockwise
    reference do), so only it is a fair baseline for dq and dk."""
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    out, dq, dk, dv = 0, 0, 0, 0
    dp = dout @ vr.transpose(-1, -2)
    for p in _branches_in_dtype(q, kr, vr, layout, scale):
        o = p @ vr
        ds = p * (dp - (dout * o).sum(-1, keepdim=True))
        out, dv = out + o, dv + p.transpose(-1, -2) @ dout
        dq, dk = dq + (ds @ kr) * scale, dk + (ds.transpose(-1, -2) @ q) * scale

    def per_kv_head(t):  # [B, Hq, N, D] -> [B, Hkv, N, D]: GQA heads sum their gradients
        return t.unflatten(1, (k.shape[1], group)).sum(2)
    return out, dq, per_kv_head(dk), per_kv_head(dv)


def attention_grads(fn, q, k, v, dout, layout: AttentionLayout, scale: float, dtype: torch.dtype):
    """fn(q, k, v, layout, scale)'s output and dq, dk, dv by autograd, on q, k, v, dout cast
    to dtype (exactly: a cast up, or none)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, layout, scale)
    out.backward(dout.to(dtype))
    return out.detach(), *(t.grad for t in leaves)


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
