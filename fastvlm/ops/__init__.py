"""fastvlm ops: public functions with autograd wiring and backend dispatch."""
from fastvlm.ops.attention import multimodal_attention
from fastvlm.ops.fused_mlp import fused_linear_act, fused_mlp
from fastvlm.ops.layout import KINDS, AttentionLayout, BlockMap
from fastvlm.ops.token_reduction import reduce_tokens

__all__ = ["AttentionLayout", "BlockMap", "KINDS", "fused_linear_act", "fused_mlp", "multimodal_attention",
           "reduce_tokens"]
