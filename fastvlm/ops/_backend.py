"""Backend registry and dispatch shared by every op.

Each op registers its backends once, as ``name -> availability check``; a
check returns True, or a string saying why it cannot serve a device. ``auto``
takes the first available backend in the op's preference order for the
device; an explicitly requested backend that cannot serve the call raises
instead of silently falling back. ``fastvlm info`` reads the same registry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Availability = Callable[[torch.device], "bool | str"]


@dataclass(frozen=True)
class OpBackends:
    name: str
    backends: dict[str, Availability]
    preference: dict[str, tuple[str, ...]]  # device type -> order for "auto"


REGISTRY: dict[str, OpBackends] = {}


def register_op(name: str, backends: dict[str, Availability],
                preference: dict[str, tuple[str, ...]]) -> OpBackends:
    REGISTRY[name] = OpBackends(name, dict(backends), dict(preference))
    return REGISTRY[name]


def why_unavailable(op: str, backend: str, device: torch.device) -> str | None:
    """None if `backend` can serve `op` on `device`, else the reason."""
    ok = REGISTRY[op].backends[backend](torch.device(device))
    return None if ok is True else (ok or "unavailable")


def resolve_backend(op: str, requested: str, device) -> str:
    spec = REGISTRY[op]
    device = torch.device(device)
    if requested == "auto":
        order = spec.preference.get(device.type, ())
        for name in order:
            if why_unavailable(op, name, device) is None:
                return name
        raise RuntimeError(f"{op}: no backend can serve device {device} (tried {', '.join(order) or 'none'})")
    if requested not in spec.backends:
        raise ValueError(f"backend: unknown backend {requested!r} for {op}; expected 'auto' or one of "
                         f"{', '.join(spec.backends)}")
    reason = why_unavailable(op, requested, device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend={requested!r} cannot serve tensors on {device}: {reason}")
    return requested
