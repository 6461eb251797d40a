"""fastvlm ops: public functions with autograd wiring and backend dispatch."""
from fastvlm.ops.attention import multimodal_attention
from fastvlm.ops.layout import KINDS, AttentionLayout, BlockMap
from fastvlm.ops.lora_linear import lora_linear

__all__ = ["AttentionLayout", "BlockMap", "KINDS", "lora_linear", "multimodal_attention"]
