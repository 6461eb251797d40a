"""FeatureCache: encode each image once with a frozen encoder, reuse the features.

Stage-1 (connector-only) training of a LLaVA-style VLM runs a frozen vision
tower over the same images every epoch; this cache stores its selected hidden
states on disk so later epochs only read them.

Layout of a cache directory:
    cache.json              fingerprint: encoder config, weights hash, select_layers, dtype
    shards/<uuid>.safetensors   one per write, tensors named "<image key>.<n>" (n-th selected layer)
An image's key hashes its content key (fastvlm.utils.io.content_key of its file's
bytes, which the data loader computes where it reads the file) together with the
fingerprint. A shard appears
under its final name only through os.replace of a fully written temporary file,
so an interrupted write leaves at most a ".tmp-*" file that is never read.
Opening a directory whose cache.json describes another encoder, other layers or
another dtype raises StaleCacheError (or, with on_stale="reset", empties it).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastvlm.models.vision import VisionEncoder
from fastvlm.utils.io import atomic_write, content_key

FORMAT_VERSION = 2  # 2: keyed by content keys (1 hashed the bytes with the fingerprint directly)


class StaleCacheError(ValueError):
    """The cache directory holds features of another encoder configuration."""


def weights_digest(module: torch.nn.Module) -> str:
    """Hash of every parameter and buffer: two checkpoints with one config differ here."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    def __init__(self, root, encoder: VisionEncoder, select_layers: Sequence[int] = (-2,),
                 on_stale: str = "error"):
        if not isinstance(encoder, VisionEncoder) or not encoder.frozen:
            raise ValueError("encoder: expected a frozen VisionEncoder (call encoder.freeze()); "
                             "features of a trained encoder change every step")
        if on_stale not in ("error", "reset"):
            raise ValueError(f"on_stale: expected 'error' or 'reset', got {on_stale!r}")
        self.encoder = encoder
        self.select_layers = list(select_layers)
        self.root = Path(root)
        self.fingerprint = {
            "format": FORMAT_VERSION,
            # dropout never reaches a frozen tower's features (and older caches predate the field)
            "config": {k: v for k, v in encoder.config.to_dict().items() if k != "dropout"},
            "weights": weights_digest(encoder),
            "select_layers": encoder.resolve_layers(self.select_layers),
            "dtype": str(encoder.frozen_dtype),
        }
        self._salt = hashlib.blake2b(json.dumps(self.fingerprint, sort_keys=True).encode()).digest()
        self._check_or_create(on_stale)
        self.hits = self.misses = 0
        self.refresh()

    def _check_or_create(self, on_stale: str) -> None:
        manifest = self.root / "cache.json"
        if manifest.is_file():
            found = json.loads(manifest.read_text())
            if found == self.fingerprint:
                return
            if on_stale == "error":
                differs = sorted(k for k in self.fingerprint if found.get(k) != self.fingerprint[k])
                raise StaleCacheError(f"{self.root}: cache was built for another encoder setup "
                                      f"(differs in {differs}); use another directory or on_stale='reset'")
            shutil.rmtree(self.root / "shards", ignore_errors=True)
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        atomic_write(manifest, lambda p: Path(p).write_text(json.dumps(self.fingerprint, sort_keys=True)))

    def refresh(self) -> None:
        """Index the shards on disk (also those written by other processes since)."""
        self.index: dict[str, Path] = {}
        for shard in sorted((self.root / "shards").glob("*.safetensors")):
            if shard.name.startswith(".tmp-"):
                continue
            try:
                with safe_open(shard, framework="pt") as f:
                    names = list(f.keys())
            except Exception as err:  # unreadable shard (damaged copy): treat its images as misses
                warnings.warn(f"FeatureCache: skipping unreadable shard {shard}: {err}")
                continue
            for name in names:
                self.index[name.rsplit(".", 1)[0]] = shard

    def key(self, image: bytes | str) -> str:
        """The cache's key of an image given as its file's bytes or its content key."""
        if isinstance(image, (bytes, bytearray, memoryview)):
            image = content_key(image)
        if not isinstance(image, str):
            raise ValueError(f"images: expected an image file's bytes or its content key (str), got "
                             f"{type(image).__name__}")
        return hashlib.blake2b(image.encode(), key=self._salt, digest_size=20).hexdigest()

    def __contains__(self, image: bytes | str) -> bool:
        return self.key(image) in self.index

    def __len__(self) -> int:
        return len(self.index)

    def load(self, keys: Sequence[str]) -> list[list[torch.Tensor]]:
        """Per key, its cached features (one [T, C] tensor per selected layer)."""
        by_shard: dict[Path, list[str]] = {}
        for key in keys:
            by_shard.setdefault(self.index[key], []).append(key)
        found = {}
        for shard, shard_keys in by_shard.items():
            with safe_open(shard, framework="pt") as f:
                for key in shard_keys:
                    found[key] = [f.get_tensor(f"{key}.{n}") for n in range(len(self.select_layers))]
        return [found[key] for key in keys]

    def store(self, keys: Sequence[str], features: Sequence[torch.Tensor]) -> None:
        """Write features ([B, T, C] per selected layer, row i for keys[i]) as one shard."""
        tensors = {f"{key}.{n}": layer[i].detach().cpu().clone(memory_format=torch.contiguous_format)
                   for i, key in enumerate(keys) for n, layer in enumerate(features)}
        shard = self.root / "shards" / f"{uuid.uuid4().hex}.safetensors"
        atomic_write(shard, lambda p: save_file(tensors, p))
        self.index.update({key: shard for key in keys})

    def features(self, images: Sequence[bytes | str], preprocess: Callable[[list], torch.Tensor]
                 ) -> list[torch.Tensor]:
        """Selected features of `images` (file bytes or content keys; [B, T, C] per layer, on
        the encoder's device).

        `preprocess` turns the misses (as given) into pixel values; hits are neither
        decoded nor encoded."""
        if isinstance(images, (bytes, bytearray, memoryview, str)) or not len(images):
            raise ValueError("images: expected a non-empty sequence of image file bytes or content keys")
        keys = [self.key(image) for image in images]
        is_miss = [key not in self.index for key in keys]
        self.misses += sum(is_miss)
        self.hits += len(keys) - sum(is_miss)
        device = self.encoder.patch_embed.weight.device
        missing = dict((key, image) for key, image, miss in zip(keys, images, is_miss) if miss)
        if missing:
            pixels = preprocess(list(missing.values())).to(device)
            self.store(list(missing), self.encoder(pixels, select_layers=self.select_layers))
        rows = self.load(keys)
        return [torch.stack([row[n] for row in rows]).to(device) for n in range(len(self.select_layers))]
