"""fastvlm ops: public functions with autograd wiring and backend dispatch.

Importing this package registers every op's backends (see fastvlm.ops.backend),
which is what `fastvlm info` reports.
"""
from fastvlm.ops.attention import multimodal_attention, multimodal_attention_varlen
from fastvlm.ops.fused_mlp import fused_linear_act, fused_mlp
from fastvlm.ops.layout import KINDS, AttentionLayout, BlockMap
from fastvlm.ops.linear_cross_entropy import linear_cross_entropy
from fastvlm.ops.lora_linear import lora_linear
from fastvlm.ops.token_reduction import reduce_tokens

__all__ = ["AttentionLayout", "BlockMap", "KINDS", "fused_linear_act", "fused_mlp", "linear_cross_entropy",
           "lora_linear", "multimodal_attention", "multimodal_attention_varlen", "reduce_tokens"]
