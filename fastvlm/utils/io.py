"""Crash-safe file writes: a file appears under its final name only complete."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
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


def read_json(file, arg: str = "path") -> dict:
    """A checkpoint's JSON file as a dict; missing or unparsable is a ValueError naming `arg`."""
    file = Path(file)
    if not file.is_file():
        raise ValueError(f"{arg}: no {file.name} in {file.parent} (expected a checkpoint directory)")
    try:
        data = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{arg}: {file} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{arg}: {file} holds a {type(data).__name__}, expected a JSON object")
    return data


def read_tensors(file, arg: str = "path") -> dict:
    """All tensors of one .safetensors or pytorch .bin file; a truncated or corrupt file
    is a ValueError naming `arg` and the file, not a parser's internal error."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(file)
    try:
        if file.suffix == ".safetensors":
            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        raise ValueError(f"{arg}: cannot read {file} (truncated or corrupt? {type(err).__name__}: {err})") from err


def content_key(blob: bytes) -> str:
    """A short hash of a file's bytes: the same image under any path or name has one key
    (the feature cache's index, computed where the file is read anyway)."""
    return hashlib.blake2b(bytes(blob), digest_size=20).hexdigest()

