"""FeatureCache: hits, misses, invalidation, interrupted writes."""
import pytest
import torch

import fastvlm.models.feature_cache as feature_cache
from fastvlm.models.feature_cache import FeatureCache, StaleCacheError
from fastvlm.models.vision import VisionConfig, VisionEncoder
from fastvlm.utils.io import content_key

SHAPE = (3, 28, 28)


def frozen_encoder(dtype=torch.float32):
    config = VisionConfig.siglip(image_size=28, patch_size=7, hidden_size=32, num_layers=3,
                                 num_heads=4, intermediate_size=48)
    return VisionEncoder(config).freeze(dtype=dtype)


def make_images(n):
    """"Image files" are the raw float32 pixels here, so decoding is exact and cheap."""
    return [torch.randn(SHAPE).numpy().tobytes() for _ in range(n)]


class Decoder:
    def __init__(self):
        self.decoded = 0

    def __call__(self, images):
        self.decoded += len(images)
        return torch.stack([torch.frombuffer(bytearray(b), dtype=torch.float32).view(SHAPE) for b in images])


def test_miss_then_hit(tmp_path, seed):
    encoder, decode = frozen_encoder(), Decoder()
    cache = FeatureCache(tmp_path, encoder, select_layers=[-2, 1])
    images = make_images(3)
    expected = encoder(decode(images), select_layers=[-2, 1])
    decode.decoded = 0

    first = cache.features(images, decode)
    assert (cache.misses, cache.hits, decode.decoded, len(cache)) == (3, 0, 3, 3)
    # Hits are neither decoded nor encoded; duplicates in a batch are encoded once.
    reopened = FeatureCache(tmp_path, encoder, select_layers=[-2, 1])
    more = make_images(1)
    batch = [images[2], more[0], images[0], more[0]]
    second = reopened.features(batch, decode)
    assert (reopened.misses, reopened.hits, decode.decoded, len(reopened)) == (2, 2, 4, 4)

    for layer in range(2):
        torch.testing.assert_close(first[layer], expected[layer], rtol=0, atol=0)
        torch.testing.assert_close(second[layer][0], expected[layer][2], rtol=0, atol=0)
        torch.testing.assert_close(second[layer][2], expected[layer][0], rtol=0, atol=0)
        torch.testing.assert_close(second[layer][1], second[layer][3], rtol=0, atol=0)
    assert first[0].shape == (3, 16, 32)


def test_stale_cache_is_detected(tmp_path, seed):
    encoder = frozen_encoder()
    cache = FeatureCache(tmp_path, encoder, select_layers=[-2])
    cache.features(make_images(2), Decoder())
    with pytest.raises(StaleCacheError, match="select_layers"):
        FeatureCache(tmp_path, encoder, select_layers=[-1])
    with pytest.raises(StaleCacheError, match="dtype"):
        FeatureCache(tmp_path, frozen_encoder(torch.bfloat16), select_layers=[-2])
    other_weights = frozen_encoder()  # same config, other random weights
    with pytest.raises(StaleCacheError, match="weights"):
        FeatureCache(tmp_path, other_weights, select_layers=[-2])
    # -2 and 2 are the same layer of a 3-layer encoder: same cache.
    assert len(FeatureCache(tmp_path, encoder, select_layers=[2])) == 2
    reset = FeatureCache(tmp_path, other_weights, select_layers=[-2], on_stale="reset")
    assert len(reset) == 0
    with pytest.raises(StaleCacheError):
        FeatureCache(tmp_path, encoder, select_layers=[-2])


def test_interrupted_write_leaves_cache_consistent(tmp_path, monkeypatch, seed):
    encoder, decode = frozen_encoder(), Decoder()
    cache = FeatureCache(tmp_path, encoder)
    kept = make_images(2)
    cache.features(kept, decode)

    def crash_midway(tensors, path):
        with open(path, "wb") as f:
            f.write(b"\x00" * 100)  # a partial shard
        raise KeyboardInterrupt

    monkeypatch.setattr(feature_cache, "save_file", crash_midway)
    lost = make_images(2)
    with pytest.raises(KeyboardInterrupt):
        cache.features(lost, decode)
    monkeypatch.undo()
    # A hard kill skips cleanup: leave a partial temporary file behind too.
    (tmp_path / "shards" / ".tmp-0123-dead.safetensors").write_bytes(b"\x01" * 50)

    reopened = FeatureCache(tmp_path, encoder)
    assert len(reopened) == 2 and all(image in reopened for image in kept)
    assert not any(image in reopened for image in lost)
    features = reopened.features(lost + kept, decode)
    torch.testing.assert_close(features[0], encoder(decode(lost + kept), select_layers=[-2])[0],
                               rtol=0, atol=0)


def test_damaged_shard_is_skipped_and_reencoded(tmp_path, seed):
    encoder, decode = frozen_encoder(), Decoder()
    images = make_images(2)
    FeatureCache(tmp_path, encoder).features(images, decode)
    (shard,) = (tmp_path / "shards").glob("*.safetensors")
    shard.write_bytes(shard.read_bytes()[:40])  # e.g. a truncated copy
    with pytest.warns(UserWarning, match="unreadable shard"):
        cache = FeatureCache(tmp_path, encoder)
    assert len(cache) == 0
    cache.features(images, decode)
    assert cache.misses == 2


def test_requires_frozen_encoder(tmp_path):
    config = VisionConfig.clip(image_size=28, patch_size=7, hidden_size=32, num_layers=1,
                               num_heads=4, intermediate_size=48)
    with pytest.raises(ValueError, match="frozen"):
        FeatureCache(tmp_path, VisionEncoder(config))
    with pytest.raises(ValueError, match="image file's bytes or its content key"):
        FeatureCache(tmp_path, frozen_encoder()).key(123)


def test_content_keys_and_bytes_find_the_same_features(tmp_path):
    """The data loader hands the cache content keys (computed where it reads the file):
    an image cached by its bytes is a hit by its key, and the reverse."""
    encoder = frozen_encoder()
    cache = FeatureCache(tmp_path, encoder)
    blobs, decode = make_images(3), Decoder()
    (by_bytes,) = cache.features(blobs[:2], decode)
    keys = [content_key(b) for b in blobs]
    assert [k in cache for k in keys] == [True, True, False]
    (by_keys,) = cache.features(keys, lambda missing: decode([blobs[keys.index(k)] for k in missing]))
    assert cache.hits == 2 and cache.misses == 3
    torch.testing.assert_close(by_keys[:2], by_bytes, rtol=0, atol=0)
    assert blobs[2] in cache


@pytest.mark.gpu
def test_cache_on_gpu_bf16(tmp_path, seed):
    encoder, decode = frozen_encoder(torch.bfloat16).cuda(), Decoder()
    cache = FeatureCache(tmp_path, encoder)
    images = make_images(3)
    expected = encoder(decode(images).cuda(), select_layers=[-2])[0]
    for _ in range(2):  # a miss, then a hit
        (features,) = cache.features(images, decode)
        assert features.device.type == "cuda" and features.dtype == torch.bfloat16
        torch.testing.assert_close(features, expected, rtol=0, atol=0)
    assert (cache.misses, cache.hits) == (3, 3)
