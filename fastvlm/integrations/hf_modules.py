"""The module-level parts of the transformers patch: connector, vision-tower
checkpointing, and the fused LM loss. Each records how to undo itself."""
from __future__ import annotations

import functools
import inspect
import typing
from collections import OrderedDict

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

from fastvlm.nn import FusedMLPConnector
from fastvlm.nn.checkpointing import CheckpointPolicy, checkpoint_kwargs
from fastvlm.nn.connector import activation_name
from fastvlm.ops import fused_mlp, linear_cross_entropy

# transformers' ACT2FN classes whose function a fused activation equals
HF_ACTIVATIONS = {"GELUActivation": "gelu", "PytorchGELUTanh": "gelu_tanh", "GELUTanh": "gelu_tanh",
                  "NewGELUActivation": "gelu_tanh", "QuickGELUActivation": "quick_gelu", "SiLUActivation": "silu"}


def fused_activation(act: nn.Module) -> str:
    """The fused activation equal to a projector's activation module (HF's or torch's)."""
    return HF_ACTIVATIONS.get(type(act).__name__) or activation_name(act)


class HFFusedProjector(FusedMLPConnector):
    """FusedMLPConnector holding a transformers projector's own Linear modules under their
    own names (``linear_1/act/linear_2`` or ``0/1/2``), so state-dict keys, parameters and
    optimizer references stay those of the original. Where PEFT or bitsandbytes has replaced
    a Linear (LoRA adapter, 4-bit weight), the module chain runs instead, so the adapter or
    quantised weight is honoured rather than read past."""

    @classmethod
    def adopt(cls, names: tuple[str, str, str], modules: tuple[nn.Module, nn.Module, nn.Module]):
        first, act, last = modules
        fused = cls(first.in_features, first.out_features, last.out_features, fused_activation(act),
                    first.bias is not None, device="meta")
        fused._modules = OrderedDict(zip(names, modules))
        return fused

    def forward(self, x):
        first, act, last = self[0], self[1], self[2]
        if type(first) is nn.Linear and type(last) is nn.Linear:
            return super().forward(x)
        return last(act(first(x)))


def fused_merger_forward(merger: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Qwen3-VL's patch merger (its LayerNorm before or after the 2x2 merge, then
    linear_fc1 - act_fn - linear_fc2) with the MLP on fused_mlp, recomputing in backward as
    FusedMLPConnector does. The MLP shares its module with the LayerNorm, so it cannot be
    swapped like a projector: the merger's forward is replaced on the instance and reads its
    Linears at call time, running the module chain where PEFT or bitsandbytes replaced one."""
    width = merger.hidden_size
    x = merger.norm(x.view(-1, width) if merger.use_postshuffle_norm else x).view(-1, width)
    first, act, last = merger.linear_fc1, merger.act_fn, merger.linear_fc2
    if type(first) is nn.Linear and type(last) is nn.Linear:
        return fused_mlp(x, first.weight, first.bias, last.weight, last.bias, fused_activation(act), recompute=True)
    return last(act(first(x)))


def projector_parts(projector: nn.Module):
    """(names, modules) of a Linear-activation-Linear projector, or None."""
    if isinstance(projector, nn.Sequential) and len(projector) == 3:
        names = tuple(projector._modules)
    elif all(hasattr(projector, n) for n in ("linear_1", "act", "linear_2")):
        names = ("linear_1", "act", "linear_2")
    else:
        return None
    modules = tuple(getattr(projector, n) for n in names)
    if not (isinstance(modules[0], nn.Linear) and isinstance(modules[2], nn.Linear)):
        return None  # already PEFT/bnb-wrapped at patch time: nothing to fuse
    try:
        fused_activation(modules[1])
    except ValueError:
        return None
    return names, modules


def replace_child(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, name)
    setattr(parent, name, new)
    return old


def is_quantized(layer: nn.Module) -> bool:
    """Holds bitsandbytes 4/8-bit weights (their CPU kernels repack the weight in place on
    first use, which fails under torch.utils.checkpoint's dispatch mode, bnb 0.50)."""
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in layer.modules())


def call_original(module: nn.Module, previous, *args, **kwargs):
    """Call the forward `module` had before patch(): `previous` (an instance-level forward
    set before, kept as it was) or its class's. Never kept as a bound method: a deep copy or
    an unpickled model then calls its own module, and torch.compile, which rebuilds a bound
    method as an attribute lookup after a graph break, cannot land on the patched forward."""
    if previous is not None:
        return previous(*args, **kwargs)
    return type(module).forward(module, *args, **kwargs)


def original_signature(module: nn.Module, previous) -> inspect.Signature:
    """The signature of that forward, without ``self``."""
    if previous is not None:
        return inspect.signature(previous)
    sig = inspect.signature(type(module).forward)
    return sig.replace(parameters=list(sig.parameters.values())[1:])


def checkpointed_forward(layer: nn.Module, previous, policy: CheckpointPolicy, index: int, *args, **kwargs):
    """One vision-tower layer under the policy; skipped where transformers' own gradient
    checkpointing already recomputes the layer, or nothing needs gradients, and for a
    quantised layer on CPU (see is_quantized). `previous`: see call_original."""
    original = functools.partial(call_original, layer, previous)
    if (not _needs_grad(layer, args, kwargs) or not policy.checkpoints(index)
            or (is_quantized(layer) and not any(p.is_cuda for p in layer.parameters()))
            or (getattr(layer, "gradient_checkpointing", False) and layer.training)):
        return original(*args, **kwargs)
    x = args[0] if args else kwargs.get("hidden_states")
    return checkpoint(original, *args, use_reentrant=False, **checkpoint_kwargs(policy, x.shape[-1]), **kwargs)


def _needs_grad(layer: nn.Module, args, kwargs) -> bool:
    """Whether this call records a graph: grad mode on and a parameter of the layer or a tensor
    input requiring a gradient (a frozen tower on pixels records none, and a checkpoint of it
    would only add its dispatch mode's cost to every op)."""
    if not torch.is_grad_enabled():
        return False
    return (any(p.requires_grad for p in layer.parameters())
            or any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves((args, kwargs))))


def output_class(model: nn.Module):
    """The ModelOutput class the model's forward returns (from its annotation)."""
    from transformers.utils import ModelOutput

    hint = typing.get_type_hints(type(model).forward).get("return")
    for cls in typing.get_args(hint) or (hint,):
        if isinstance(cls, type) and issubclass(cls, ModelOutput):
            return cls
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return CausalLMOutputWithPast


def fused_lm_loss(model, hidden: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None,
                  ignore_index: int = -100, shift_labels=None) -> torch.Tensor:
    """transformers' ForCausalLMLoss (shift, ignore_index, sum / num_items_in_batch or mean)
    through linear_cross_entropy on the model's lm_head module as it is now (plain Linear:
    fused; LoRA or 4-bit: checkpointed per chunk, so the adapter is honoured)."""
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    head = model.lm_head
    if num_items_in_batch is None:
        return linear_cross_entropy(hidden, head, shift_labels, ignore_index=ignore_index)
    total = linear_cross_entropy(hidden, head, shift_labels, ignore_index=ignore_index, reduction="sum")
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
