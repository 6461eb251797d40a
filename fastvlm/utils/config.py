"""Config dataclasses refuse keys they do not know: a typo must not silently fall
back to a default."""
from __future__ import annotations

import dataclasses


def check_known_keys(cls, values, what: str = "config") -> None:
    """Raise a ValueError naming ``what`` and the keys of ``values`` that are not
    fields of the dataclass ``cls``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{what}: unknown keys {unknown}; expected a subset of {sorted(known)}")


def require(values: dict, keys, what: str = "config.json") -> None:
    """A checkpoint config must hold `keys` (a hand-edited one may not): name the missing ones."""
    missing = [k for k in keys if k not in values]
    if missing:
        raise ValueError(f"{what}: missing required keys {missing}")


def check_required_keys(cls, values, what: str = "config") -> None:
    """Raise a ValueError naming ``what`` and the fields of the dataclass ``cls`` that
    have no default and are missing from ``values``."""
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in values]
    if missing:
        raise ValueError(f"{what}: missing required keys {missing}")
