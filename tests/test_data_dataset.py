"""VLMDataset on the synthetic VQA files: items, truncation, bad images through the
loader (with workers), the length cache, and a packed batch through a tiny VLM whose
loss equals the supervised-token-weighted sum of the samples' own losses."""
import json
import math

import numpy as np
import pytest
import torch

import fastvlm.data.lengths as cache
from fastvlm.data import encode_conversation, read_samples, synthetic_vqa, train_bpe_tokenizer
from fastvlm.data.collate import PackedCollator, PaddedCollator, model_inputs
from fastvlm.data.dataset import CALIBRATION, CALIBRATION_SAMPLES, VLMDataset, make_loader
from fastvlm.data.lengths import user_cache_dir
from fastvlm.data.sampler import PackedBatchSampler
from fastvlm.models.llm import LLMConfig
from fastvlm.models.preprocess import ImagePreprocessor
from fastvlm.models.vision import VisionConfig
from fastvlm.models.vlm import VLM, VLMConfig
from tests.test_data_images import write_bad_files
from tests.test_data_packing import check_batch
from tests.utils import assert_close

IMAGE_SIZE, PATCH = 28, 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # the tiny encoder's patch tokens per image


@pytest.fixture
def synthetic(tmp_path, seed):
    splits = synthetic_vqa.write_dataset(tmp_path / "vqa", 36, 4, seed=seed % 1000, image_size=32,
                                         multi_turn_fraction=0.5)
    samples = read_samples(splits.train)
    texts = [t["value"] for s in samples for t in s.conversations]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300, seed=seed % 1000)
    return splits, samples, tokenizer


def _dataset(synthetic, **kwargs):
    splits, samples, tokenizer = synthetic
    return VLMDataset(samples, splits.image_folder, tokenizer, "llava_v1", IMAGE_TOKENS,
                      ImagePreprocessor.for_family("clip", IMAGE_SIZE), **kwargs)


def test_items(synthetic):
    dataset = _dataset(synthetic)
    _, samples, tokenizer = synthetic
    for i in range(len(dataset)):
        item = dataset[i]
        encoded = encode_conversation(samples[i].conversations, tokenizer, "llava_v1", IMAGE_TOKENS)
        assert item["input_ids"].tolist() == encoded.input_ids and item["labels"].tolist() == encoded.labels
        assert item["pixel_values"].shape == (len(samples[i].images), 3, IMAGE_SIZE, IMAGE_SIZE)
        assert len(item["image_spans"]) == len(samples[i].images) and item["prefix_len"] == encoded.prefix_len
        for start, n in item["image_spans"]:
            assert set(item["input_ids"][start:start + n].tolist()) == {tokenizer.image_token_id}
        assert item["id"] == samples[i].id


def test_truncation_at_turn_boundaries(synthetic):
    full = _dataset(synthetic)
    multi = next(i for i in range(len(full)) if len(full.encode(i).turn_spans) > 1)
    spans = full.encode(multi).turn_spans
    cut = _dataset(synthetic, max_length=spans[-1][1] - 1)
    item = cut[multi]
    assert item["input_ids"].tolist() == full[multi]["input_ids"][:spans[-2][1]].tolist()
    assert cut.skipped.total == 0
    dropping = _dataset(synthetic, max_length=spans[-1][1] - 1, truncation="drop")
    assert dropping[multi] is None and dict(dropping.skipped.counts) == {"too_long": 1}
    tiny = _dataset(synthetic, max_length=2)
    assert tiny[multi] is None and dict(tiny.skipped.counts) == {"too_long": 1}
    with pytest.raises(ValueError, match="max_length"):
        _dataset(synthetic, max_length=2, strict=True)[multi]


def _break_images(synthetic, rng) -> dict[int, str]:
    """Overwrite some samples' first image with a real bad file; sample index -> reason."""
    splits, samples, _ = synthetic
    bad_dir = splits.image_folder / "bad_sources"
    bad_dir.mkdir()
    reasons = write_bad_files(bad_dir, rng)
    victims = rng.choice(len(samples), size=len(reasons), replace=False).tolist()
    broken = {}
    for index, (name, reason) in zip(victims, reasons.items()):
        target = splits.image_folder / samples[index].images[0]
        if reason == "missing":
            target.unlink()
        else:
            target.write_bytes((bad_dir / name).read_bytes())
        broken[index] = reason
    return broken


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_images_skip_and_count_through_the_loader(synthetic, num_workers, seed):
    broken = _break_images(synthetic, np.random.default_rng(seed))
    budget = 256
    dataset = _dataset(synthetic, max_length=budget)
    sampler = PackedBatchSampler(dataset.lengths(), budget, seed)
    loader = make_loader(dataset, sampler, PackedCollator(0, budget), num_workers=num_workers)
    seen = [i for batch in loader for i in batch["ids"]]
    _, samples, _ = synthetic
    assert sorted(seen) == sorted(samples[i].id for i in range(len(samples)) if i not in broken)
    want = {}
    for reason in broken.values():
        want[reason] = want.get(reason, 0) + 1
    assert dict(loader.skipped.counts) == want
    stats = loader.stats()
    assert stats["skipped"]["total"] == len(broken) and stats["epochs"][0]["skipped"] == len(broken)
    assert stats["epochs"][0]["samples"] == len(samples) - len(broken)
    json.dumps(stats)  # goes into the metrics file as is
    strict = _dataset(synthetic, strict=True, max_length=budget)
    index, reason = next(iter(broken.items()))
    with pytest.raises(ValueError, match=f"{samples[index].images[0]}: {reason} image"):
        strict[index]
    with pytest.raises(ValueError, match=r"train_[\d_]+\.png: (" + "|".join(set(broken.values())) + ") image"):
        list(make_loader(strict, PackedBatchSampler(strict.lengths(), budget, seed), PackedCollator(0, budget),
                         num_workers=num_workers))


def test_lengths_cached_next_to_the_data(synthetic, tmp_path, monkeypatch):
    splits, samples, _ = synthetic
    # the process's memory of lengths starts empty: a test file run before this one in the
    # same process (xdist worker) may have estimated data of the same bytes (same key)
    monkeypatch.setattr(cache, "_MEMORY", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))
    dataset = _dataset(synthetic)
    lengths = dataset.lengths()
    cached = list(splits.train.parent.glob("train.json.lengths-*.npy"))
    assert len(cached) == 1 and np.load(cached[0])[0].tolist() == lengths
    assert dataset.has_images() == [bool(s.images) for s in samples]
    assert all(n >= IMAGE_TOKENS * len(s.images) for n, s in zip(lengths, samples))
    # calibrated on every sample here (fewer than CALIBRATION_SAMPLES): the estimate is at
    # least the true length for the CALIBRATION quantile of them
    true = [len(dataset.encode(i)) for i in range(len(dataset))]
    covered = sum(e >= t for e, t in zip(lengths, true))
    assert len(samples) <= CALIBRATION_SAMPLES and covered >= math.ceil(CALIBRATION * (len(samples) - 1))
    # a fresh dataset (new process state) reads the file instead of estimating again
    marked = np.load(cached[0])
    marked[0] += 1
    np.save(cached[0], marked)
    monkeypatch.setattr(cache, "_MEMORY", {})
    assert _dataset(synthetic).lengths() == [n + 1 for n in lengths]
    # an edited data file gets a new key (the old lengths are never read for it)
    records = json.loads(splits.train.read_text())
    splits.train.write_text(json.dumps(records[:-1]))
    edited, uncached = (VLMDataset(s, splits.image_folder, synthetic[2], "llava_v1", IMAGE_TOKENS,
                                   ImagePreprocessor.for_family("clip", IMAGE_SIZE))
                        for s in (read_samples(splits.train), list(read_samples(splits.train))))
    assert uncached.data_path is None  # a plain list: estimated in memory
    assert edited.lengths() == uncached.lengths()  # estimated afresh, not read from the old file
    assert len(list(splits.train.parent.glob("train.json.lengths-*.npy"))) == 2


def test_lengths_cache_falls_back_when_nothing_is_writable(synthetic, tmp_path, monkeypatch):
    """Data folder read-only -> user cache folder; that too -> memory (still correct)."""
    splits, samples, _ = synthetic
    monkeypatch.setattr(cache, "_MEMORY", {})  # as above: nothing remembered from earlier files
    real_save = cache._save
    refused = []

    def save(path, values):  # the data folder refuses writes, as a read-only mount does
        if path.parent == splits.train.parent:
            refused.append(path)
            return False
        return real_save(path, values)

    monkeypatch.setattr(cache, "_save", save)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))
    lengths = _dataset(synthetic).lengths()
    assert refused and list((tmp_path / "user_cache").rglob("train.json.lengths-*.npy"))
    assert not list(splits.train.parent.glob("train.json.lengths-*.npy"))
    monkeypatch.setattr(cache, "_MEMORY", {})
    (tmp_path / "not_a_dir").write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not_a_dir"))  # the user cache cannot be created
    assert user_cache_dir().parent.parent == tmp_path / "not_a_dir"
    assert _dataset(synthetic).lengths() == lengths


def _tiny_vlm(vocab_size: int, image_token_id: int, kind: str) -> VLM:
    vision = VisionConfig("clip", image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=32, num_layers=2,
                          num_heads=4, intermediate_size=64, pre_norm=True, class_token=True)
    llm = LLMConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = VLM(VLMConfig(vision, llm, image_token_id=image_token_id, attention_kind=kind)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so every parameter shapes the output
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return model


@pytest.mark.parametrize("kind", ["causal", "prefix_lm", "image_bidirectional"])
def test_packed_loss_is_the_weighted_sum_of_sample_losses(synthetic, kind, seed):
    """Packed samples must not interact: the packed batch's mean loss equals the
    per-sample losses (each sample alone, unpadded) weighted by supervised tokens,
    and each segment's logits are its sample's own."""
    dataset = _dataset(synthetic)
    tokenizer = synthetic[2]
    items = sorted((dataset[i] for i in range(len(dataset))), key=lambda x: len(x["input_ids"]))
    multi = next(i for i, x in enumerate(items) if len(x["image_spans"]) > 1)
    row = [multi] + [i for i in range(3) if i != multi][:2]  # a two-image sample and two short ones
    budget = sum(len(items[i]["input_ids"]) for i in row) + 7  # and a padded tail
    batch = PackedCollator(tokenizer.pad_token_id, budget, kind)([items[i] for i in row])
    assert batch["num_samples"] >= 2 and batch["images"].shape[0] >= 2
    check_batch(batch, [items[i] for i in row], kind, width=budget)
    model = _tiny_vlm(tokenizer.vocab_size, tokenizer.image_token_id, kind)
    alone = [PaddedCollator(tokenizer.pad_token_id, kind)([items[i]]) for i in row]
    weights = [b["supervised_tokens"] for b in alone]
    assert sum(weights) == batch["supervised_tokens"]

    def weighted(dtype):
        m = model.to(dtype)
        with torch.no_grad():
            losses = [m(**_cast(model_inputs(b), dtype)).double() for b in alone]
            logits = [m(**_cast(dict(model_inputs(b), labels=None), dtype)) for b in alone]
        return sum(w * loss for w, loss in zip(weights, losses)) / sum(weights), logits

    ref64, logits64 = weighted(torch.float64)
    base32, logits32 = weighted(torch.float32)
    with torch.no_grad():
        packed = model(**_cast(model_inputs(batch), torch.float32))
        packed_logits = model(**_cast(dict(model_inputs(batch), labels=None), torch.float32))
    assert_close(packed.reshape(1), ref64.reshape(1), base32.reshape(1), torch.float32, name="loss")
    start = 0
    for k, b in enumerate(alone):
        n = b["input_ids"].shape[1]
        assert_close(packed_logits[0, start:start + n], logits64[k][0], logits32[k][0], torch.float32,
                     name=f"logits of segment {k}")
        start += n


def _cast(inputs: dict, dtype) -> dict:
    images = inputs["images"]
    return dict(inputs, images=None if images is None else images.to(dtype))
