"""Measure the memory a forward pass leaves alive for backward, on any device.

CUDA has max_memory_allocated; CPU has no allocator statistics, and counting
bytes in saved_tensors_hooks misses what checkpointing keeps outside autograd's
saved tensors (the outputs the selective policy keeps — attention, out_proj, fc1 — live in
torch.utils.checkpoint's own storage). So this tracker records, through a
TorchDispatchMode, the storage of every tensor the forward creates, and after
the forward sums the bytes of those still alive: exactly what the graph (and
the caller's outputs) hold.
"""
from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """with LiveTensorBytes() as t: loss = step(); t.live_bytes() -> bytes still held."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int, str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Outputs that alias an input (views, in-place ops) allocate nothing;
        # without this, a view of a weight would count the weight.
        inputs = {StorageWeakRef(t.untyped_storage()).cdata
                  for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata in inputs:
                    continue
                known = self.storages.get(ref.cdata)
                # A view shares a live storage; an expired entry's address was reused.
                if known is None or known[0].expired():
                    self.storages[ref.cdata] = (ref, storage.nbytes(), tensor.device.type)
        return out

    def live_bytes(self, device_type: str | None = None) -> int:
        return sum(nbytes for ref, nbytes, kind in self.storages.values()
                   if not ref.expired() and device_type in (None, kind))
