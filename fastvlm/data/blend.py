"""DeepSpeed-VisualChat's data blending: 1..k conversations concatenated into one
multi-image conversation, with every textual image reference renumbered.

A blended sample lists all its images first, ``"Image 1: <image>\\nImage 2: <image>\\n..."``, at
the start of its first human turn, then the source conversations one after another. In each
source, references ``Image m`` (or ``image m``) are rewritten to the blended number of the image
they meant; a source with one image and no reference gets ``"Image n: "`` before each of its
human turns, so its questions still say which image they are about. With
``shuffle_images`` the images are listed in a random order and every reference follows them.

What ``Image m`` means in a source: if its ``<image>`` tags are labelled (``"Image 2: <image>"``)
the label's image, otherwise the m-th tag's. A reference to an image the source does not have
is an error naming the sample.
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence

from fastvlm.data.formats import IMAGE_TAG, Sample

_REFERENCE = re.compile(r"\b([Ii]mage) (\d+)\b")
_LABELLED_TAG = re.compile(r"(?:\b[Ii]mage (\d+)\s*:?\s*)?" + re.escape(IMAGE_TAG) + r"[ \t]*\n?")


def _reference_map(sample: Sample) -> dict[int, int]:
    """Reference number -> index into ``sample.images``."""
    labels = [m.group(1) for t in sample.conversations for m in _LABELLED_TAG.finditer(t["value"])]
    if labels and all(label is not None for label in labels):
        numbers = [int(label) for label in labels]
        if sorted(numbers) != list(range(1, len(numbers) + 1)):
            raise ValueError(f"blend: sample {sample.id!r}: image labels {numbers} are not 1..{len(numbers)}")
        return {m: i for i, m in enumerate(numbers)}
    return {m: m - 1 for m in range(1, len(sample.images) + 1)}


def _rewrite(sample: Sample, numbers: list[int]) -> list[dict]:
    """The sample's turns with tags removed and references renumbered; ``numbers[i]`` is the
    blended number of ``sample.images[i]``."""
    ref_map = _reference_map(sample)

    def renumber(match: re.Match) -> str:
        m = int(match.group(2))
        if m not in ref_map:
            raise ValueError(f"blend: sample {sample.id!r} refers to {match.group(0)!r} but has "
                             f"{len(sample.images)} image(s)")
        return f"{match.group(1)} {numbers[ref_map[m]]}"

    turns = [{"from": t["from"], "value": _REFERENCE.sub(renumber, _LABELLED_TAG.sub("", t["value"]))}
             for t in sample.conversations]
    unreferenced = not any(_REFERENCE.search(_LABELLED_TAG.sub("", t["value"])) for t in sample.conversations)
    if len(sample.images) == 1 and unreferenced:
        turns = [{**t, "value": f"Image {numbers[0]}: {t['value']}"} if t["from"] == "human" else t for t in turns]
    return turns


def blend_group(group: Sequence[Sample], rng: random.Random, shuffle_images: bool = False) -> Sample:
    """One blended sample from ``group`` (in order)."""
    images = [img for s in group for img in s.images]
    order = list(range(len(images)))  # order[g] = listing position of the g-th image
    if shuffle_images:
        rng.shuffle(order)
    systems = {t["value"] for s in group for t in s.conversations if t["from"] == "system"}
    if len(systems) > 1:
        raise ValueError(f"blend: samples {[s.id for s in group]} have different system prompts")
    turns, g = [], 0
    for s in group:
        turns += [t for t in _rewrite(s, [order[g + i] + 1 for i in range(len(s.images))]) if t["from"] != "system"]
        g += len(s.images)
    listed = [None] * len(images)
    for g, position in enumerate(order):
        listed[position] = images[g]
    block = "".join(f"Image {q}: {IMAGE_TAG}\n" for q in range(1, len(images) + 1))
    turns[0] = {**turns[0], "value": block + turns[0]["value"]}
    head = [{"from": "system", "value": systems.pop()}] if systems else []
    return Sample(id="+".join(s.id for s in group), images=listed, conversations=head + turns)


def blend(samples: Sequence[Sample], k: int, seed: int, shuffle_images: bool = False) -> list[Sample]:
    """Shuffle ``samples`` (seeded) and cut them into groups of 1..k (uniform), each blended
    into one sample; a group of one sample is kept as it is unless its images are shuffled.
    Every input sample appears in exactly one output sample."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k!r}")
    rng = random.Random(seed)
    order = list(range(len(samples)))
    rng.shuffle(order)
    out, i = [], 0
    while i < len(order):
        size = rng.randint(1, k)
        group = [samples[j] for j in order[i:i + size]]
        i += size
        if len(group) == 1 and not (shuffle_images and len(group[0].images) > 1):
            out.append(group[0])
        else:
            out.append(blend_group(group, rng, shuffle_images))
    return out
