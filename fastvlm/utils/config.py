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
