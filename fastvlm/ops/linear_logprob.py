"""linear_logprob: per-sequence sums of the answer tokens' log-probabilities from the final
hidden states and the LM head, without the [tokens x vocab] logits.

What preference losses (DPO, SimPO, ORPO) take: for each answer s, sum_t log p(y_t | ...)
over its tokens, and how many there were. It is linear_cross_entropy per token (log p = -CE),
summed by sequence, so it runs on linear_cross_entropy's machinery: only counted tokens are
projected, ``chunk_size`` at a time, logits upcast to fp32 (fp64 for fp64 inputs), and

- ``fused`` (a weight tensor or a plain ``nn.Linear``): the forward pass keeps no logits,
  only the counted tokens' hidden rows; backward cannot reuse gradients computed in forward
  as linear_cross_entropy does, because each sequence's upstream gradient weights its own
  tokens (a DPO loss differs per pair), so it recomputes each chunk's logits once and
  forms the gradients from them (one GEMM pass more than linear_cross_entropy, still no
  [tokens x vocab] tensor);
- ``checkpointed`` (any other head module: LoRA, 4-bit): each chunk calls the module under
  non-reentrant activation checkpointing, so adapters and quantised weights count.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from fastvlm.ops.backend import register_op, resolve_backend
from fastvlm.ops.linear_cross_entropy import (
    check_inputs,
    chunk_token_ce,
    default_chunk_size,
    fused_ce_pass,
    fused_weight,
    head_rows,
    loss_dtype,
    plain_weight,
    project,
    supervised_tokens,
)

register_op("linear_logprob",
            {"reference": lambda device: True, "fused": lambda device: True,
             "checkpointed": lambda device: True},
            {"cpu": ("fused", "checkpointed"), "cuda": ("fused", "checkpointed")})


def linear_logprob_reference(hidden, head, labels, sequence_ids, num_sequences: int, *,
                             ignore_index: int = -100):
    """The naive head: all logits in fp32, log_softmax, the labels' entries summed per sequence."""
    logits = project(head, hidden.reshape(-1, hidden.shape[-1])).to(loss_dtype(hidden.dtype))
    flat_y, flat_s = labels.reshape(-1), sequence_ids.reshape(-1)
    counted = (flat_y != ignore_index) & (flat_s >= 0)
    token_logp = logits.log_softmax(-1).gather(1, flat_y.clamp_min(0)[:, None]).squeeze(1)
    index = torch.where(counted, flat_s, 0).long()
    logp = logits.new_zeros(num_sequences).index_add(0, index, torch.where(counted, token_logp, 0))
    return logp, torch.bincount(flat_s[counted].long(), minlength=num_sequences)


def linear_logprob(hidden: torch.Tensor, head, labels: torch.Tensor, sequence_ids: torch.Tensor,
                   num_sequences: int, *, ignore_index: int = -100, chunk_size: int | None = None,
                   backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(logp_sum [S], token_count [S]): per sequence s, the sum of log softmax(head(hidden_t))[labels_t]
    over the tokens t with sequence_ids_t == s and labels_t != ignore_index, and their number.

    hidden: [..., H]; labels: integer [...], the next-token target of each position (aligned
    with hidden as linear_cross_entropy takes them); sequence_ids: integer [...] of the same
    shape, the sequence each position counts towards, -1 = none; num_sequences: S.
    logp_sum is fp32 (fp64 for fp64 hidden states), differentiable w.r.t. hidden and the head;
    token_count is int64. head, chunk_size, backend: as in linear_cross_entropy.
    """
    check_inputs(hidden, head, labels, chunk_size)
    if not isinstance(num_sequences, int) or isinstance(num_sequences, bool) or num_sequences < 0:
        raise ValueError(f"num_sequences: expected an int >= 0, got {num_sequences!r}")
    if (not isinstance(sequence_ids, torch.Tensor) or sequence_ids.is_floating_point()
            or sequence_ids.dtype == torch.bool or sequence_ids.shape != labels.shape):
        raise ValueError(f"sequence_ids: expected an integer tensor of shape {tuple(labels.shape)} (that of labels)")
    flat_s = sequence_ids.reshape(-1)
    if flat_s.numel() and (int(flat_s.min()) < -1 or int(flat_s.max()) >= num_sequences):
        raise ValueError(f"sequence_ids: expected values in [-1, {num_sequences}) (-1 = not counted), got "
                         f"[{int(flat_s.min())}, {int(flat_s.max())}]")
    plain = plain_weight(head)
    if backend == "auto":
        backend = "fused" if plain is not None else "checkpointed"
    backend = resolve_backend("linear_logprob", backend, hidden.device)
    if backend == "reference":
        return linear_logprob_reference(hidden, head, labels, sequence_ids, num_sequences,
                                        ignore_index=ignore_index)
    h, y, keep = supervised_tokens(hidden, labels, ignore_index, extra_keep=flat_s >= 0)
    seq = flat_s.index_select(0, keep).long()
    counts = torch.bincount(seq, minlength=num_sequences)
    chunk_size = chunk_size or default_chunk_size(y.numel(), hidden.shape[-1], head_rows(head))
    if backend == "fused":
        weight, bias = fused_weight(plain, head)
        return _FusedLinearLogprob.apply(h, weight, bias, y, seq, num_sequences, chunk_size), counts
    # 0 * sum(h): attached to the graph (zero gradient) even when nothing is counted
    ce = [(h.sum() * 0).to(loss_dtype(hidden.dtype)).reshape(1)]
    for start in range(0, y.numel(), chunk_size):
        ce.append(checkpoint(chunk_token_ce, head, h[start:start + chunk_size], y[start:start + chunk_size],
                             use_reentrant=False))
    ce = torch.cat(ce)
    return _per_sequence(-ce[1:], seq, num_sequences) + ce[0], counts


def _per_sequence(token_logp, seq, num_sequences: int):
    return token_logp.new_zeros(num_sequences).index_add(0, seq, token_logp)


class _FusedLinearLogprob(torch.autograd.Function):
    """Forward: one chunked pass, no logits kept. Backward: one more, each token's softmax
    gradient weighted by minus its sequence's upstream gradient."""

    @staticmethod
    def forward(ctx, h, weight, bias, y, seq, num_sequences: int, chunk_size: int):
        ce = fused_ce_pass(h, weight, bias, y, chunk_size)[0]
        ctx.save_for_backward(h, weight, bias, y, seq)
        ctx.chunk_size = chunk_size
        # backward recomputes the logits as forward did: under the same autocast, if any
        # (the engine runs backward without it; bf16 hidden states and an fp32 head need it)
        device = h.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return _per_sequence(-ce, seq, num_sequences)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, y, seq = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        token_scale = -grad_out.to(loss_dtype(h.dtype)).index_select(0, seq)
        device, dtype, enabled = ctx.autocast
        with torch.autocast(device, dtype, enabled=enabled):
            _, grad_h, grad_w, grad_b = fused_ce_pass(h, weight, bias, y, ctx.chunk_size, token_scale, need)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)
