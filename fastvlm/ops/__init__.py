"""fastvlm ops: public functions with autograd wiring and backend dispatch."""
from fastvlm.ops.attention import multimodal_attention, multimodal_attention_varlen
from fastvlm.ops.layout import KINDS, AttentionLayout, BlockMap

__all__ = ["AttentionLayout", "BlockMap", "KINDS", "multimodal_attention", "multimodal_attention_varlen"]
