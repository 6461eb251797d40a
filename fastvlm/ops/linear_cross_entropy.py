"""linear_cross_entropy: LM head + cross-entropy without the [tokens x vocab] logits.

The naive head materialises fp32 logits for every token (a 7B LLaVA step at
4k tokens and a 152k vocabulary holds 2.5 GB of them, twice with the softmax
gradient). Here only tokens whose label is not ``ignore_index`` are projected
at all (in a VLM step, image and prompt tokens are usually ignored), and they
are projected ``chunk_size`` tokens at a time:

- ``fused`` (a plain weight, or an ``nn.Linear`` without hooks): each chunk's
  loss and its gradients w.r.t. hidden states and weight are computed in the
  forward pass, so backward only rescales them: one matmul pass less than
  recomputation, and no logits kept.
- ``checkpointed`` (any other head module: a LoRA-wrapped or 4-bit Linear):
  each chunk calls the module under non-reentrant activation checkpointing, so
  the adapter or quantised weight is honoured (Liger's fused loss reads
  ``lm_head.weight`` directly and silently drops a LoRA adapter there).

Logits are always upcast to fp32 before the softmax, as the naive fp32 head
does, so bf16 models do not lose accuracy in the loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastvlm.ops.backend import register_op, resolve_backend

register_op("linear_cross_entropy",
            {"reference": lambda device: True, "fused": lambda device: True,
             "checkpointed": lambda device: True},
            {"cpu": ("fused", "checkpointed"), "cuda": ("fused", "checkpointed")})



MIN_CHUNK = 256  # below this the per-chunk GEMMs get too thin to run efficiently


def default_chunk_size(tokens: int, hidden: int, vocab: int) -> int:
    """Rows per chunk so one chunk's logits are about as large as the hidden states
    (tokens x hidden), rounded up to a power of two, at least MIN_CHUNK."""
    rows = max(1, -(-tokens // max(1, -(-vocab // hidden))))
    return max(MIN_CHUNK, 1 << (rows - 1).bit_length())


def linear_cross_entropy_reference(hidden, head, labels, *, ignore_index: int = -100,
                                   reduction: str = "mean") -> torch.Tensor:
    """The naive head: all logits in fp32, then cross-entropy (0 if nothing is supervised)."""
    logits = project(head, hidden.reshape(-1, hidden.shape[-1])).to(loss_dtype(hidden.dtype))
    flat = labels.reshape(-1)
    loss = F.cross_entropy(logits, flat, ignore_index=ignore_index, reduction="sum")
    return loss / max(int((flat != ignore_index).sum()), 1) if reduction == "mean" else loss


def linear_cross_entropy(hidden: torch.Tensor, head, labels: torch.Tensor, *, ignore_index: int = -100,
                         reduction: str = "mean", chunk_size: int | None = None,
                         backend: str = "auto") -> torch.Tensor:
    """Cross-entropy of ``head(hidden)`` against ``labels``, never holding all logits.

    hidden: [..., H]; labels: integer [...] (same leading shape); head: a weight
    [V, H] or a module mapping [n, H] -> [n, V]. reduction: ``mean`` over
    supervised tokens (0 when there are none) or ``sum``. chunk_size: supervised
    tokens projected at once (default: see default_chunk_size). backend: ``auto``
    (fused for a plain weight / nn.Linear, else checkpointed), ``fused``,
    ``checkpointed`` or ``reference``.
    """
    check_inputs(hidden, head, labels, chunk_size)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    plain = plain_weight(head)
    if backend == "auto":
        backend = "fused" if plain is not None else "checkpointed"
    backend = resolve_backend("linear_cross_entropy", backend, hidden.device)
    if backend == "reference":
        return linear_cross_entropy_reference(hidden, head, labels, ignore_index=ignore_index,
                                              reduction=reduction)
    h, y, _ = supervised_tokens(hidden, labels, ignore_index)
    count = y.numel()
    scale = 1.0 / max(count, 1) if reduction == "mean" else 1.0
    chunk_size = chunk_size or default_chunk_size(count, hidden.shape[-1], head_rows(head))
    if backend == "fused":
        weight, bias = fused_weight(plain, head)
        return _FusedLinearCE.apply(h, weight, bias, y, scale, chunk_size)
    # Starts as 0 * sum(h) so that a batch with nothing supervised still returns a
    # loss attached to the graph (zero gradient) rather than a constant.
    total = (h.sum() * 0).to(loss_dtype(hidden.dtype))
    for start in range(0, count, chunk_size):
        total = total + checkpoint(chunk_token_ce, head, h[start:start + chunk_size],
                                   y[start:start + chunk_size], use_reentrant=False).sum()
    return total * scale


# ---- shared with linear_logprob (the same head handling, chunking and fused loop) -------------
def supervised_tokens(hidden, labels, ignore_index: int, extra_keep=None):
    """(hidden rows, labels, flat indices) of the tokens whose label is not ignore_index
    (and, when given, where the flat bool mask ``extra_keep`` holds): only these are projected."""
    flat_y = labels.reshape(-1)
    keep = flat_y != ignore_index
    if extra_keep is not None:
        keep &= extra_keep
    keep = keep.nonzero().squeeze(1)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep), flat_y.index_select(0, keep), keep


def head_rows(head) -> int:
    """The vocabulary size of a head (for the default chunk size; 32768 when unknown)."""
    vocab = head.shape[0] if isinstance(head, torch.Tensor) else getattr(head, "out_features", 0)
    return vocab or 32768


def fused_weight(plain, head):
    """The (weight, bias) the fused backend multiplies by, or the error naming the head."""
    if plain is None:
        raise ValueError("head: backend='fused' needs a weight tensor or a plain nn.Linear; "
                         f"got {type(head).__name__} (use backend='checkpointed')")
    return plain


def check_inputs(hidden, head, labels, chunk_size):
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.dim() < 2:
        raise ValueError("hidden: expected a floating tensor [..., H]")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError("labels: expected an integer tensor")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:-1])} (hidden without its last "
                         f"dim), got {tuple(labels.shape)}")
    if isinstance(head, torch.Tensor):
        if head.dim() != 2 or head.shape[1] != hidden.shape[-1]:
            raise ValueError(f"head: expected a weight [V, {hidden.shape[-1]}], got {tuple(head.shape)}")
    elif not callable(head):
        raise ValueError(f"head: expected a weight tensor or a module, got {type(head).__name__}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")


def plain_weight(head):
    """(weight, bias) when the head is a bare matrix or an nn.Linear with nothing hooked on."""
    if isinstance(head, torch.Tensor):
        return head, None
    if type(head) is nn.Linear and not (head._forward_hooks or head._forward_pre_hooks):
        return head.weight, head.bias
    return None


def project(head, h):
    return F.linear(h, head) if isinstance(head, torch.Tensor) else head(h)


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logits and loss in fp32, or fp64 for fp64 inputs (tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_token_ce(head, h, y):
    """Per-token cross-entropy of one chunk through any head module, in the loss dtype."""
    return F.cross_entropy(project(head, h).to(loss_dtype(h.dtype)), y, reduction="none")


def fused_ce_pass(h, weight, bias, y, chunk_size: int, token_scale=None, need=(False, False, False)):
    """One chunked pass over the tokens: their cross-entropies [n] (loss dtype) and, for the
    inputs ``need`` names (h, weight, bias), the gradients of sum_t token_scale_t * ce_t
    (``token_scale``: a number or a tensor [n]; grad_h in h's dtype, the others in the
    loss dtype). No chunk's logits outlive it."""
    need_h, need_w, need_b = need
    ct = loss_dtype(h.dtype)
    grad_h = torch.zeros_like(h) if need_h else None
    grad_w = torch.zeros_like(weight, dtype=ct) if need_w else None
    grad_b = torch.zeros_like(bias, dtype=ct) if need_b else None
    ce = torch.empty(h.shape[0], dtype=ct, device=h.device)
    # One logits buffer for every chunk, written by the GEMM and then turned into the
    # softmax gradient in place: a fresh [chunk, vocab] tensor per chunk (the GEMM's
    # output, logsumexp's shifted copy) is page-faulted in anew on a CPU, which cost as
    # much as the GEMM itself (vocab 32k, 2 cores).
    # (Under autocast, or for bf16/fp16 weights, the GEMM keeps its own dtype and output.)
    direct = (not torch.is_autocast_enabled(h.device.type) and h.dtype == weight.dtype == ct
              and (bias is None or bias.dtype == ct))
    buffer = h.new_empty((min(chunk_size, h.shape[0]), weight.shape[0]), dtype=ct) if direct else None
    for start in range(0, h.shape[0], chunk_size):
        hc, yc = h[start:start + chunk_size], y[start:start + chunk_size]
        if direct:
            logits = buffer[:len(yc)]
            if bias is None:
                torch.mm(hc, weight.t(), out=logits)
            else:
                torch.addmm(bias, hc, weight.t(), out=logits)
        else:
            logits = F.linear(hc, weight, bias).to(ct)
        target = logits.gather(1, yc[:, None]).squeeze(1)
        top = logits.amax(1, keepdim=True)
        exp_sum = logits.sub_(top).exp_().sum(1, keepdim=True)  # logits now hold exp(logit - max)
        ce[start:start + len(yc)] = (top + exp_sum.log()).squeeze(1) - target
        if not (need_h or need_w or need_b):
            continue
        # d(scale * ce)/d(logits) = scale * (softmax - onehot), in the same buffer
        scale = token_scale if not isinstance(token_scale, torch.Tensor) else \
            token_scale[start:start + len(yc), None]
        dlogits = logits.mul_(scale / exp_sum)
        dlogits[torch.arange(len(yc), device=yc.device), yc] -= scale if not isinstance(scale, torch.Tensor) \
            else scale[:, 0]
        if need_h:
            grad_h[start:start + chunk_size] = (dlogits.to(weight.dtype) @ weight).to(h.dtype)
        if need_w:
            grad_w += dlogits.t() @ hc.to(ct)
        if need_b:
            grad_b += dlogits.sum(0)
    return ce, grad_h, grad_w, grad_b


class _FusedLinearCE(torch.autograd.Function):
    """Loss and its input/weight gradients in one chunked forward pass."""

    @staticmethod
    def forward(ctx, h, weight, bias, y, scale: float, chunk_size: int):
        need = (h.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        ce, grad_h, grad_w, grad_b = fused_ce_pass(h, weight, bias, y, chunk_size, scale, need)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return ce.sum() * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_out).to(w_dtype),
                None if grad_b is None else (grad_b * grad_out).to(b_dtype),
                None, None, None)
