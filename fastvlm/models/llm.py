"""Llama / Qwen2 / Mistral-family decoder on fastvlm attention, top to bottom.

RMSNorm -> attention (GQA, RoPE, optional qkv bias) -> RMSNorm -> SwiGLU MLP,
with module names and parameter shapes of transformers' ``*ForCausalLM`` so that
Hugging Face checkpoints load as they are, without transformers at run time.

Attention goes through ``fastvlm.ops.multimodal_attention`` with the batch's
``AttentionLayout``: packed samples (``segment_ids``) never see each other, and
RoPE positions restart at every segment. The loss goes through
``linear_cross_entropy`` and never materialises the [tokens x vocab] logits.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastvlm.nn.checkpointing import CheckpointPolicy, run_blocks
from fastvlm.ops import AttentionLayout, multimodal_attention
from fastvlm.ops.activations import activation, activation_from_hf
from fastvlm.ops.linear_cross_entropy import linear_cross_entropy
from fastvlm.utils.checks import as_int
from fastvlm.utils.config import check_known_keys, require
from fastvlm.utils.io import read_json, read_tensors

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
HF_MODEL_TYPES = ("llama", "qwen2", "mistral")


@dataclass
class LLMConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None = num_attention_heads (no GQA)
    head_dim: int | None = None             # None = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=lambda: {"rope_type": "default"})
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: True
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"        # of the gated MLP
    # Sliding-window attention (Mistral; Qwen2 with use_sliding_window): a query sees the keys
    # less than `sliding_window` tokens before it (transformers' rule), in the layers
    # `sliding_layers` lists (None: every layer), in training and generation alike.
    sliding_window: int | None = None
    sliding_layers: list[int] | None = None
    attention_dropout: float = 0.0  # not implemented: training with it > 0 is refused
    attention_kind: str = "causal"  # layout kind when the caller gives only segment ids

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads: {self.num_key_value_heads} must divide "
                             f"num_attention_heads {self.num_attention_heads}")
        activation(self.hidden_act, "hidden_act")
        if self.sliding_window is not None:
            self.sliding_window = as_int(self.sliding_window, "sliding_window", minimum=1)
        if self.sliding_layers is not None:
            layers = self.num_hidden_layers
            if self.sliding_window is None:
                raise ValueError("sliding_layers: given without a sliding_window")
            if not isinstance(self.sliding_layers, (list, tuple)) or any(
                    isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < layers for i in self.sliding_layers) \
                    or len(set(self.sliding_layers)) != len(self.sliding_layers):
                raise ValueError(f"sliding_layers: expected distinct layer indices in [0, {layers}), "
                                 f"got {self.sliding_layers!r}")
            self.sliding_layers = sorted(self.sliding_layers)
            if len(self.sliding_layers) == layers:  # one form per meaning: every layer is None
                self.sliding_layers = None
            elif not self.sliding_layers:
                self.sliding_window, self.sliding_layers = None, None
        if not 0 <= self.attention_dropout < 1:
            raise ValueError(f"attention_dropout: expected a probability in [0, 1), got {self.attention_dropout}")
        if self.rope_scaling.get("partial_rotary_factor", 1.0) != 1.0:  # transformers applies it to some types
            raise ValueError(f"rope_scaling: partial_rotary_factor {self.rope_scaling['partial_rotary_factor']} "
                             "is not supported (RoPE over the whole head)")
        rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling: unsupported rope_type {rope_type!r}; expected one of "
                             f"{', '.join(ROPE_TYPES)}")

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of decoder layer `layer`, None where it attends to everything."""
        if self.sliding_layers is not None and layer not in self.sliding_layers:
            return None
        return self.sliding_window

    @classmethod
    def from_dict(cls, d: dict) -> "LLMConfig":
        check_known_keys(cls, d, 'config')
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict) -> "LLMConfig":
        """From a transformers config.json (Llama, Qwen2, Mistral; rope settings in
        either the 4.x `rope_theta`/`rope_scaling` or the 5.x `rope_parameters` form)."""
        model_type = hf.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise ValueError(f"config: model_type {model_type!r} is not one of {', '.join(HF_MODEL_TYPES)}")
        require(hf, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"))
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope.setdefault("rope_type", rope.pop("type", "default"))
        # attention_bias / mlp_bias exist in Llama only: Qwen2 always has q/k/v biases, Mistral none
        llama = model_type == "llama"
        attention_bias = llama and bool(hf.get("attention_bias", False))
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=rope,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2" or attention_bias, o_bias=attention_bias,
            mlp_bias=llama and bool(hf.get("mlp_bias", False)),
            hidden_act=activation_from_hf(hf.get("hidden_act", "silu"), "hidden_act"),
            **_hf_sliding_window(hf, model_type),
            attention_dropout=float(hf.get("attention_dropout") or 0.0))


def _hf_sliding_window(hf: dict, model_type: str) -> dict:
    """sliding_window / sliding_layers as transformers applies them: Llama has no window,
    Mistral slides in every layer, Qwen2 only with use_sliding_window and then in the
    layers its layer_types (or, without them, max_window_layers) mark."""
    window = hf.get("sliding_window", 4096)  # transformers' default where the key is absent
    if model_type == "llama" or window is None:
        return {}
    if model_type != "qwen2":
        return {"sliding_window": window}
    if not hf.get("use_sliding_window", False):
        return {}
    layers = hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28)
                                      else "full_attention" for i in range(layers)]
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not sliding:
        return {}
    return {"sliding_window": window, "sliding_layers": None if len(sliding) == layers else sliding}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()  # the variance in fp32 whatever the compute dtype, as the HF models do
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions; the scaling variants of the Llama family."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.rope_type = cfg.rope_scaling.get("rope_type", "default")
        self.register_buffer("inv_freq", self._inv_freq(cfg.rope_theta), persistent=False)

    def _inv_freq(self, base: float) -> torch.Tensor:
        d = self.cfg.head_dim
        inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        s = self.cfg.rope_scaling
        if self.rope_type == "linear":
            inv = inv / s["factor"]
        elif self.rope_type == "llama3":
            factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
            old_len = s["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
            smooth = (old_len / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
            inv = torch.where(medium, smoothed, scaled)
        return inv

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        inv = self.inv_freq.to(positions.device)
        if self.rope_type == "dynamic":  # NTK-aware base growth past the trained length
            seq = int(positions.max()) + 1
            if seq > self.cfg.max_position_embeddings:
                factor, d = self.cfg.rope_scaling["factor"], self.cfg.head_dim
                base = self.cfg.rope_theta * ((factor * seq / self.cfg.max_position_embeddings)
                                              - (factor - 1)) ** (d / (d - 2))
                inv = self._inv_freq(base).to(positions.device)
        freqs = positions[..., None].float() * inv  # [B, N, D/2]
        emb = torch.cat([freqs, freqs], -1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x [B, H, N, D]; rotate the two halves of the head dim (the HF convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_attention_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=cfg.o_bias)

    def forward(self, x, cos, sin, layout: AttentionLayout | None, cache: "KVCache | None" = None):
        b, n, _ = x.shape
        d = self.cfg.head_dim
        q = self.q_proj(x).view(b, n, -1, d).transpose(1, 2)
        k = self.k_proj(x).view(b, n, -1, d).transpose(1, 2)
        v = self.v_proj(x).view(b, n, -1, d).transpose(1, 2)
        # fp32 cos/sin would promote autocast's bf16 q, k; attention wants q, k, v in one dtype
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        if cache is not None:
            k_all, v_all = cache.write(self.layer, k, v)
        window = self.cfg.layer_window(self.layer)
        if layout is not None:  # training, or the prefill of generation
            out = multimodal_attention(q, k, v.contiguous(), layout.with_window(window))
        else:
            out = decode_attention(q, k_all, v_all, cache, window)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


def decode_attention(q, k, v, cache: KVCache, window: int | None = None) -> torch.Tensor:
    """Attention of the newest cache slots (q's tokens, one per decode step or a chunk of
    answers to score) over the cache. New tokens are text and come after the prompt, so
    every kind lets them see every valid key of their row up to their own slot (the
    prompt's own rows were computed by the prefill on its layout), of the prompt (branch
    0) and of their own branch only (answers scored together never see each other), within
    a sliding `window` the keys less than `window` positions before the query; under
    mmca's split softmax the text keys and the image keys are two softmaxes, summed, a
    branch without keys giving 0, as multimodal_attention computes it for a text query."""
    n, new = k.shape[2], q.shape[2]
    slots = torch.arange(n, device=q.device)
    key_branch, query_branch = cache.key_branch[:, None, :n], cache.key_branch[:, n - new:n, None]
    valid = (cache.key_valid[:, None, :n] & (slots[None, None] <= slots[n - new:, None])
             & ((key_branch == 0) | (key_branch == query_branch)))  # [B, new, n]
    if window is not None:  # positions, not cache slots: a right-padded prompt leaves a gap
        pos = cache.key_pos[:, :n]
        valid = valid & (pos[:, None, :] > pos[:, n - new:, None] - window)
    gqa = k.shape[1] != q.shape[1]
    if not cache.split_softmax:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None], enable_gqa=gqa)
    out = torch.zeros_like(q)
    image = cache.key_image[:, None, :n]
    for keys in (valid & ~image, valid & image):
        branch = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None], enable_gqa=gqa)
        out += torch.where(keys.any(-1)[:, None, :, None], branch, 0)  # SDPA gives NaN without keys
    return out


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)
        self.act = activation(cfg.hidden_act, "hidden_act").fn

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, layout, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layout, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


class KVCache:
    """Per-layer keys/values (after RoPE) for generation, [B, Hkv, max_len, D].

    Every row appends at the same index; `key_valid` marks which cached
    positions are real tokens (padding of the prompt stays invalid), `key_image`
    which are image tokens (for mmca's split softmax, `split_softmax`), `key_pos`
    their positions (for a sliding window), `key_branch` their branch (0: the prompt and
    generated tokens; 1..k: answers scored together, LLM.score_answers)."""

    def __init__(self, cfg: LLMConfig, batch: int, max_len: int, dtype, device, split_softmax: bool = False):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.key_image = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.key_pos = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.key_branch = torch.zeros(batch, max_len, dtype=torch.int32, device=device)
        self.split_softmax = split_softmax
        self.length = 0  # positions written by completed steps

    def write(self, layer: int, k, v):
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class LLM(nn.Module):
    """Decoder LM: ``forward(input_ids | inputs_embeds, layout | segment_ids, labels)``."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.checkpointing = CheckpointPolicy()

    def set_checkpointing(self, policy: CheckpointPolicy | str) -> "LLM":
        """Activation checkpointing of the decoder blocks, the same policies as the
        vision encoder's (none, full, selective, every_k:K, offload, <mode>+offload)."""
        self.checkpointing = CheckpointPolicy.parse(policy)
        return self

    def layout_for(self, segment_ids: torch.Tensor, branch_ids=None) -> AttentionLayout:
        return AttentionLayout(segment_ids, kind=self.config.attention_kind, branch_ids=branch_ids)

    def _embed(self, input_ids, inputs_embeds) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids: give exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            check_token_ids(input_ids, self.config.vocab_size)
            return self.model.embed_tokens(input_ids)
        if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 \
                or inputs_embeds.shape[-1] != self.config.hidden_size:
            got = tuple(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else type(inputs_embeds)
            raise ValueError(f"inputs_embeds: expected [B, N, {self.config.hidden_size}], got {got}")
        return inputs_embeds

    def hidden_states(self, input_ids=None, *, inputs_embeds=None, layout: AttentionLayout | None = None,
                      segment_ids=None, position_ids=None, branch_ids=None) -> torch.Tensor:
        """Final-norm hidden states [B, N, H]."""
        return self._run_layers(*self._inputs(input_ids, inputs_embeds, layout, segment_ids, position_ids,
                                              branch_ids))

    def _inputs(self, input_ids, inputs_embeds, layout, segment_ids, position_ids, branch_ids=None):
        """(embeddings, positions, layout) of a forward, checked; the layout built from
        segment_ids (or one segment per row) and branch_ids when none is given."""
        x = self._embed(input_ids, inputs_embeds)
        b, n = x.shape[:2]
        if layout is not None and segment_ids is not None:
            raise ValueError("segment_ids: give a layout or segment_ids, not both (the layout's would win)")
        if layout is not None and branch_ids is not None:
            raise ValueError("branch_ids: give them to the layout, not next to one")
        if self.training and self.config.attention_dropout > 0:
            raise ValueError(f"attention_dropout: {self.config.attention_dropout} is not implemented; set "
                             "config.attention_dropout = 0 to train without it (eval mode is unaffected)")
        if layout is None:
            if segment_ids is None:
                segment_ids = torch.zeros(b, n, dtype=torch.int32, device=x.device)
            layout = self.layout_for(segment_ids, branch_ids)
        if layout.shape != (b, n):
            raise ValueError(f"layout: shape {layout.shape} does not match the tokens ({b}, {n})")
        check_no_window(layout)
        if position_ids is None:  # restart at every packed segment; answers continue the prompt
            position_ids = positions_of(layout)
        check_positions(self.config, n, "input_ids", position_ids, layout.segment_ids >= 0)
        return x, position_ids, layout

    def _run_layers(self, x, position_ids, layout, cache: KVCache | None = None):
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)
        if cache is None:
            (x,) = run_blocks(self.model.layers, x, self.checkpointing, cos=cos, sin=sin, layout=layout)
        else:  # generation: no autograd, so no checkpointing, and each layer has its cache slot
            for block in self.model.layers:
                x = block(x, cos, sin, layout, cache)
            cache.length += x.shape[1]
        return self.model.norm(x)

    @torch.no_grad()
    def generate(self, input_ids=None, *, inputs_embeds=None, attention_mask=None,
                 layout: AttentionLayout | None = None, prefix_mask=None, max_new_tokens: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | None = None,
                 pad_token_id: int = 0, generator: torch.Generator | None = None,
                 suppress_tokens: Sequence[int] = ()) -> torch.Tensor:
        """New tokens [B, max_new_tokens] (pad_token_id after a row's eos); token ids in
        `suppress_tokens` are never chosen.

        Batched prompts may be left- or right-padded (attention_mask 0 = padding).
        The prefill runs on `layout` (e.g. a multimodal one built with the images'
        token metadata) or one of the config's kind from the mask (and `prefix_mask`
        for prefix_lm); decode steps reuse the KV cache and give the tokens the full
        forward over prompt + generated tokens would. temperature 0 = greedy;
        otherwise sampling with nucleus top_p.
        """
        as_int(max_new_tokens, "max_new_tokens", minimum=1)
        if not (temperature >= 0 and 0 < top_p <= 1):
            raise ValueError(f"temperature: must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        suppress = sorted(set(suppress_tokens))
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.config.vocab_size
               for t in suppress):
            raise ValueError(f"suppress_tokens: expected token ids in [0, {self.config.vocab_size}), got {suppress}")
        x = self._embed(input_ids, inputs_embeds)
        b = x.shape[0]
        cache, logits, mask, next_pos = self._prefill(x, attention_mask, layout, prefix_mask, max_new_tokens)
        n = mask.shape[1]
        done = torch.zeros(b, dtype=torch.bool, device=x.device)
        out = []
        for step in range(max_new_tokens):
            logits = logits.float()
            if suppress:
                logits[:, suppress] = float("-inf")
            tok = sample_next(logits, temperature, top_p, generator)
            tok = torch.where(done, pad_token_id, tok)
            out.append(tok)
            if eos_token_id is not None:
                done |= tok == eos_token_id
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            cache.key_valid[:, n + step] = True
            cache.key_pos[:, n + step] = next_pos[:, 0]
            h = self._run_layers(self.model.embed_tokens(tok[:, None]), next_pos, None, cache)
            logits = self.lm_head(h[:, -1])
            next_pos = next_pos + 1
        tokens = torch.stack(out, 1)
        return F.pad(tokens, (0, max_new_tokens - tokens.shape[1]), value=pad_token_id)

    def _prefill(self, x, attention_mask, layout, prefix_mask, new_tokens: int):
        """The prompt x [B, n, H] through the model into a fresh KV cache with room for
        `new_tokens` more: (cache, logits [B, V] of each row's last prompt token, the
        prompt's mask [B, n], the next position [B, 1])."""
        b, n = x.shape[:2]
        mask = (torch.ones(b, n, dtype=torch.bool, device=x.device) if attention_mask is None
                else attention_mask.bool())
        if mask.shape != (b, n):
            raise ValueError(f"attention_mask: expected shape {(b, n)}, got {tuple(mask.shape)}")
        if not bool(mask.any(1).all()):
            raise ValueError("attention_mask: every row needs at least one prompt token")
        if layout is None:
            layout = AttentionLayout(torch.where(mask, 0, -1).to(torch.int32), prefix_mask=prefix_mask,
                                     kind=self.config.attention_kind)
        elif prefix_mask is not None:
            raise ValueError("prefix_mask: give it to the layout, not next to one")
        elif not torch.equal(layout.segment_ids >= 0, mask):
            raise ValueError("layout: its padding must match attention_mask")
        check_no_window(layout)
        if bool((_segment_count(layout.segment_ids) > 1).any()):
            raise ValueError("layout: generate continues one sample per row; a row packs several segments")
        if layout.branch_ids is not None:
            raise ValueError("layout: the cached prompt is one branch; give the answers to score_answers")
        check_positions(self.config, int(mask.sum(1).max()) + new_tokens - 1, "max_new_tokens")
        cache = KVCache(self.config, b, n + new_tokens, x.dtype, x.device, split_softmax=layout.split_softmax)
        cache.key_valid[:, :n] = mask
        cache.key_image[:, :n] = layout.image_ids >= 0
        positions = positions_of(layout)
        cache.key_pos[:, :n] = positions
        h = self._run_layers(x, positions, layout, cache)
        last = n - 1 - mask.flip(1).long().argmax(1)  # last prompt token of each row
        return cache, self.lm_head(h[torch.arange(b), last]), mask, mask.sum(1, keepdim=True)

    @torch.no_grad()
    def score_answers(self, answers: Sequence[torch.Tensor], input_ids=None, *, inputs_embeds=None,
                      attention_mask=None, layout: AttentionLayout | None = None, prefix_mask=None
                      ) -> list[torch.Tensor]:
        """The logits that predict each answer's tokens after a shared prompt, [B, L_j, V] per
        answer [B, L_j] (its first from the prompt's last token): what a forward over
        [prompt | answer] gives there. The prompt (its layout and padding as in `generate`) is
        prefilled once into the KV cache; then all answers run as one chunk, each token seeing
        the cached prompt and its own answer so far, never another answer (the cache's branch
        ids; decode_attention), positions continuing from the prompt's end for every answer."""
        if not isinstance(answers, (list, tuple)) or not answers:
            raise ValueError("answers: expected a non-empty list of token id tensors [B, L]")
        x = self._embed(input_ids, inputs_embeds)
        b = x.shape[0]
        for j, a in enumerate(answers):
            check_token_ids(a, self.config.vocab_size, f"answers[{j}]")
            if a.shape[0] != b:
                raise ValueError(f"answers[{j}]: expected {b} rows (the prompt's), got {a.shape[0]}")
        lengths = [a.shape[1] for a in answers]
        total = sum(lengths)
        cache, first, mask, next_pos = self._prefill(x, attention_mask, layout, prefix_mask, total)
        n = mask.shape[1]
        branch = torch.cat([torch.full((ln,), j + 1, dtype=torch.int32) for j, ln in enumerate(lengths)])
        within = torch.cat([torch.arange(ln) for ln in lengths])
        positions = next_pos + within.to(x.device)[None]  # [B, total]
        cache.key_valid[:, n:n + total] = True
        cache.key_branch[:, n:n + total] = branch.to(x.device)
        cache.key_pos[:, n:n + total] = positions
        h = self._run_layers(self.model.embed_tokens(torch.cat(list(answers), 1)), positions, None, cache)
        logits = self.lm_head(h)
        out, start = [], 0
        for ln in lengths:
            out.append(torch.cat([first[:, None], logits[:, start:start + ln - 1]], 1))
            start += ln
        return out

    def forward(self, input_ids=None, *, inputs_embeds=None, layout=None, segment_ids=None,
                position_ids=None, labels=None, branch_ids=None):
        """Logits [B, N, V] without labels; with labels, the mean next-token loss
        (label -100 is ignored; a token never predicts across a segment boundary, nor from
        one answer of a shared prompt into the next: `branch_ids`, see AttentionLayout; the
        prompt's last token predicts the first answer's first token only).

        With labels only the live tokens run: padding (segment -1) is dropped before the
        first layer and the rows' samples go through as one packed row (AttentionLayout.
        unpadded: the same mask, the same positions), so fixed-length rows cost what their
        tokens cost, not what their length does."""
        x, position_ids, layout = self._inputs(input_ids, inputs_embeds, layout, segment_ids, position_ids,
                                               branch_ids)
        if labels is None:
            return self.lm_head(self._run_layers(x, position_ids, layout))
        check_labels(labels, tuple(x.shape[:2]), self.config.vocab_size)
        targets = F.pad(shift_labels(labels, layout.segment_ids, layout.branch_ids), (0, 1),
                        value=-100)  # [B, N]: the last has none
        live = int((layout.segment_ids >= 0).sum())
        if 0 < live < layout.segment_ids.numel():
            layout, index = layout.unpadded()
            x = x.flatten(0, 1)[index][None]
            position_ids = position_ids.expand(targets.shape).flatten()[index][None]
            targets = targets.flatten()[index][None]
        return linear_cross_entropy(self._run_layers(x, position_ids, layout), self.lm_head, targets)

    @classmethod
    def from_pretrained(cls, path, *, dtype: torch.dtype | None = None) -> "LLM":
        """Load a local Hugging Face checkpoint directory (Llama/Qwen2/Mistral layout)."""
        path = Path(path)
        cfg = LLMConfig.from_hf(read_json(path / "config.json"))
        model = cls(cfg)
        state = load_state_dict(path)
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        expected = {k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"checkpoint {path}: missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                             f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
        model.load_state_dict(state, strict=False)
        return model.to(dtype) if dtype is not None else model


def check_token_ids(ids, vocab_size: int, arg: str = "input_ids", ignore: int | None = None) -> None:
    """Token ids [B, N] must lie in [0, vocab_size) (`ignore`, e.g. -100 or an image
    placeholder, excepted): out of range they fail deep inside an embedding or a
    gather on CPU, and read garbage or fault asynchronously on GPU. One aminmax and
    one host sync per call, called once per forward (not per layer): cheap next to it."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype == torch.bool \
            or ids.is_floating_point() or ids.is_complex():
        got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{arg}: expected an integer tensor [B, N], got {got}")
    if ids.numel() == 0:
        raise ValueError(f"{arg}: empty batch or sequence, shape {tuple(ids.shape)}")
    live = ids if ignore is None else ids.masked_fill(ids == ignore, 0)
    low, high = (int(v) for v in torch.aminmax(live))
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        allowed = "" if ignore is None else f" or {ignore}"
        raise ValueError(f"{arg}: ids must be in [0, {vocab_size}) (the vocabulary){allowed}, got {bad}")


def check_labels(labels, shape: tuple[int, int], vocab_size: int | None) -> None:
    """Labels [B, N] like the tokens: vocabulary ids, or -100 for "not a target"
    (vocab_size None: the shape only, the range is checked later)."""
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != shape:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels: expected shape {shape} (that of the tokens), got {got}")
    if vocab_size is not None:
        check_token_ids(labels, vocab_size, "labels", ignore=-100)


def check_positions(cfg: LLMConfig, length: int, arg: str, positions: torch.Tensor | None = None,
                    live: torch.Tensor | None = None) -> None:
    """Unscaled RoPE was trained on max_position_embeddings positions: refuse more.
    `length` is the row length; a longer row may still pack segments that each fit
    (positions restart per segment): then the largest of `positions` at `live` tokens
    decides, at the cost of one host sync, for such rows only."""
    if cfg.rope_scaling.get("rope_type", "default") != "default" or length <= cfg.max_position_embeddings:
        return
    if positions is not None:
        length = int(torch.where(live, positions, -1).max()) + 1
    if length > cfg.max_position_embeddings:
        raise ValueError(f"{arg}: sequence of {length} tokens is longer than max_position_embeddings "
                         f"({cfg.max_position_embeddings}) and RoPE is not scaled")


def check_no_window(layout: AttentionLayout) -> None:
    """The decoder windows its sliding layers itself (config.sliding_window); a layout that
    brings a window would also shift the RoPE positions, which count from its interval."""
    if layout.window is not None:
        raise ValueError(f"layout: has window={layout.window}; give it without one (the decoder applies "
                         "config.sliding_window to its sliding layers)")


def _segment_count(seg: torch.Tensor) -> torch.Tensor:
    """Segments per row (the layout keeps each one contiguous): its first live tokens."""
    starts = (seg[:, 1:] >= 0) & (seg[:, 1:] != seg[:, :-1])
    return starts.sum(1) + (seg[:, 0] >= 0)


def positions_of(layout: AttentionLayout) -> torch.Tensor:
    """RoPE positions: the index within each packed segment, every answer of a shared
    prompt continuing from the prompt's end (AttentionLayout.positions)."""
    return layout.positions()


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """Greedy at temperature 0; else sample from the smallest set of tokens whose
    probability mass reaches top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    sorted_p, order = probs.sort(-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the first token is always kept
    sorted_p = torch.where(keep, sorted_p, 0)
    choice = torch.multinomial(sorted_p, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def shift_labels(labels: torch.Tensor, segment_ids: torch.Tensor | None,
                 branch_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Labels for positions 0..N-2 (the next token), -100 where the next token
    starts another packed segment or the position is padding, or (shared prompt) where
    an answer's last token is followed by the next answer."""
    nxt = labels[:, 1:].clone()
    if segment_ids is not None:
        nxt[(segment_ids[:, 1:] != segment_ids[:, :-1]) | (segment_ids[:, :-1] < 0)] = -100
    if branch_ids is not None:
        nxt[(branch_ids[:, :-1] > 0) & (branch_ids[:, 1:] != branch_ids[:, :-1])] = -100
    return nxt


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint dir: (sharded) safetensors, else pytorch_model.bin."""
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise ValueError(f"path: no *.safetensors or pytorch_model*.bin in {path}")
    state = {}
    for f in files:
        state.update(read_tensors(f))
    return state
