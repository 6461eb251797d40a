"""Crash-safe file writes: a file appears under its final name only complete."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def atomic_write(path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, flush it to disk, then
    rename it over ``path``. A killed writer leaves the previous file intact (at worst
    a stray ``.tmp-*`` file, never a truncated ``path``)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda p: Path(p).write_text(text))
