"""Load a local transformers VLM directory with transformers' own class and patch it:
the entry point of the Hugging Face model source (``model.source = "hf"``).

The class comes from the directory's config: its ``architectures`` entry where that
names a supported class, else the supported class of its ``model_type``. Anything
else is refused before any weight is read, naming the class and the supported list.
"""
from __future__ import annotations

import inspect
import json
import struct
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig

from fastvlm.integrations.transformers import (
    FAMILIES,
    UnsupportedModelError,
    check_transformers_version,
    patch,
    supported_list,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def family_class_name(config) -> str:
    """The supported transformers class a checkpoint's config loads as."""
    for arch in getattr(config, "architectures", None) or ():
        if arch in FAMILIES:
            return arch
    for cls, family in FAMILIES.items():
        if family.model_type == config.model_type:
            return cls
    archs = ", ".join(getattr(config, "architectures", None) or ()) or "no architectures entry"
    raise UnsupportedModelError(f"path: the checkpoint is a {archs} (model_type {config.model_type!r}), which "
                                f"fastvlm.integrations.transformers does not patch; supported: {supported_list()}")


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype: expected one of {', '.join(DTYPES)} (a name or the torch.dtype), got {dtype!r}")


def stored_dtype(path) -> torch.dtype:
    """The dtype directory `path`'s checkpoint stores its floating weights in: loading in it
    neither rounds a weight nor widens one (a bf16 7B loads in 15 GB, not float32's 30). Read
    from the safetensors headers (no tensor read), else the config's ``dtype`` / ``torch_dtype``;
    float32 where neither says, or where the files mix dtypes (bf16 and fp16 both fit it exactly;
    float64 where some weight is float64)."""
    path = Path(path)
    found = set()
    for file in _weight_files(path):
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        found |= {t["dtype"] for k, t in header.items() if k != "__metadata__" and "F" in t["dtype"]}
    if len(found) == 1 and next(iter(found)) in SAFETENSORS_DTYPES:
        return SAFETENSORS_DTYPES[found.pop()]
    if found:
        return torch.float64 if "F64" in found else torch.float32
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    try:
        return config_dtype(config) or torch.float32
    except ValueError:
        return torch.float32


def config_dtype(config: dict) -> torch.dtype | None:
    """The dtype a config.json records (``dtype``, or ``torch_dtype`` as older transformers
    write it, "bfloat16" or "torch.bfloat16"; the text config's where the top level has
    none), None where it records none; a name outside DTYPES is a ValueError."""
    for part in (config, config.get("text_config") or {}):
        name = part.get("dtype") or part.get("torch_dtype")
        if name is not None:
            dtype = DTYPES.get(str(name).removeprefix("torch."))
            if dtype is None:
                raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
            return dtype
    return None


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of the checkpoint in `path` (its index's shards, or the single file)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = path / "model.safetensors"
    return [single] if single.is_file() else []


def _check_patch_options(options: dict) -> None:
    accepted = [n for n in inspect.signature(patch).parameters if n != "model"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"patch_options: unknown option(s) {', '.join(unknown)}; patch() takes "
                         f"{', '.join(accepted)}")


def load_patched(path, dtype, **patch_options):
    """The transformers model in directory `path` (config, weights; nothing downloaded),
    loaded with its own class in `dtype` (a torch.dtype or its name) and patched with
    ``patch(model, **patch_options)``. Returned as from_pretrained leaves it (eval mode)."""
    check_transformers_version()
    dtype = _dtype(dtype)
    _check_patch_options(patch_options)
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"path: {path} is not a transformers model directory (no config.json there)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    cls = getattr(transformers, family_class_name(config))
    model = cls.from_pretrained(path, dtype=dtype, local_files_only=True)
    return patch(model, **patch_options)
