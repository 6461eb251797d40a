"""A packed (or padded) loss forward of a patched transformers VLM on its live tokens only.

Rows of a fixed budget carry padding at their tails (the last row of a plan is often mostly
padding), and every projection, MLP and the LM head would run on it. Given ``segment_ids``
(-1 marks padding), the patched forward moves the live tokens of all rows into one row
[1, T] before the model runs, as fastvlm.VLM does (AttentionLayout.unpadded): each row's
samples stay segments of their own (renumbered, fastvlm.ops.layout.live_segments_as_one_row),
their positions are the ones the caller gave, and each live token keeps the target it had
in its row (the labels are shifted before the move). Attention never crosses a segment, so
the loss and every gradient are those of the padded forward; only the padding's work is gone.

It applies to a loss forward (``labels``) from position 0 that gives ``position_ids`` (a
packed batch's per-sample positions: without them the model would number the one row
0..T-1), asks for no per-token output (hidden states, attention maps), and whose padding
predicts no target. Any other forward runs as given.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvlm.ops.layout import live_segments_as_one_row

# the per-token [B, N] inputs the families' forwards take, moved with the tokens
PER_TOKEN = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "labels")
# what a forward can also carry per token, handled on its own (positions, targets, the segments)
HANDLED = PER_TOKEN + ("position_ids", "shift_labels")


def drop_padding(model, kwargs: dict, segment_ids) -> tuple[dict, torch.Tensor | None]:
    """(the forward's keyword arguments, segment_ids) with the padding of every row dropped
    and the rows joined into one, or both unchanged where that does not apply (see the
    module docstring). ``kwargs``: the patched forward's, ``labels`` included."""
    live = _live_tokens(model, kwargs, segment_ids)
    if live is None:
        return kwargs, segment_ids
    ignore = kwargs.get("ignore_index", -100)
    shifted = kwargs.get("shift_labels")
    if shifted is None:
        shifted = F.pad(kwargs["labels"], (0, 1), value=ignore)[..., 1:]
    if tuple(shifted.shape) != tuple(live.shape) or bool((shifted.to(live.device)[~live] != ignore).any()):
        return kwargs, segment_ids  # a padding token predicts a target: the padded forward counts it
    seg, index, _ = live_segments_as_one_row(torch.where(live, segment_ids.to(live.device), -1))
    out = dict(kwargs)
    for key in PER_TOKEN:
        if kwargs.get(key) is not None:
            out[key] = _take(kwargs[key], index)
    out["shift_labels"] = _take(shifted, index)
    pos = kwargs["position_ids"]
    rows = pos.expand(*pos.shape[:-2], *live.shape)  # [B, N] or [k, B, N] (Qwen's M-RoPE)
    out["position_ids"] = rows.flatten(-2)[..., index.to(pos.device)].unsqueeze(-2)
    return out, seg


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return t.flatten()[index.to(t.device)][None]


def _live_tokens(model, kwargs: dict, segment_ids) -> torch.Tensor | None:
    """bool [B, N]: the tokens that are neither padding by segment_ids nor by attention_mask,
    or None where the forward is not one this applies to."""
    ids = kwargs.get("input_ids")
    if not isinstance(segment_ids, torch.Tensor) or not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None
    shape = tuple(ids.shape)
    if (tuple(segment_ids.shape) != shape or segment_ids.is_floating_point() or segment_ids.dtype == torch.bool
            or kwargs.get("labels") is None or kwargs.get("inputs_embeds") is not None):
        return None
    if any(kwargs.get(k) is not None for k in ("past_key_values", "cache_position")) or _per_token_outputs(model,
                                                                                                             kwargs):
        return None
    pos = kwargs.get("position_ids")
    if not isinstance(pos, torch.Tensor) or pos.dim() not in (2, 3) or pos.shape[-1] != shape[1] \
            or pos.shape[-2] not in (1, shape[0]):
        return None
    for key, value in kwargs.items():
        if key in PER_TOKEN and value is not None and tuple(getattr(value, "shape", ())) != shape:
            return None  # a per-token input of another shape: the model's business, left as is
        if key not in HANDLED and isinstance(value, torch.Tensor) and tuple(value.shape[:2]) == shape:
            return None  # an input of the tokens' shape this module does not know how to move
    live = segment_ids >= 0
    if bool((segment_ids < -1).any()):
        return None  # refused, with its message, by the layout
    mask = kwargs.get("attention_mask")
    if mask is not None:
        live = live & mask.to(live.device).bool()
    return None if bool(live.all()) else live


def _per_token_outputs(model, kwargs: dict) -> bool:
    """Whether the forward returns per-token hidden states or attention maps (as given, else
    the configs' flags), which the caller expects in its [B, N] shape."""
    configs = (model.config, model.config.get_text_config())
    for key in ("output_hidden_states", "output_attentions"):
        asked = kwargs.get(key)
        if asked if asked is not None else any(getattr(cfg, key, False) for cfg in configs):
            return True
    return False
