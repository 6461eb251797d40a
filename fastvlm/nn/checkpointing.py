"""Activation checkpointing policies for any stack of transformer blocks.

One implementation for every tower (the vision encoders and the decoder LLM):
`run_blocks(blocks, x, policy)` runs `x` through the blocks in order under the
policy. Everything is built on torch.utils.checkpoint (non-reentrant), so it
composes with frozen blocks, LoRA-wrapped projections (any nn.Module) and
autocast: recomputation replays the forward with the autocast state of the
original call, and the gradients are those of the plain forward.

Policies:
- ``none``: autograd keeps every activation.
- ``full``: each block keeps only its input and is recomputed in backward.
- ``selective``: each block keeps its input, the attention kernel's output (and
  softmax statistics) and, after attention, the outputs of the linear layers
  that read a hidden-size input without narrowing it: out_proj and fc1 (LLM:
  o_proj, gate_proj, up_proj). Backward recomputes the q/k/v projections, norms
  and activations. Why these (measured in bench_encoder, CLIP-L/SigLIP shapes):
  attention's output is 1 hidden-size tensor whose recompute is O(N^2); fc1's
  output is 4 of them but the costliest GEMM to redo; q, k and v are 3 tensors
  and 3 cheap GEMMs (~8% of a step), and keeping them is what held the old
  keep-every-matmul policy at 0.5-0.63x of ``none``; this one keeps ~0.35-0.44x.
  fc2's output is never needed in backward (the recompute stops once every
  tensor backward needs is back, before fc2 runs), and LoRA's rank-r products
  are cheap, so they are recomputed. Attention made of batched matmuls (the
  CPU reference) is recomputed, never its O(N^2) scores kept.
- ``every_k:K``: blocks 0, K, 2K, ... are checkpointed (``full``), the others kept.
- ``offload``: nothing is recomputed; tensors saved for backward that live on a
  GPU are copied to pinned CPU memory on a side stream while compute goes on,
  and prefetched back one block ahead during backward (see OffloadSavedTensors).
  Tensors on the CPU stay where they are, so on a CPU-only run it equals ``none``.
- ``<mode>+offload``: a checkpointing mode whose saved tensors are offloaded;
  ``full+offload`` moves only the block inputs (what the checkpoints save through
  autograd). The selective mode's cached outputs live in
  torch.utils.checkpoint's own storage, not in saved tensors, and stay on the GPU.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy as OpPolicy
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective", "every_k")

aten = torch.ops.aten
# The checkpoint sees ops after decomposition: nn.Linear arrives as mm/addmm (3-D
# inputs flattened), products of two activations (composite attention) as bmm/baddbmm.
LINEAR_OPS = frozenset({aten.mm.default, aten.addmm.default})
BATCHED_MATMUL_OPS = frozenset({aten.bmm.default, aten.baddbmm.default})
# Fused attention kernels: outputs kept by `selective` (SDPA's CPU/CUDA backends,
# and fastvlm's multimodal attention, matched by name: it exists only with Triton).
ATTENTION_OPS = frozenset({aten._scaled_dot_product_flash_attention_for_cpu.default,
                           aten._scaled_dot_product_flash_attention.default,
                           aten._scaled_dot_product_efficient_attention.default,
                           aten._scaled_dot_product_cudnn_attention.default,
                           aten._scaled_dot_product_fused_attention_overrideable.default})
# fastvlm's own attention ops (custom ops: the checkpoint sees them whole, never their insides).
# Unlisted, the CPU path's attention was recomputed and nothing after it was kept.
ATTENTION_OP_NAMES = frozenset({"fastvlm::mm_attention_fwd", "fastvlm::sdpa_cpu_attention_fwd"})
# fastvlm's fused LoRA linears (x, weight [out, in], ...): kept like a plain linear of that shape.
# Unlisted, a LoRA'd o_proj / gate_proj / up_proj was recomputed in full (base GEMM, adapter, sum).
LORA_OP_NAMES = frozenset({"fastvlm::lora_linear_fwd", "fastvlm::lora_linear_cpu_fwd"})


@dataclass(frozen=True)
class CheckpointPolicy:
    mode: str = "none"
    every_k: int = 2  # used by mode "every_k"
    # Move what the blocks save for backward to pinned CPU memory. Alone ("offload")
    # that is every activation; with "full" only the block inputs the checkpoints
    # keep (Unsloth's offloaded checkpointing): one tensor per block instead of ~20.
    offload: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"checkpointing: expected one of {MODES} (optionally +offload), got {self.mode!r}")
        if not isinstance(self.every_k, int) or self.every_k < 1:
            raise ValueError(f"checkpointing: every_k must be a positive int, got {self.every_k!r}")

    @classmethod
    def parse(cls, policy: CheckpointPolicy | str) -> CheckpointPolicy:
        """A policy, or a string: "none", "full", "selective", "every_k:3", "offload",
        or a mode with "+offload" ("full+offload")."""
        if isinstance(policy, CheckpointPolicy):
            return policy
        if not isinstance(policy, str):
            raise ValueError(f"checkpointing: expected a CheckpointPolicy or str, got {type(policy).__name__}")
        if policy == "offload":
            return cls("none", offload=True)
        spec, plus, rest = policy.partition("+")
        if plus and rest != "offload":
            raise ValueError(f"checkpointing: only '+offload' may follow a mode, got {policy!r}")
        mode, _, k = spec.partition(":")
        if k and mode != "every_k":
            raise ValueError(f"checkpointing: only every_k takes an argument, got {policy!r}")
        if mode == "every_k" and k and not k.isdigit():
            raise ValueError(f"checkpointing: every_k needs an integer, got {policy!r}")
        return cls(mode, int(k) if k else 2, offload=bool(plus))

    def __str__(self) -> str:
        mode = f"every_k:{self.every_k}" if self.mode == "every_k" else self.mode
        if self.offload:
            return "offload" if mode == "none" else f"{mode}+offload"
        return mode

    def checkpoints(self, index: int) -> bool:
        """Whether block `index` is recomputed in backward."""
        if self.mode in ("full", "selective"):
            return True
        return self.mode == "every_k" and index % self.every_k == 0


def _selective_policy(width: int):
    """The `selective` op policy for one block whose hidden size is `width` (see the
    module docstring). Stateful: whether the block's attention has run yet."""
    # One flag per pass: older torch also calls the policy while recomputing.
    after_attention = {False: False, True: False}

    def policy(ctx, op, *args, **kwargs):
        if op in ATTENTION_OPS or op.name() in ATTENTION_OP_NAMES:
            after_attention[ctx.is_recompute] = True
            return OpPolicy.MUST_SAVE
        if op in BATCHED_MATMUL_OPS:  # composite attention: recomputed
            after_attention[ctx.is_recompute] = True
        elif op in LINEAR_OPS and after_attention[ctx.is_recompute]:
            inputs, weight = args[:2] if op == aten.mm.default else args[1:3]
            if inputs.shape[-1] == width <= weight.shape[-1]:
                return OpPolicy.MUST_SAVE
        elif op.name() in LORA_OP_NAMES and after_attention[ctx.is_recompute]:
            if args[0].shape[-1] == width <= args[1].shape[0]:
                return OpPolicy.MUST_SAVE
        return OpPolicy.PREFER_RECOMPUTE

    return policy


def checkpoint_kwargs(policy: CheckpointPolicy, width: int) -> dict:
    """Extra torch.utils.checkpoint arguments of `policy` for a block whose activations are
    `width` wide: selective mode's save-list context, fresh per call (it holds a flag)."""
    if policy.mode != "selective":
        return {}
    # a partial of a module-level function: torch.compile traces no closure as a context_fn
    return {"context_fn": functools.partial(_selective_context, width)}


def _selective_context(width: int):
    return create_selective_checkpoint_contexts(_selective_policy(width))


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, policy: CheckpointPolicy,
               keep: Collection[int] = (), **block_kwargs) -> list[torch.Tensor]:
    """Run `x` through `blocks`; return the outputs of the blocks whose indices are in
    `keep` (ascending, each once), or only the last output if `keep` is empty.

    Only the kept outputs are referenced here, so a no-grad (frozen) pass frees each
    intermediate as soon as the next block has consumed it."""
    wanted = set(keep) if keep else {len(blocks) - 1}
    outputs = []
    # Without autograd there is nothing to save, so no policy has anything to do.
    tracking = torch.is_grad_enabled()
    offload = OffloadSavedTensors() if tracking and policy.offload else None
    with offload or contextlib.nullcontext():
        for i, block in enumerate(blocks):
            if offload is not None:
                offload.block = i
            if tracking and policy.checkpoints(i):
                x = checkpoint(block, x, use_reentrant=False, **checkpoint_kwargs(policy, x.shape[-1]),
                               **block_kwargs)
            else:
                x = block(x, **block_kwargs)
            if i in wanted:
                outputs.append(x)
    return outputs


class _Offloaded:
    """A saved tensor's pinned host copy, and its way back to the GPU."""

    __slots__ = ("device", "host", "copied", "block", "prefetched", "ready")

    def __init__(self, device, host, copied, block):
        self.device, self.host, self.copied, self.block = device, host, copied, block
        self.prefetched = self.ready = None


class OffloadSavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """Keep tensors saved for backward in pinned CPU memory instead of on the GPU.

    Why not torch.autograd.graph.save_on_cpu(pin_memory=True): it copies *every*
    saved tensor, parameters included (a linear layer saves its weight), and it
    issues the device-to-host copy on the compute stream, so the next kernels
    queue behind the PCIe transfer; its copy back is not prefetched either. Here:
    - parameters, CPU tensors and tensors under `min_bytes` stay where they are;
    - the copy to pinned memory runs on a side stream after the producing kernels
      (wait_stream), so compute does not wait for PCIe; `record_stream` keeps the
      GPU buffer from being reused before that copy has finished;
    - backward walks the blocks in reverse: the first time it needs a tensor of
      block i, the copies back of all of block i-1's tensors start on the side
      stream, overlapping block i's backward. So at most about two blocks' saved
      tensors are on the GPU at once. A tensor not prefetched (the last block's,
      or one unpacked a second time) is copied back on the compute stream.
    The caller sets `block` before running each block.
    """

    def __init__(self, min_bytes: int = 1 << 16):
        self.min_bytes = min_bytes
        self.block = 0
        self.stream: torch.cuda.Stream | None = None
        self.pending: dict[int, list[_Offloaded]] = {}  # per block, not yet prefetched
        super().__init__(self.pack, self.unpack)

    def pack(self, tensor: torch.Tensor):
        if (tensor.device.type != "cuda" or isinstance(tensor, nn.Parameter)
                or tensor.numel() * tensor.element_size() < self.min_bytes):
            return tensor
        if self.stream is None:
            self.stream = torch.cuda.Stream(tensor.device)
        self.stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(self.stream):
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            copied = self.stream.record_event()
        tensor.record_stream(self.stream)
        item = _Offloaded(tensor.device, host, copied, self.block)
        self.pending.setdefault(self.block, []).append(item)
        return item

    def unpack(self, item):
        if isinstance(item, torch.Tensor):
            return item
        self._prefetch(item.block - 1)
        current = torch.cuda.current_stream(item.device)
        if item.prefetched is not None:
            tensor, item.prefetched = item.prefetched, None  # autograd owns it from here
            current.wait_event(item.ready)
            tensor.record_stream(current)  # allocated on the side stream, used and freed here
            return tensor
        current.wait_event(item.copied)
        return item.host.to(item.device, non_blocking=True)

    def _prefetch(self, block: int) -> None:
        group = self.pending.pop(block, None)
        if not group:
            return
        # Same stream as the offload copies, so each copy back follows its copy out.
        with torch.cuda.stream(self.stream):
            for item in group:
                item.prefetched = item.host.to(item.device, non_blocking=True)
            ready = self.stream.record_event()
        for item in group:
            item.ready = ready
