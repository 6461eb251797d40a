"""Activation checkpointing policies for any stack of transformer blocks.

One implementation for every tower (vision encoder now, decoder LLM later):
`run_blocks(blocks, x, policy)` runs `x` through the blocks in order under the
policy. Everything is built on torch.utils.checkpoint (non-reentrant), so it
composes with frozen blocks, LoRA-wrapped projections (any nn.Module) and
autocast: recomputation replays the forward with the autocast state of the
original call, and the gradients are those of the plain forward.

Policies:
- ``none``: autograd keeps every activation.
- ``full``: each block keeps only its input and is recomputed in backward.
- ``selective``: each block keeps its matmul outputs (the expensive part to
  recompute) and recomputes norms, activations and attention from them
  (torch's selective-checkpoint API, policy on op types).
- ``every_k:K``: blocks 0, K, 2K, ... are checkpointed (``full``), the others kept.
- ``offload``: nothing is recomputed; tensors saved for backward that live on a
  GPU are copied to pinned CPU memory on a side stream while compute goes on,
  and copied back when backward needs them (see OffloadSavedTensors).
"""
from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy as OpPolicy
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective", "every_k", "offload")

aten = torch.ops.aten
# Matmul outputs kept by `selective`; linear layers reach the dispatcher as mm/addmm
# (3-D inputs are flattened) and bmm/baddbmm for batched products.
SAVED_OPS = frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default,
                       aten.baddbmm.default, aten.linear.default, aten.convolution.default})


@dataclass(frozen=True)
class CheckpointPolicy:
    mode: str = "none"
    every_k: int = 2  # used by mode "every_k"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"checkpointing: expected one of {MODES}, got {self.mode!r}")
        if not isinstance(self.every_k, int) or self.every_k < 1:
            raise ValueError(f"checkpointing: every_k must be a positive int, got {self.every_k!r}")

    @classmethod
    def parse(cls, policy: CheckpointPolicy | str) -> CheckpointPolicy:
        """Accepts a policy or a string: "none", "full", "selective", "offload", "every_k:3"."""
        if isinstance(policy, CheckpointPolicy):
            return policy
        if not isinstance(policy, str):
            raise ValueError(f"checkpointing: expected a CheckpointPolicy or str, got {type(policy).__name__}")
        mode, _, k = policy.partition(":")
        if k and mode != "every_k":
            raise ValueError(f"checkpointing: only every_k takes an argument, got {policy!r}")
        if mode == "every_k" and k:
            if not k.isdigit():
                raise ValueError(f"checkpointing: every_k needs an integer, got {policy!r}")
            return cls(mode, int(k))
        return cls(mode)

    def __str__(self) -> str:
        return f"every_k:{self.every_k}" if self.mode == "every_k" else self.mode

    def checkpoints(self, index: int) -> bool:
        """Whether block `index` is recomputed in backward."""
        if self.mode in ("full", "selective"):
            return True
        return self.mode == "every_k" and index % self.every_k == 0


def _keep_matmuls(ctx, op, *args, **kwargs):
    return OpPolicy.MUST_SAVE if op in SAVED_OPS else OpPolicy.PREFER_RECOMPUTE


_selective_context = functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, policy: CheckpointPolicy,
               keep: Collection[int] = (), **block_kwargs) -> list[torch.Tensor]:
    """Run `x` through `blocks`; return the outputs of the blocks whose indices are in
    `keep` (ascending, duplicates once), plus the last output if `keep` is empty.

    Only the kept outputs are referenced here, so a no-grad (frozen) pass frees each
    intermediate as soon as the next block has consumed it."""
    wanted = set(keep) if keep else {len(blocks) - 1}
    outputs = []
    # Without autograd there is nothing to save, so no policy has anything to do.
    tracking = torch.is_grad_enabled()
    offload = OffloadSavedTensors() if tracking and policy.mode == "offload" else None
    if offload is not None:
        offload.__enter__()
    try:
        for i, block in enumerate(blocks):
            if tracking and policy.checkpoints(i):
                extra = {"context_fn": _selective_context} if policy.mode == "selective" else {}
                x = checkpoint(block, x, use_reentrant=False, **extra, **block_kwargs)
            else:
                x = block(x, **block_kwargs)
            if i in wanted:
                outputs.append(x)
    finally:
        if offload is not None:
            offload.__exit__(None, None, None)
    return outputs


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
    - in backward the copy back is issued on the compute stream (non_blocking),
      ordered after the offload copy by an event. It is not prefetched: each
      unpack waits for its own host-to-device copy (benchmarks/bench_encoder.py
      measures what that costs).
    """

    def __init__(self, min_bytes: int = 1 << 16):
        self.min_bytes = min_bytes
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        super().__init__(self.pack, self.unpack)

    def pack(self, tensor: torch.Tensor):
        if (tensor.device.type != "cuda" or isinstance(tensor, nn.Parameter)
                or tensor.numel() * tensor.element_size() < self.min_bytes):
            return tensor
        stream = self.streams.get(tensor.device)
        if stream is None:
            stream = self.streams[tensor.device] = torch.cuda.Stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            copied = stream.record_event()
        tensor.record_stream(stream)
        return tensor.device, host, copied

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, copied = packed
        torch.cuda.current_stream(device).wait_event(copied)
        return host.to(device, non_blocking=True)
