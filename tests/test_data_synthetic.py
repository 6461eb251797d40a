"""The synthetic VQA dataset: deterministic bytes, valid LLaVA files, balanced answers and the
chance levels stored with them, every question type, answers true to the pixels."""
import json
import os
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from fastvlm.data import read_samples
from fastvlm.data import synthetic_vqa as sv
from tests.conftest import BASE_SEED


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path, seed):
    rng = random.Random(seed)
    n_train, n_val = rng.randint(10, 40), rng.randint(5, 15)
    a = sv.write_dataset(tmp_path / "a", n_train, n_val, seed=seed, n_captions=7)
    b = sv.write_dataset(tmp_path / "b", n_train, n_val, seed=seed, n_captions=7)
    fa, fb = files(a.root), files(b.root)
    assert fa == fb
    assert len([f for f in fa if f.startswith("images/")]) >= n_train + n_val + 7
    other = sv.write_dataset(tmp_path / "c", n_train, n_val, seed=seed + 1, n_captions=7)
    assert other.train.read_bytes() != a.train.read_bytes()


def test_existing_dataset_is_reused_unless_arguments_differ(tmp_path, seed):
    first = sv.write_dataset(tmp_path, 10, 5, seed=seed, n_captions=3)
    stamp = first.train.stat().st_mtime_ns
    again = sv.write_dataset(tmp_path, 10, 5, seed=seed, n_captions=3)
    assert again.meta == first.meta and again.train.stat().st_mtime_ns == stamp
    bigger = sv.write_dataset(tmp_path, 12, 5, seed=seed, n_captions=3)
    assert len(json.loads(bigger.train.read_text())) == 12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # Module-scoped so the checks share one write; fresh per run unless FASTVLM_TEST_SEED replays it.
    seed = BASE_SEED if BASE_SEED is not None else int.from_bytes(os.urandom(4), "little")
    print(f"dataset seed={seed}")
    return sv.write_dataset(tmp_path_factory.mktemp("vqa"), 150, 100, seed=seed, image_size=48, n_captions=20)


def test_files_are_valid_llava(dataset):
    for path in (dataset.train, dataset.val, dataset.captions):
        samples = read_samples(path)
        samples.validate()
        for s in samples:
            for image in s.images:
                with Image.open(dataset.image_folder / image) as im:
                    assert im.format == "PNG" and im.mode == "RGB" and im.size == (48, 48)
    captions = read_samples(dataset.captions)
    assert all(s.conversations[0]["value"] == "<image>" for s in captions)


def test_every_question_type_and_form(dataset):
    records = json.loads(dataset.train.read_text())
    types = Counter(r["question_type"] for r in records)
    assert set(types) == set(sv.QUESTION_TYPES)
    assert max(types.values()) - min(types.values()) <= 1  # balanced types
    compare = [r for r in records if r["question_type"] == "compare"]
    assert all(len(r["images"]) == 2 and "Image 1 or Image 2" in r["conversations"][0]["value"] for r in compare)
    multi = [r for r in records if len(r["conversations"]) > 2]
    assert multi and all(len(r["question_types"]) == len(r["conversations"]) // 2 for r in records)
    assert {t for r in multi for t in r["question_types"]} <= {"colour", "shape", "position"}
    for r in records:
        assert r["answer"] == r["conversations"][-1]["value"] in sv.ANSWERS[r["question_type"]]
        assert all(len(t["value"].split()) <= 2 for t in r["conversations"][1::2])  # short answers
    all_multi = sv.write_dataset(dataset.root / "mt", 30, 0, seed=1, multi_turn_fraction=1.0, n_captions=0)
    for r in json.loads(all_multi.train.read_text()):
        assert (len(r["conversations"]) > 2) == (r["question_type"] in ("colour", "shape", "position"))


@pytest.mark.parametrize("split", ["train", "val"])
def test_chance_levels(dataset, split):
    """Recomputed here from the records: the majority answer's share per type, balanced
    answers (counts differ by at most one), uniform chance = 1 / #answers."""
    records = json.loads(getattr(dataset, split).read_text())
    stored = dataset.meta["splits"][split]["types"]
    by_type: dict = {}
    for r in records:
        by_type.setdefault(r["question_type"], Counter())[r["conversations"][-1]["value"]] += 1
    assert set(stored) == set(by_type)
    for qtype, counts in by_type.items():
        total = sum(counts.values())
        assert stored[qtype]["questions"] == total
        assert stored[qtype]["answer_counts"] == dict(counts)
        assert stored[qtype]["chance"] == pytest.approx(max(counts.values()) / total)
        assert stored[qtype]["uniform_chance"] == pytest.approx(1 / len(sv.ANSWERS[qtype]))
        n_answers = len(sv.ANSWERS[qtype])
        if total >= n_answers:
            assert len(counts) == n_answers and max(counts.values()) - min(counts.values()) <= 1
    every = dataset.meta["splits"][split]["all_turns"]
    assert sum(v["questions"] for v in every.values()) == sum(len(r["conversations"]) // 2 for r in records)
    assert json.loads((dataset.root / "meta.json").read_text()) == dataset.meta


def _mask(image: np.ndarray, colour: str) -> np.ndarray:
    return np.all(image == np.array(sv.COLOURS[colour], dtype=np.uint8), axis=-1)


def test_answers_are_true_to_the_pixels(dataset):
    """Objects are drawn in exact colours: a colour answer is in the image, a positioned
    object's pixels lie in its cell, a compared shape's count differs as answered."""
    records = json.loads(dataset.train.read_text()) + json.loads(dataset.val.read_text())
    checked = Counter()
    for r in records:
        images = [np.asarray(Image.open(dataset.image_folder / p)) for p in r.get("images", [r.get("image")])]
        size = images[0].shape[0]
        for qtype, (q, a) in zip(r["question_types"], zip(r["conversations"][::2], r["conversations"][1::2])):
            question, answer = q["value"], a["value"]
            if qtype == "colour":
                assert _mask(images[0], answer).any(), r["id"]
            elif qtype == "position":
                colour = next(c for c in sv.COLOURS if f" {c} " in question)
                ys, xs = np.nonzero(_mask(images[0], colour))
                row, col = sv.POSITIONS[answer]
                cell = size / 3  # every pixel inside the cell, give or take PIL's inclusive edge pixel
                assert ys.size and row * cell - 1 <= ys.min() and ys.max() <= (row + 1) * cell, r["id"]
                assert col * cell - 1 <= xs.min() and xs.max() <= (col + 1) * cell, r["id"]
            checked[qtype] += 1
    assert checked["colour"] and checked["position"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        sv.write_dataset(tmp_path, 1, 1, image_size=16)
    with pytest.raises(ValueError, match="n_train"):
        sv.write_dataset(tmp_path, -1, 1)
    with pytest.raises(ValueError, match="question_types"):
        sv.write_dataset(tmp_path, 1, 1, question_types=["colour", "size"])
    with pytest.raises(ValueError, match="multi_turn_fraction"):
        sv.write_dataset(tmp_path, 1, 1, multi_turn_fraction=2.0)


@pytest.mark.parametrize("template", ["literal", "llava_v1"])
def test_every_sample_encodes_with_the_builtin_tokenizer(dataset, template):
    """The demo's path: a BPE trained on the dataset's text, every sample's mask exact and its
    supervised tokens exactly the answers (each a short run of tokens)."""
    from fastvlm.data import IGNORE_INDEX, encode_conversation, train_bpe_tokenizer
    samples = [*read_samples(dataset.train), *read_samples(dataset.val)]
    captions = list(read_samples(dataset.captions))
    tok = train_bpe_tokenizer([t["value"] for s in samples + captions for t in s.conversations], vocab_size=600)
    end = "\n" if template == "literal" else tok.eos_token
    for s in samples:
        enc = encode_conversation(s, tok, template, image_tokens=4)
        runs, run = [], []
        for token, label in zip(enc.input_ids, enc.labels):
            if label != IGNORE_INDEX:
                run.append(token)
            elif run:
                runs, run = [*runs, run], []
        runs += [run] if run else []
        assert [tok.decode(r) for r in runs] == [f" {t['value']}{end}" for t in s.conversations[1::2]]
        assert enc.num_images == len(s.images)
    for s in captions:
        enc = encode_conversation(s, tok, "plain", image_tokens=4)
        assert tok.decode([t for t in enc.labels if t != IGNORE_INDEX]) == s.conversations[1]["value"] + "\n"
