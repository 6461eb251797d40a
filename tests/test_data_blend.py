"""DeepSpeed-VisualChat blending: every image reference in a blended sample points at the image
it meant in its source, with and without shuffled image order.

Source texts name their images: a reference is written ``Image m (file)`` and a single-image
question ends ``(file)``, so the check reads the file a reference must resolve to.
"""
import random
import re
from collections import Counter

import pytest

from fastvlm.data import Sample, blend
from fastvlm.data.blend import blend_group
from fastvlm.data.formats import parse_record

REF = re.compile(r"Image (\d+) \(([^)]+)\)")
PREFIXED = re.compile(r"^Image (\d+): [^(]*\(([^)]+)\)")


def single(rng, i):
    name = f"s{i}.png"
    turns = [{"from": "human", "value": f"<image>\nWhat is in ({name})?"}, {"from": "gpt", "value": "a shape"}]
    for _ in range(rng.randint(0, 2)):
        turns += [{"from": "human", "value": f"More about ({name})?"}, {"from": "gpt", "value": "no"}]
    return Sample(f"s{i}", [name], turns)


def multi(rng, i):
    """Two or three images with labelled tags, possibly out of order, and references."""
    n = rng.randint(2, 3)
    names = [f"m{i}_{j}.png" for j in range(n)]
    labels = rng.sample(range(1, n + 1), n)  # tag j is called "Image labels[j]"
    text = "".join(f"Image {labels[j]}: <image>\n" for j in range(n))
    by_label = {labels[j]: names[j] for j in range(n)}
    refs = [f"Image {m} ({by_label[m]})" for m in rng.sample(range(1, n + 1), n)]
    answer = rng.randint(1, n)
    return Sample(f"m{i}", names, [{"from": "human", "value": text + "Compare " + " and ".join(refs) + "."},
                                   {"from": "gpt", "value": f"Image {answer} ({by_label[answer]})"}])


def text_only(i):
    return Sample(f"t{i}", [], [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi"}])


def sources(rng, n):
    kinds = [rng.choice("ssmt") for _ in range(n)]
    return [single(rng, i) if k == "s" else multi(rng, i) if k == "m" else text_only(i)
            for i, k in enumerate(kinds)]


def check_references(sample: Sample):
    """In a blended sample, every reference resolves to the image it names and the first turn
    starts with the block listing all images."""
    n = len(sample.images)
    first = sample.conversations[0]["value"]
    checked = 0
    for turn in sample.conversations:
        for m in REF.finditer(turn["value"]):
            assert sample.images[int(m.group(1)) - 1] == m.group(2), (sample.id, turn)
            checked += 1
        body = turn["value"]
        if turn is sample.conversations[0] and n:
            block = "".join(f"Image {q}: <image>\n" for q in range(1, n + 1))
            assert body.startswith(block)
            body = body[len(block):]
        m = PREFIXED.match(body) if "<image>" not in body else None  # not a source's own tag labels
        if m:
            assert sample.images[int(m.group(1)) - 1] == m.group(2), (sample.id, turn)
            checked += 1
    assert first.count("<image>") == n
    return checked


@pytest.mark.parametrize("shuffle", [False, True])
def test_blend_renumbers_every_reference(seed, shuffle):
    rng = random.Random(seed)
    data = sources(rng, rng.randint(40, 80))
    k = rng.randint(2, 4)
    out = blend(data, k=k, seed=seed, shuffle_images=shuffle)
    # Every source in exactly one output, groups of 1..k.
    ids = Counter(part for s in out for part in s.id.split("+"))
    assert ids == Counter(s.id for s in data)
    assert all(1 <= len(s.id.split("+")) <= k for s in out)
    by_id = {s.id: s for s in data}
    moved = 0
    for s in out:
        parse_record(s.to_record(), "blended", 0)  # a valid sample: alternating, tags == images
        group = [by_id[i] for i in s.id.split("+")]
        concatenated = [img for g in group for img in g.images]
        assert sorted(s.images) == sorted(concatenated)
        if not shuffle:
            assert s.images == concatenated
        moved += s.images != concatenated
        if len(group) == 1 and not (shuffle and len(group[0].images) > 1):
            assert s == group[0]  # kept as it is (its labels may be out of order: not checked below)
            continue
        # Every source reference and every single-image question survives, pointing right.
        expected = sum(len(REF.findall(t["value"])) for g in group for t in g.conversations)
        expected += sum(t["from"] == "human" for g in group if len(g.images) == 1 for t in g.conversations)
        assert check_references(s) == expected
        answers = [t["value"] for t in s.conversations if t["from"] == "gpt"]
        assert len(answers) == sum(t["from"] == "gpt" for g in group for t in g.conversations)
    if shuffle:
        assert moved > 0


def test_blend_is_deterministic(seed):
    data = sources(random.Random(seed), 30)
    assert blend(data, 3, seed, shuffle_images=True) == blend(data, 3, seed, shuffle_images=True)
    assert sorted(s.id for s in blend(data, 1, seed)) == sorted(s.id for s in data)


def test_blend_rejects_broken_references():
    bad = Sample("bad", ["a.png"], [{"from": "human", "value": "<image>\nIs Image 2 (b.png) here?"},
                                    {"from": "gpt", "value": "no"}])
    ok = Sample("ok", ["c.png"], [{"from": "human", "value": "<image>\nHi (c.png)"}, {"from": "gpt", "value": "x"}])
    with pytest.raises(ValueError, match=r"sample 'bad' refers to 'Image 2' but has 1 image"):
        blend_group([ok, bad], random.Random(0))
    labels = Sample("lab", ["a.png", "b.png"], [{"from": "human", "value": "Image 1: <image> Image 3: <image>"},
                                                {"from": "gpt", "value": "x"}])
    with pytest.raises(ValueError, match=r"'lab': image labels \[1, 3\]"):
        blend_group([labels, ok], random.Random(0), shuffle_images=True)
    system_a = Sample("sa", [], [{"from": "system", "value": "A"}, {"from": "human", "value": "q"},
                                 {"from": "gpt", "value": "x"}])
    system_b = Sample("sb", [], [{"from": "system", "value": "B"}, {"from": "human", "value": "q"},
                                 {"from": "gpt", "value": "x"}])
    with pytest.raises(ValueError, match="different system prompts"):
        blend_group([system_a, system_b], random.Random(0))
    with pytest.raises(ValueError, match="k: expected"):
        blend([ok], k=0, seed=0)
