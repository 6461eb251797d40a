"""QLoRA: targeted Linear layers' frozen weights in NF4 with double quantization
(bitsandbytes ``Linear4bit``), LoRA adapters on top.

Only the targeted Linears are quantized; norms and fully-trained modules (the
connector) are kept in fp32, embeddings and the LM head as they are. bitsandbytes
runs the NF4 matmul on CPU and CUDA alike.

Checkpoints never hold the NF4 weights (``quantized_state_keys``): their
quantisation state (absmax, ...) is not a tensor FSDP / DCP keep, and it is a
function of the weights it was made from. A run re-quantises the frozen base from
its source on resume instead (quantisation is deterministic), and a finished QLoRA
stage folds each adapter into its dequantized base (``merge_quantized``).
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from fastvlm.nn.lora import dequantized_weight, keep_trainable_4bit_format, set_submodule  # noqa: F401
from fastvlm.train.lora import apply_lora, resolve_lora_targets
from fastvlm.train.precision import is_norm

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NF4_BLOCKSIZE = 64  # QLoRA's block; absmax of each block is itself 8-bit quantized (double quant)


def to_nf4(linear: nn.Linear, compute_dtype: torch.dtype, quantize_from: torch.dtype | None = None) -> nn.Module:
    """A frozen bitsandbytes Linear4bit (NF4, double quant) holding `linear`'s weights.

    The weight is quantized in the dtype it has (load a model in bf16 to quantize
    bf16 weights), or in `quantize_from` (cast here, one layer at a time; the dequantized
    weight comes back in it); `compute_dtype` is what the matmul runs in. Eval and training
    run the same matmul (bitsandbytes' CPU inference repacking is off, see
    ``keep_trainable_4bit_format``), so an evaluation pass never changes training.
    """
    import bitsandbytes as bnb

    w = linear.weight
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                          device="meta")
    # Params4bit quantizes when moved to a real device.
    data = w.data if quantize_from is None else w.data.to(quantize_from)
    q.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_type="nf4",
                                 compress_statistics=True, blocksize=NF4_BLOCKSIZE, module=q).to(w.device)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    return keep_trainable_4bit_format(q)


def quantized_state_keys(model: nn.Module, state_keys) -> set[str]:
    """The keys of `state_keys` (a state dict's) that belong to an NF4 weight: the packed
    weight and the quantisation state bitsandbytes adds beside it (``<weight>.absmax``, ...)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # never imported, so no layer is a Linear4bit: every checkpoint of a run without
        return set()  # NF4 asks, and importing bitsandbytes costs a fresh process ~2 s of CPU
    weights = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    if not weights:
        return set()
    beside = tuple(w + "." for w in weights)
    return {k for k in state_keys if k in weights or k.startswith(beside)}


@torch.no_grad()
def merge_quantized(layer: nn.Module) -> nn.Linear:
    """The plain Linear a LoRA layer over an NF4 base computes: dequant(W) + s·BA, summed in
    float32 and stored in the dtype the weight was quantized from."""
    base = layer.base_layer
    weight = dequantized_weight(base)
    dtype = base.weight.quant_state.dtype
    merged = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None, device=weight.device,
                       dtype=dtype)
    merged.weight.copy_(weight.float() + layer.delta_weight().float())
    if base.bias is not None:
        merged.bias.copy_(base.bias)
    return merged.requires_grad_(False)


def enable_input_require_grads(model: nn.Module):
    """Make embedding outputs require grad, so activation checkpointing (which needs
    an input that requires grad) still back-propagates into adapters when the
    embeddings are frozen."""
    def hook(module, args, output):
        output.requires_grad_(True)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Embedding)]
    if not handles:
        raise ValueError(f"model: {type(model).__name__} has no nn.Embedding to enable input grads on")
    return handles


def apply_qlora(model: nn.Module, targets=None, r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
                trainable=(), rslora: bool = False, compute_dtype: str = "bf16",
                input_grads: bool = True, *, llm=None, vision=None,
                quantize_from: torch.dtype | None = None) -> nn.Module:
    """Quantize the targeted Linears to NF4 (from their own dtype, or `quantize_from`: see
    ``to_nf4``), put LoRA on them, keep norms and `trainable` modules in fp32. Arguments as
    ``apply_lora``."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype: expected one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    # everything is validated before the first layer is quantized
    targets, trainable, found, _ = resolve_lora_targets(model, targets, r, alpha, dropout, trainable, llm, vision)
    not_linear = {n: type(m).__name__ for n, m in found.items() if type(m) is not nn.Linear}
    if not_linear:
        raise ValueError(f"targets: QLoRA quantizes plain nn.Linear layers only; matched {not_linear}")
    cd = COMPUTE_DTYPES[compute_dtype]
    for name, module in found.items():
        set_submodule(model, name, to_nf4(module, cd, quantize_from))
    apply_lora(model, targets, r, alpha, dropout, trainable, rslora)
    for module in model.modules():
        if is_norm(module):
            module.float()
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if input_grads and any(isinstance(m, nn.Embedding) for m in model.modules()):
        enable_input_require_grads(model)
    return model
