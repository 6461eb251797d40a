"""Preprocessing parity with transformers' PIL image processors, batched; bad images."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BitImageProcessorPil, CLIPImageProcessorPil, SiglipImageProcessorPil

from fastvlm.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocessor


def random_images(rng, count=4):
    """Odd sizes and aspect ratios both ways, RGB, grayscale and transparent images."""
    images = []
    for i in range(count):
        height, width = (int(v) for v in rng.integers(40, 130, size=2))
        mode = ["RGB", "L", "RGBA", "RGB"][i % 4]
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        array = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
        images.append(Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode))
    return images


def assert_same_normalisation(got, expected, processor):
    """Both sides resize the same uint8 pixels with PIL, then compute (p/255 - mean)/std in
    fp32 in their own order: each of the ~3 roundings errs by u*(1 + |mean|) before the
    division by std, and the result's own rounding by u*|out|. Twice that, both sides."""
    u = torch.finfo(torch.float32).eps / 2
    atol = 2 * 2 * 3 * u * (1 + max(abs(m) for m in processor.mean)) / min(processor.std)
    torch.testing.assert_close(got, expected, rtol=4 * u, atol=atol)


CASES = {
    "clip": (CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}),
             ImagePreprocessor.for_family("clip", 56)),
    "siglip": (SiglipImageProcessorPil(size={"height": 56, "width": 56}),
               ImagePreprocessor.for_family("siglip", 56)),
    "dinov2": (BitImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                                    image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)),
               ImagePreprocessor.for_family("dinov2", 56)),
}


@pytest.mark.parametrize("family", list(CASES))
def test_parity_with_transformers(family, seed):
    reference, ours = CASES[family]
    images = random_images(np.random.default_rng(seed))
    expected = torch.from_numpy(np.asarray(reference(images, return_tensors="np")["pixel_values"]))
    got = ours(images)
    assert got.shape == (4, 3, 56, 56) and got.dtype == torch.float32
    assert_same_normalisation(got, expected, ours)


def test_transformers_defaults_and_saved_config(tmp_path, seed):
    """Default processors (224) and round trip through preprocessor_config.json."""
    images = random_images(np.random.default_rng(seed), count=2)
    for reference in (CLIPImageProcessorPil(), SiglipImageProcessorPil(), BitImageProcessorPil()):
        reference.save_pretrained(tmp_path)
        ours = ImagePreprocessor.from_pretrained(tmp_path)
        expected = np.asarray(reference(images, return_tensors="np")["pixel_values"])
        assert_same_normalisation(ours(images), torch.from_numpy(expected), ours)


def test_bytes_and_paths(tmp_path, seed):
    images = random_images(np.random.default_rng(seed), count=2)
    encoded = []
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
        (tmp_path / f"{i}.png").write_bytes(buffer.getvalue())
    preprocess = ImagePreprocessor.for_family("clip", 56)
    expected = preprocess(images)
    torch.testing.assert_close(preprocess(encoded), expected, rtol=0, atol=0)
    torch.testing.assert_close(preprocess([tmp_path / "0.png", str(tmp_path / "1.png")]), expected,
                               rtol=0, atol=0)


def test_corrupt_images_raise(seed):
    preprocess = ImagePreprocessor.for_family("siglip", 56)
    buffer = io.BytesIO()
    random_images(np.random.default_rng(seed), count=1)[0].save(buffer, format="JPEG")
    good = buffer.getvalue()
    with pytest.raises(ValueError, match=r"images\[1\]: cannot decode image"):
        preprocess([good, good[: len(good) // 2]])  # truncated file
    with pytest.raises(ValueError, match=r"images\[0\]: cannot decode image"):
        preprocess([b"not an image"])
    with pytest.raises(ValueError, match=r"images\[0\]: expected a PIL image"):
        preprocess([np.zeros((4, 4, 3))])
    with pytest.raises(ValueError, match="sequence of images"):
        preprocess(good)
