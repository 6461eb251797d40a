"""fastvlm attention registered in transformers as ``"fastvlm"``.

Two registrations, both needed (measured on transformers 5.23): an
AttentionInterface function, and an AttentionMaskInterface function of the
same name. Without the latter transformers passes ``attention_mask=None`` to
every layer, dropping padding and every multimodal rule. Our mask function
builds no dense mask: it returns a ``MaskRequest`` (the arguments transformers
would have built one from), which reaches the attention function unchanged.

The attention function then takes one of three paths:
- the fastvlm path, when the query covers the whole key range from position 0
  (training, and the prefill of ``generate``) and the patched top-level forward
  passed its ``fastvlm_layout``: ``multimodal_attention`` under that layout;
- transformers' own eager attention when ``output_attentions`` is asked for
  (the only implementation that returns the maps), on the mask the fastvlm
  path applies (see _forward_mask), or transformers' where that path does not
  apply;
- transformers' own ``sdpa`` attention otherwise (decode steps with a cache,
  static caches, a language model called on its own, and inputs the layout has
  no rule for, such as a PaliGemma prefix in several runs), with the dense mask
  transformers itself would have built from the same request.
Wherever the forward's layout applies but a dense mask is used, pairs of
different packed samples are removed from it, so packing never depends on the path.

Sliding-window layers (Gemma 3's, and any layer transformers calls with a
``sliding_window``) run on fastvlm attention too, under the same layout with a
``window`` (key > query - window, transformers' rule; keys after the query that
the kind allows stay). Packed samples stay apart there as well (transformers'
own sliding mask with packing lets a token see another sample's tokens).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from fastvlm.ops import multimodal_attention

NAME = "fastvlm"
LAYOUT_KWARG = "fastvlm_layout"


@dataclass
class MaskRequest:
    """What transformers' mask factory was asked for (see masking_utils.sdpa_mask)."""

    kwargs: dict = field(repr=False)
    # Looks like a prepared 4-D mask to transformers, so a nested model that builds its
    # mask again from ours (PaliGemma's Gemma) gets it back unchanged (see mask_request).
    ndim = 4

    @property
    def shape(self) -> tuple[int, int, int, int]:
        kw = self.kwargs
        return (kw["batch_size"], 1, kw["q_length"], kw["kv_length"])

    @property
    def covers_prefix(self) -> bool:
        """The queries are positions 0..q_length-1 and see exactly those keys (no cache offset)."""
        kw = self.kwargs
        return (isinstance(kw.get("q_offset", 0), int) and kw.get("q_offset", 0) == 0
                and kw.get("kv_offset", 0) == 0 and kw["q_length"] == kw["kv_length"])

    def dense(self, materialize: bool = False):
        """transformers' own sdpa mask for this request: bool [B, 1, q, kv], or None (plain
        causal, sdpa's is_causal) unless ``materialize``."""
        kw = {k: v for k, v in self.kwargs.items() if k not in ("dtype", "config")}
        if materialize:
            kw.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
        return sdpa_mask(**kw)

    def contiguous(self):
        """The dense sdpa mask: ``generate`` calls this on the masks it prepares for a static
        (compileable) cache, and passes them to the forward as a prepared 4-D mask."""
        return self.dense()


def mask_request(**kwargs) -> MaskRequest:
    outer = kwargs.get("attention_mask")
    return outer if isinstance(outer, MaskRequest) else MaskRequest(kwargs)


def fastvlm_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                              scaling: float | None = None, sliding_window: int | None = None,
                              softcap: float | None = None, **kwargs):
    """transformers' attention-function contract: q [B, H, N, D], k/v [B, Hkv, N, D] ->
    ([B, N, H, D], attention weights [B, H, N, N] where output_attentions asks for them, else None)."""
    if softcap is not None:
        raise ValueError(f"softcap: fastvlm attention has no logit soft-capping (got {softcap}); "
                         f"unpatch this model or patch it with attention=False")
    if dropout and module.training:
        raise ValueError(f"dropout: fastvlm attention has no attention dropout (got {dropout}); set the "
                         f"config's attention_dropout to 0 or patch with attention=False")
    layouts = kwargs.pop(LAYOUT_KWARG, None)  # hf_layout.ForwardLayouts
    request = attention_mask if isinstance(attention_mask, MaskRequest) else None
    if not (request is not None and layouts is not None and request.covers_prefix
            and layouts.shape == (query.shape[0], query.shape[2]) and key.shape[2] == query.shape[2]):
        layouts = None  # this call is not the forward's own prefix: a decode step, a cache, a nested model
    eager = bool(kwargs.get("output_attentions"))
    layout = None
    if layouts is not None and layouts.full is not None:
        layout = layouts.get(sliding_window)
        layout = layout if layout.device == query.device else layout.to(query.device)
    if layout is not None and not eager:
        device = query.device.type
        if torch.is_autocast_enabled(device):  # as autocast runs SDPA: q, k, v in its dtype (mixed under QLoRA)
            query, key, value = (t.to(torch.get_autocast_dtype(device)) for t in (query, key, value))
        out = multimodal_attention(query, key, value, layout, scale=scaling)
        return out.transpose(1, 2), None
    if request is None:
        mask = attention_mask
    elif layouts is None:
        mask = request.dense(materialize=eager)  # eager needs every mask built (it has no is_causal)
    else:
        mask = _forward_mask(request, layouts, layout)
    if eager:
        if mask is not None and mask.dtype == torch.bool:  # transformers' eager_mask: 0 or the dtype's min
            mask = torch.where(mask, torch.zeros((), dtype=query.dtype, device=mask.device),
                               torch.finfo(query.dtype).min)
        return _eager_attention(module)(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                        **kwargs)
    sdpa_kwargs = {k: v for k, v in kwargs.items() if k in ("is_causal", "position_bias", "cache")}
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                  **sdpa_kwargs)


def _forward_mask(request: MaskRequest, layouts, layout) -> torch.Tensor:
    """bool [B, 1, N, N]: the mask of the forward's own prefix call on a dense path. A live
    query's row is the layout's (the pairs the fastvlm path attends; equal to transformers'
    row wherever transformers keeps samples apart), or without a layout transformers' row
    less other samples' keys; a padding query's row is transformers' (it attends nothing
    on the fastvlm path, but eager still returns a row for it)."""
    mask = request.dense(materialize=True)
    if layout is None:
        return mask & ~layouts.across_samples(mask.device)
    live = (layout.segment_ids >= 0)[:, None, :, None]
    return torch.where(live, layout.dense()[:, None], mask)


def _eager_attention(module):
    """The model's own eager attention function (each transformers model defines one)."""
    return importlib.import_module(type(module).__module__).eager_attention_forward


def register() -> None:
    """Register the "fastvlm" attention and mask functions (idempotent, process-wide)."""
    AttentionInterface.register(NAME, fastvlm_attention_forward)
    AttentionMaskInterface.register(NAME, mask_request)


def qwen_vision_attention_forward(module, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    """Qwen2-VL / Qwen2.5-VL vision attention on fastvlm's varlen path: every image (or
    window, in Qwen2.5's windowed layers) of the flattened patch sequence attends only
    within itself, by ``cu_seqlens``, in one call. transformers offers no extension point
    here (outside flash-attn it splits the sequence into one SDPA call per image), so the
    module's forward is replaced on the instance; it uses the module's own ``qkv`` and
    ``proj`` (LoRA-wrapped ones included) and transformers' rotary function."""
    from fastvlm.ops import multimodal_attention_varlen

    rotary = _qwen_rotary(module)
    n = hidden_states.shape[0]
    q, k, v = module.qkv(hidden_states).reshape(n, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = rotary(q, k, cos, sin)
    # a segment made of one image run: bidirectional within each cu_seqlens sample
    out = multimodal_attention_varlen(q, k, v, cu_seqlens.to(torch.int32),
                                      image_ids=torch.zeros(n, dtype=torch.int32, device=q.device),
                                      kind="image_bidirectional", scale=module.scaling)
    return module.proj(out.reshape(n, -1))


def _qwen_rotary(module):
    return importlib.import_module(type(module).__module__).apply_rotary_pos_emb_vision
