"""Robust image loading for training: a bad file costs one sample, never an epoch.

``load_image`` decodes one file with PIL and preprocesses it. Anything wrong with
the file (missing, empty, truncated, not an image, degenerate size, a
decompression bomb) is classified into a reason; with ``strict=False`` the reason
is counted in a ``BadImageCounter`` and ``None`` comes back, with ``strict=True``
a ``ValueError`` names the file and the reason.
"""
from __future__ import annotations

import io
import warnings
from collections import Counter
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from fastvlm.models.preprocess import ImagePreprocessor, load_rgb
from fastvlm.utils.io import content_key

REASONS = ("missing", "unreadable", "empty", "corrupt", "truncated", "too_small", "too_large", "extreme_aspect")
EXAMPLES_PER_REASON = 5  # file names kept per reason, for the report


class BadImageError(ValueError):
    """A file that cannot be used as a training image; ``reason`` is one of REASONS.
    (Constructible from the message alone: DataLoader re-raises worker errors so.)"""

    def __init__(self, message: str, path="", reason: str = ""):
        super().__init__(message)
        self.path, self.reason = str(path), reason

    @classmethod
    def of(cls, path, reason: str, detail: str) -> BadImageError:
        return cls(f"{path}: {reason} image ({detail})", path, reason)


class BadImageCounter:
    """Skipped samples by reason, with a few file names per reason.

    Each DataLoader worker holds its own copy; ``take_new()`` hands what was
    counted since the last call to the main process (make_loader does this per
    batch), where counters are ``merge``d.
    """

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self._reported: Counter[str] = Counter()
        self._reported_examples: dict[str, int] = {}

    def add(self, reason: str, path) -> None:
        self.counts[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < EXAMPLES_PER_REASON:
            kept.append(str(path))

    def merge(self, other: BadImageCounter) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            kept = self.examples.setdefault(reason, [])
            kept.extend(other.examples.get(reason, [])[:EXAMPLES_PER_REASON - len(kept)])

    def take_new(self) -> BadImageCounter:
        """What was counted since the previous take_new() (this counter keeps its totals)."""
        new = BadImageCounter()
        for reason, n in self.counts.items():
            if n > self._reported[reason]:
                new.counts[reason] = n - self._reported[reason]
                new.examples[reason] = self.examples.get(reason, [])[self._reported_examples.get(reason, 0):]
        self._reported = Counter(self.counts)
        self._reported_examples = {r: len(e) for r, e in self.examples.items()}
        return new

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {"total": self.total, "counts": dict(sorted(self.counts.items())),
                "examples": {r: list(e) for r, e in sorted(self.examples.items())}}

    @classmethod
    def from_dict(cls, d: dict) -> BadImageCounter:
        """The counter `as_dict` described (as a checkpoint stores it)."""
        counter = cls()
        counter.counts.update(d["counts"])
        counter.examples = {r: list(e) for r, e in d["examples"].items()}
        return counter

    def report(self) -> str:
        if not self.total:
            return "skipped samples: none"
        parts = [f"{reason} {n} (e.g. {', '.join(self.examples.get(reason, [])[:2])})"
                 for reason, n in sorted(self.counts.items())]
        return f"skipped samples: {self.total}: " + "; ".join(parts)

    def __repr__(self):
        return f"BadImageCounter({dict(self.counts)})"


def open_image(path, *, min_size: int = 8, max_pixels: int | None = None, max_aspect: float = 200.0) -> Image.Image:
    """The decoded RGB image at `path`; a BadImageError with the reason otherwise.

    The size checks run on the header, before any pixel is decoded, so a
    decompression bomb is refused without allocating it. max_pixels defaults to
    PIL's own limit (Image.MAX_IMAGE_PIXELS), whose warning is treated as a refusal.
    """
    return read_image(path, min_size=min_size, max_pixels=max_pixels, max_aspect=max_aspect)[0]


def read_image(path, *, min_size: int = 8, max_pixels: int | None = None, max_aspect: float = 200.0
               ) -> tuple[Image.Image, str]:
    """(open_image's image, the file's content key): the file is read once, its bytes
    both hashed (fastvlm.utils.io.content_key, the feature cache's index) and decoded."""
    path = Path(path)
    max_pixels = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise BadImageError.of(path, "missing", "no such file") from None
    except OSError as err:
        raise BadImageError.of(path, "unreadable", str(err)) from None
    if not blob:
        raise BadImageError.of(path, "empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(blob))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImageError.of(path, "too_large", str(err)) from None
    except UnidentifiedImageError as err:
        raise BadImageError.of(path, "corrupt", str(err)) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError.of(path, "corrupt", str(err)) from None
    try:
        _check_size(path, image.size, min_size, max_pixels, max_aspect)
        image.load()  # decode now: truncated data fails here, not in the preprocessor
        return load_rgb(image), content_key(blob)
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        if isinstance(err, BadImageError):
            raise
        text = str(err).lower()
        truncated = any(s in text for s in ("truncated", "broken data stream", "end of file", "unexpected end"))
        raise BadImageError.of(path, "truncated" if truncated or isinstance(err, EOFError) else "corrupt",
                               str(err)) from None
    finally:
        image.close()


def _check_size(path, size: tuple[int, int], min_size: int, max_pixels: int, max_aspect: float) -> None:
    width, height = size
    if min(width, height) < min_size:
        raise BadImageError.of(path, "too_small", f"{width}x{height}, expected sides >= {min_size}")
    if max_pixels and width * height > max_pixels:
        raise BadImageError.of(path, "too_large", f"{width}x{height} exceeds {max_pixels} pixels")
    if max(width, height) > max_aspect * min(width, height):
        raise BadImageError.of(path, "extreme_aspect", f"{width}x{height}, aspect ratio over {max_aspect}")


def load_image(path, preprocessor: ImagePreprocessor, strict: bool = False, *,
               counter: BadImageCounter | None = None, **checks) -> torch.Tensor | None:
    """Pixel values [3, S, S] of the image at `path`, preprocessed; for a bad file,
    None (counted in `counter` by reason) or, with strict=True, a ValueError naming
    the file. `checks`: min_size, max_pixels, max_aspect of open_image."""
    loaded = load_image_and_key(path, preprocessor, strict, counter=counter, **checks)
    return None if loaded is None else loaded[0]


def load_image_and_key(path, preprocessor: ImagePreprocessor, strict: bool = False, *,
                       counter: BadImageCounter | None = None, **checks) -> tuple[torch.Tensor, str] | None:
    """load_image's pixels and the file's content key (read_image), or None."""
    try:
        image, key = read_image(path, **checks)
    except BadImageError as err:
        if strict:
            raise
        if counter is not None:
            counter.add(err.reason, err.path)
        return None
    return preprocessor([image])[0], key
