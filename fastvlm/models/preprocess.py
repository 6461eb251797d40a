"""Image preprocessing per encoder family, in PIL + torch, batched.

Matches transformers' PIL image processors: CLIPImageProcessor (resize the
shortest side, center crop, OpenAI CLIP mean/std), SiglipImageProcessor (resize
straight to a square, mean = std = 0.5) and, for DINOv2, BitImageProcessor with
the settings DINOv2 checkpoints ship (shortest side 256 for a 224 crop, ImageNet
mean/std). Transparent images are composited onto white, as transformers does;
16-bit grayscale is scaled to 8 bits (PIL's own conversion clips it to white).
``pad_to_square=True`` is LLaVA-1.5's ``image_aspect_ratio = "pad"``: the image is
centred on a square of the mean colour before resizing, so nothing is cropped away.
Resizing runs per image in PIL (uint8, like transformers); rescale and
normalisation run on the whole batch in torch.
"""
from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fastvlm.utils.io import read_json

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I")  # PNG/TIFF 16-bit grayscale opens as one of these


@dataclass(frozen=True)
class ImagePreprocessor:
    size: int  # the shortest side ("shortest_edge") or both sides ("square") after resizing
    crop_size: int | None  # center crop to crop_size x crop_size; None: no crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "shortest_edge"
    resample: int = Image.Resampling.BICUBIC
    pad_to_square: bool = False  # LLaVA-1.5's image_aspect_ratio "pad"

    def __post_init__(self):
        if self.resize not in ("shortest_edge", "square"):
            raise ValueError(f"resize: expected 'shortest_edge' or 'square', got {self.resize!r}")
        if self.size <= 0 or (self.crop_size is not None and self.crop_size <= 0):
            raise ValueError(f"size/crop_size: expected positive ints, got {self.size}, {self.crop_size}")

    @classmethod
    def for_family(cls, family: str, image_size: int) -> ImagePreprocessor:
        if family == "clip":
            return cls(image_size, image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        if family == "siglip":
            return cls(image_size, None, HALF, HALF, resize="square")
        if family == "dinov2":  # DINOv2 resizes to 256/224 of the crop
            return cls(round(image_size * 256 / 224), image_size, IMAGENET_MEAN, IMAGENET_STD)
        raise ValueError(f"family: expected clip, siglip or dinov2, got {family!r}")

    @classmethod
    def from_pretrained(cls, path) -> ImagePreprocessor:
        """From a checkpoint's preprocessor_config.json (CLIP/SigLIP/BiT layouts)."""
        file = Path(path) / "preprocessor_config.json"
        cfg = read_json(file)
        size = cfg.get("size", 224)
        size = size if isinstance(size, dict) else {"shortest_edge": size}
        crop = cfg.get("crop_size", 224) if cfg.get("do_center_crop", False) else None
        crop = crop["height"] if isinstance(crop, dict) else crop
        if "shortest_edge" in size:
            resize, side = "shortest_edge", size["shortest_edge"]
        elif size.get("height") == size.get("width"):
            resize, side = "square", size["height"]
        else:
            raise ValueError(f"{file}: size {size} not supported (shortest_edge or a square)")
        return cls(side, crop, tuple(cfg["image_mean"]), tuple(cfg["image_std"]), resize=resize,
                   resample=cfg.get("resample", Image.Resampling.BICUBIC))

    @property
    def output_size(self) -> int:
        return self.crop_size or self.size

    def resize_and_crop(self, image: Image.Image) -> np.ndarray:
        if self.pad_to_square:
            image = expand_to_square(image, tuple(int(m * 255) for m in self.mean))
        if self.resize == "square":
            image = image.resize((self.size, self.size), self.resample)
        else:
            width, height = image.size
            short, long = min(width, height), max(width, height)
            long = int(self.size * long / short)
            image = image.resize((self.size, long) if width <= height else (long, self.size), self.resample)
        pixels = np.asarray(image)
        if self.crop_size is not None:
            height, width = pixels.shape[:2]
            if height < self.crop_size or width < self.crop_size:
                raise ValueError(f"crop_size {self.crop_size} exceeds the resized image {height}x{width}")
            top, left = (height - self.crop_size) // 2, (width - self.crop_size) // 2
            pixels = pixels[top:top + self.crop_size, left:left + self.crop_size]
        return pixels

    def __call__(self, images: Sequence[Image.Image | bytes | str | Path]) -> torch.Tensor:
        """[B, 3, S, S] float32 pixel values from PIL images, encoded image bytes or file paths."""
        if isinstance(images, (Image.Image, bytes, str, Path)):
            raise ValueError("images: expected a sequence of images, got a single image")
        if not len(images):
            raise ValueError("images: empty sequence; expected at least one image")
        batch = np.stack([self.resize_and_crop(load_rgb(image, i)) for i, image in enumerate(images)])
        pixels = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
        mean, std = self._mean_std
        return (pixels - mean) / std

    @functools.cached_property
    def _mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        # made once: datasets call the preprocessor per image, where two tensor
        # constructions were a measurable part of a small image's preprocessing
        return torch.tensor(self.mean).view(1, 3, 1, 1), torch.tensor(self.std).view(1, 3, 1, 1)


def load_rgb(image, index: int = 0) -> Image.Image:
    """An RGB PIL image from a PIL image, encoded bytes or a path; a clear error if it cannot be decoded."""
    if isinstance(image, (bytes, bytearray, str, Path)):
        source = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image
        try:
            image = Image.open(source)
            image.load()  # decode now: truncated files fail here, not later
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ValueError(f"images[{index}]: cannot decode image ({err})") from err
    if not isinstance(image, Image.Image):
        raise ValueError(f"images[{index}]: expected a PIL image, bytes or a path, got {type(image).__name__}")
    if image.mode in SIXTEEN_BIT_MODES:
        wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    if "A" in image.getbands() or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """The image centred on a square canvas of colour `fill` (LLaVA's expand2square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas
