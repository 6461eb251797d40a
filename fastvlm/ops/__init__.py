"""fastvlm ops: one module per op, each of the same shape.

``fastvlm/ops/<op>.py`` holds the public function (input validation, backend
dispatch), the op's one plain-torch reference, and its fast paths as
torch.library custom ops (``torch.ops.fastvlm.*``) with fake and autograd
registrations, so torch.compile(fullgraph=True) traces them; the Triton kernels
they launch live in ``fastvlm/kernels/<op>.py``, which imports nothing from here.

- ``multimodal_attention`` / ``multimodal_attention_varlen`` (attention.py) under
  an ``AttentionLayout`` (layout.py), whose mask kinds are defined once in
  mask_kinds.py;
- ``fused_linear_act`` / ``fused_mlp`` (fused_mlp.py), the connector's GEMM + bias
  + activation (activations.py: the one activation table), reading inputs through
  ``reduce_tokens`` (token_reduction.py);
- ``lora_linear`` (lora_linear.py); ``linear_cross_entropy`` (linear_cross_entropy.py)
  and ``linear_logprob`` (linear_logprob.py, on its machinery).

Importing this package registers every op's backends (fastvlm.ops.backend, which
also documents how ``auto`` measures and how each family picks its tile
configs); ``fastvlm info`` reports that registry.
"""
from fastvlm.ops.attention import multimodal_attention, multimodal_attention_varlen
from fastvlm.ops.fused_mlp import fused_linear_act, fused_mlp
from fastvlm.ops.layout import KINDS, AttentionLayout, BlockMap
from fastvlm.ops.linear_cross_entropy import linear_cross_entropy
from fastvlm.ops.linear_logprob import linear_logprob
from fastvlm.ops.lora_linear import lora_linear
from fastvlm.ops.token_reduction import reduce_tokens

__all__ = ["AttentionLayout", "BlockMap", "KINDS", "fused_linear_act", "fused_mlp", "linear_cross_entropy",
           "linear_logprob", "lora_linear", "multimodal_attention", "multimodal_attention_varlen", "reduce_tokens"]
