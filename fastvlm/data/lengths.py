"""Estimated sample lengths, computed once and cached next to the data.

Packing and length grouping need every sample's length before the first batch;
tokenizing a 1M-sample JSON for that takes hours, so lengths are estimated
cheaply (``estimate_length``, no tokenizer) and cached in a file beside the
data, ``<data file>.lengths-<key>.npy``. The key hashes the data file's bytes,
the options the estimate depends on and the estimator's code, so an edited data
file or estimator never reads stale lengths. The file is written atomically. If
the data folder is read-only, the cache goes under the user cache folder
(``$XDG_CACHE_HOME/fastvlm/lengths``, else ``~/.cache/...``), and if that fails
too, it is kept in memory for the process.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fastvlm.utils.io import atomic_write

_MEMORY: dict[str, np.ndarray] = {}
_HASHES: dict[tuple[str, int, int], str] = {}


def file_hash(path) -> str:
    """sha256 of the file's bytes (memoised per path, size and mtime within the process)."""
    path = Path(path)
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _HASHES[memo] = h.hexdigest()
    return _HASHES[memo]


def code_hash(fn: Callable) -> str:
    """Changes when `fn`'s code changes (bytecode and constants)."""
    code = fn.__code__
    return hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:12]


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastvlm" / "lengths"


def cached_array(data_path, options: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """`compute()` (an int array), cached next to `data_path` under a key of the file's
    hash and `options`; computed at most once per data file and options."""
    data_path = Path(data_path)
    key = hashlib.sha256(f"{file_hash(data_path)}|{options}".encode()).hexdigest()[:16]
    name = f"{data_path.name}.lengths-{key}.npy"
    if key in _MEMORY:
        return _MEMORY[key]
    candidates = [data_path.parent / name, user_cache_dir() / name]
    for path in candidates:
        loaded = _load(path)
        if loaded is not None:
            _MEMORY[key] = loaded
            return loaded
    values = np.asarray(compute(), dtype=np.int64)
    for path in candidates:
        if _save(path, values):
            break
    _MEMORY[key] = values  # also the fallback when no folder is writable
    return values


def _load(path: Path) -> np.ndarray | None:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError):  # absent, unreadable or damaged: recompute
        return None


def _save(path: Path, values: np.ndarray) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: str):
            with open(tmp, "wb") as f:
                np.save(f, values, allow_pickle=False)

        atomic_write(path, write)
        return True
    except OSError:
        return False
