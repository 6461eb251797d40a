"""Contrastive image-text losses computed in chunks, and the heads a `contrastive` stage trains.

``contrastive_loss(image_emb, text_emb)`` is SigLIP's pairwise sigmoid loss by
default (every image-text pair is a binary classification, logit = t <x, y> + b),
or CLIP's symmetric softmax loss (InfoNCE over the rows and over the columns).
Both need the B x B similarity matrix; it is built ``chunk`` rows at a time in the
forward and rebuilt the same way in the backward (a custom autograd function that
saves only the embeddings and, for softmax, the O(B) row/column log-sum-exps), so
neither pass holds more than a chunk x B block; bf16 / fp16 embeddings are compared and
summed in fp32. ``contrastive_loss_reference`` is the
plain unchunked definition that the tests check the chunked path against.

``ContrastiveHeads`` pools a vision encoder's hidden states (mean of the patch
tokens or the class token) and the LLM's token states or embeddings (mean over the
real tokens), projects each to a shared width, and holds the learnable temperature
(SigLIP: log t = log 10, b = -10; CLIP: log t = log(1/0.07), no bias).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("sigmoid", "softmax")
IMAGE_POOLS = ("mean", "cls")
TEXT_SOURCES = ("embeddings", "llm")
MAX_LOG_SCALE = math.log(100.0)
INIT = {"sigmoid": (math.log(10.0), -10.0), "softmax": (math.log(1 / 0.07), None)}


def _check(image_emb, text_emb, kind, logit_scale, logit_bias, chunk):
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    for name, t in (("image_emb", image_emb), ("text_emb", text_emb)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name}: expected a float tensor [B, D], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"text_emb: shape {tuple(text_emb.shape)} must equal image_emb's {tuple(image_emb.shape)} "
                         "(one caption per image)")
    if image_emb.shape[0] < 1:
        raise ValueError("image_emb: the batch is empty")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected a positive int, got {chunk!r}")
    if kind == "softmax" and logit_bias is not None:
        raise ValueError("logit_bias: CLIP's softmax loss has no bias; pass None")


def _as_scalar(value, like: torch.Tensor) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
    if t.numel() != 1:
        raise ValueError(f"logit_scale/logit_bias: expected a scalar, got shape {tuple(t.shape)}")
    return t.reshape(()).to(like.device)


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, kind: str = "sigmoid", *,
                     logit_scale: torch.Tensor | float | None = None,
                     logit_bias: torch.Tensor | float | None = None, chunk: int = 1024,
                     normalize: bool = True) -> torch.Tensor:
    """Mean loss over the batch; row i of both inputs is a matching pair.

    `logit_scale` is log t (default: the kind's initial value); `logit_bias` b (sigmoid
    only; default -10). The embeddings are L2-normalised first unless `normalize=False`.
    Sigmoid: sum over all B^2 pairs of -log sigmoid(z_ij (t x_i.y_j + b)) / B, z = +1 on
    the diagonal, -1 off it. Softmax: (CE over rows + CE over columns) / 2.
    """
    _check(image_emb, text_emb, kind, logit_scale, logit_bias, chunk)
    init_scale, init_bias = INIT[kind]
    scale = _as_scalar(init_scale if logit_scale is None else logit_scale, image_emb)
    bias = None if kind == "softmax" else _as_scalar(init_bias if logit_bias is None else logit_bias, image_emb)
    if normalize:
        image_emb, text_emb = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    scale = _log_scale(scale, kind).to(image_emb.dtype)
    if kind == "sigmoid":
        return _ChunkedSigmoid.apply(image_emb, text_emb, scale, bias.to(image_emb.dtype), chunk)
    return _ChunkedSoftmax.apply(image_emb, text_emb, scale, chunk)


def contrastive_loss_reference(image_emb, text_emb, kind="sigmoid", *, logit_scale=None, logit_bias=None,
                               normalize=True) -> torch.Tensor:
    """The definition, with the whole B x B logit matrix (tests and small batches)."""
    _check(image_emb, text_emb, kind, logit_scale, logit_bias, 1)
    init_scale, init_bias = INIT[kind]
    scale = _as_scalar(init_scale if logit_scale is None else logit_scale, image_emb)
    if normalize:
        image_emb, text_emb = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    logits = _log_scale(scale, kind).to(image_emb.dtype).exp() * image_emb @ text_emb.T
    bias = None if kind == "softmax" else _as_scalar(init_bias if logit_bias is None else logit_bias, image_emb)
    return loss_from_logits(logits, kind, bias)


def loss_from_logits(logits: torch.Tensor, kind: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of a whole [B, B] matrix of scaled similarities (row i's match is column i)."""
    b = logits.shape[0]
    if kind == "sigmoid":
        signs = 2 * torch.eye(b, dtype=logits.dtype, device=logits.device) - 1
        return -F.logsigmoid(signs * (logits + bias.to(logits.dtype))).sum() / b
    target = torch.arange(b, device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _log_scale(scale: torch.Tensor, kind: str) -> torch.Tensor:
    # CLIP clamps t at 100 so its logits cannot blow up early in training; SigLIP does not.
    return scale.clamp(max=MAX_LOG_SCALE) if kind == "softmax" else scale


def _upcast(*tensors):
    """The tensors in at least float32: bf16/fp16 embeddings are compared in fp32 (the
    exps and the sums over B^2 pairs would lose the loss in half precision); fp32 and
    fp64 stay as they are, without a copy."""
    acc = torch.promote_types(tensors[0].dtype, torch.float32)
    return [t.to(acc) for t in tensors]


def _row_chunks(b: int, chunk: int):
    for start in range(0, b, chunk):
        yield start, min(start + chunk, b)


def _downcast(grads, inputs) -> tuple:
    return tuple(g.to(i.dtype) for g, i in zip(grads, inputs))


class _ChunkedSigmoid(torch.autograd.Function):
    """SigLIP's loss; backward rebuilds each chunk of logits instead of saving them."""

    @staticmethod
    def forward(ctx, x_in, y_in, log_scale, bias_in, chunk):
        ctx.save_for_backward(x_in, y_in, log_scale, bias_in)
        ctx.chunk = chunk
        x, y, log_scale, bias = _upcast(x_in, y_in, log_scale, bias_in)
        b = x.shape[0]
        t = log_scale.exp()
        total = x.new_zeros(())
        for start, end in _row_chunks(b, chunk):
            logits = t * (x[start:end] @ y.T) + bias
            # z_ij = -1 everywhere but the diagonal; flip the diagonal's sign in place.
            logits.neg_().diagonal(offset=start).neg_()
            total += F.logsigmoid(logits).sum()
        return (-total / b).to(x_in.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, y, log_scale, bias = _upcast(*ctx.saved_tensors)
        b, t = x.shape[0], log_scale.exp()
        gx, gy = torch.empty_like(x), torch.zeros_like(y)
        g_scale, g_bias = x.new_zeros(()), x.new_zeros(())
        for start, end in _row_chunks(b, ctx.chunk):
            sims = x[start:end] @ y.T
            # d/dlogit of -log sigmoid(z l) is -z sigmoid(-z l): sigmoid(l) off the diagonal,
            # sigmoid(l) - 1 on it.
            g = torch.sigmoid(t * sims + bias)
            g.diagonal(offset=start).sub_(1)
            g_bias += g.sum()
            gx[start:end] = g @ y
            g_scale += (gx[start:end] * x[start:end]).sum()  # = sum g * sims
            gy.addmm_(g.T, x[start:end])
        k = grad.to(x.dtype) / b
        return _downcast((k * t * gx, k * t * gy, k * t * g_scale, k * g_bias), ctx.saved_tensors) + (None,)


class _ChunkedSoftmax(torch.autograd.Function):
    """CLIP's loss; the column log-sum-exps are accumulated online across row chunks.

    Maxima and log-sums are kept apart (lse = max + log sum) and the diagonal is read
    from the same logit blocks: where the matching pair is the max, logit - max is then
    exactly 0, as in a plain log_softmax, and the small loss does not drown in the
    rounding of lse ~ t."""

    @staticmethod
    def forward(ctx, x_in, y_in, log_scale_in, chunk):
        x, y, log_scale = _upcast(x_in, y_in, log_scale_in)
        b = x.shape[0]
        t = log_scale.exp()
        row_max, row_log_sum, diag = x.new_empty(b), x.new_empty(b), x.new_empty(b)
        col_max, col_sum = x.new_full((b,), -math.inf), x.new_zeros(b)
        for start, end in _row_chunks(b, chunk):
            logits = t * (x[start:end] @ y.T)
            row_max[start:end] = logits.amax(1)
            row_log_sum[start:end] = (logits - row_max[start:end, None]).exp().sum(1).log()
            diag[start:end] = logits.diagonal(offset=start)
            new_max = torch.maximum(col_max, logits.amax(0))
            col_sum = col_sum * (col_max - new_max).exp() + (logits - new_max).exp().sum(0)
            col_max = new_max
        col_log_sum = col_sum.log()
        ctx.save_for_backward(x_in, y_in, log_scale_in, row_max, row_log_sum, col_max, col_log_sum)
        ctx.chunk = chunk
        rows = ((row_max - diag) + row_log_sum).sum()
        cols = ((col_max - diag) + col_log_sum).sum()
        return ((rows + cols) / (2 * b)).to(x_in.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, y, log_scale = _upcast(*ctx.saved_tensors[:3])
        row_max, row_log_sum, col_max, col_log_sum = ctx.saved_tensors[3:]
        b, t = x.shape[0], log_scale.exp()
        gx, gy = torch.empty_like(x), torch.zeros_like(y)
        g_scale = x.new_zeros(())
        for start, end in _row_chunks(b, ctx.chunk):
            sims = x[start:end] @ y.T
            logits = t * sims
            # softmax over the row + softmax over the column - 2 on the diagonal
            g = (((logits - row_max[start:end, None]) - row_log_sum[start:end, None]).exp()
                 + ((logits - col_max[None]) - col_log_sum[None]).exp())
            g.diagonal(offset=start).sub_(2)
            gx[start:end] = g @ y
            g_scale += (gx[start:end] * x[start:end]).sum()  # = sum g * sims
            gy.addmm_(g.T, x[start:end])
        k = grad.to(x.dtype) / (2 * b)
        return _downcast((k * t * gx, k * t * gy, k * t * g_scale), ctx.saved_tensors[:3]) + (None,)


class ContrastiveHeads(nn.Module):
    """Pooling + linear projections of both towers to `embed_dim`, and the loss's temperature."""

    def __init__(self, vision_dim: int, text_dim: int, embed_dim: int, kind: str = "sigmoid",
                 image_pool: str = "mean"):
        super().__init__()
        for name, value in (("vision_dim", vision_dim), ("text_dim", text_dim), ("embed_dim", embed_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
        if image_pool not in IMAGE_POOLS:
            raise ValueError(f"image_pool: expected one of {IMAGE_POOLS}, got {image_pool!r}")
        self.kind, self.image_pool = kind, image_pool
        self.image_proj = nn.Linear(vision_dim, embed_dim)
        self.text_proj = nn.Linear(text_dim, embed_dim)
        init_scale, init_bias = INIT[kind]
        # One-element vectors, not 0-d: FSDP2 shards parameters along a first dimension.
        self.logit_scale = nn.Parameter(torch.tensor([init_scale]))
        self.logit_bias = nn.Parameter(torch.tensor([init_bias])) if init_bias is not None else None

    def image_embedding(self, hidden: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
        """[B, T, vision_dim] encoder states (class/register tokens first) -> [B, embed_dim]."""
        if hidden.dim() != 3:
            raise ValueError(f"hidden: expected [B, T, C] vision states, got {tuple(hidden.shape)}")
        if self.image_pool == "cls":
            if num_prefix_tokens < 1:
                raise ValueError("image_pool: 'cls' needs an encoder with a class token (SigLIP has none; "
                                 "use 'mean')")
            pooled = hidden[:, 0]
        else:
            pooled = hidden[:, num_prefix_tokens:].mean(1)
        return self.image_proj(pooled.to(self.image_proj.weight.dtype))

    def text_embedding(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, N, text_dim] token states and a [B, N] mask of real tokens -> [B, embed_dim]."""
        if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
            raise ValueError(f"mask: expected shape {tuple(hidden.shape[:2])} matching the text states, "
                             f"got {tuple(mask.shape)}")
        weight = mask.to(hidden.dtype)[..., None]
        counts = weight.sum(1)
        if bool((counts == 0).any()):
            raise ValueError("mask: every caption needs at least one real token")
        pooled = (hidden * weight).sum(1) / counts
        return self.text_proj(pooled.to(self.text_proj.weight.dtype))

    def loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        return contrastive_loss(image_emb, text_emb, self.kind, logit_scale=self.logit_scale,
                                logit_bias=self.logit_bias, chunk=chunk)

    def forward(self, vision_tower, pixel_values, llm, input_ids, text_mask, *, text_source: str = "embeddings",
                chunk: int = 1024) -> torch.Tensor:
        """The contrastive loss of a batch of (image, caption) pairs: the vision tower's last
        hidden states, and the caption's token embeddings or the LLM's final states."""
        (vision_hidden,) = vision_tower(pixel_values, select_layers=[-1])
        image_emb = self.image_embedding(vision_hidden, vision_tower.config.num_prefix_tokens)
        text_emb = self.text_embedding(text_states(llm, input_ids, text_mask, text_source), text_mask)
        return self.loss(image_emb, text_emb, chunk)


def text_states(llm, input_ids: torch.Tensor, mask: torch.Tensor, source: str = "embeddings") -> torch.Tensor:
    """Per-token caption states: the LLM's input embeddings, or its final-norm hidden
    states (padding is its own -1 segment, so real tokens never attend to it)."""
    if source not in TEXT_SOURCES:
        raise ValueError(f"text_source: expected one of {TEXT_SOURCES}, got {source!r}")
    if source == "embeddings":
        return llm.model.embed_tokens(input_ids)
    segments = torch.where(mask.bool(), 0, -1).to(torch.int32)
    return llm.hidden_states(input_ids, segment_ids=segments)
