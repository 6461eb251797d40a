"""A synthetic VQA dataset of simple shapes, written to disk in LLaVA format with real PNGs.

Each image is a 3x3 grid of cells on a plain or (half the images) noisy grey background; objects (circle,
square, triangle, cross in six colours) sit in distinct cells. Question types:

========  =========================================================  ==========================
type      question (templated)                                       answers (balanced)
========  =========================================================  ==========================
colour    "What colour is the {shape}?"                              red green blue yellow purple orange
shape     "What shape is the {colour} object?"                       circle square triangle cross
count     "How many {shapes} are there?"                             1 2 3 4
position  "Where is the {colour} {shape}?"                           left right top bottom
compare   "Which image has more {shapes}, Image 1 or Image 2?"       Image 1, Image 2 (two images)
========  =========================================================  ==========================

Every scene is built answer first: each type gets an equal share of the samples and, within a
type, each answer an equal share (up to one), then a scene is drawn that makes the answer
true (distractors never make the question ambiguous: the asked-about shape or colour is
unique, other shapes are counted apart). Multi-turn samples ask 2-3 colour / shape /
position questions about one scene of objects with distinct shapes and colours in the four
position cells (earlier turns' answers are uniform, the last turn's balanced as above).

Evaluation protocol the metadata is made for: prompt with a val sample's conversation up to
its last human turn, generate, exact-match against the record's ``answer``, group by its
``question_type``. ``meta.json`` stores, per split and type, over those evaluated questions
(``types``) and over every question turn (``all_turns``), the answer counts and two chance
levels: ``chance`` = accuracy of always answering that type's most frequent answer in the split
(the majority baseline: what a model that ignores the image reaches), ``uniform_chance`` =
1 / number of possible answers. With balanced answers the two agree up to rounding.

Preference pairs (``write_preference_pairs``, a separate call: ``write_dataset`` writes none):
per sample of a split, its conversation up to the last question with the right answer as
``chosen`` and a plausible wrong one of the same type as ``rejected``, in
``{split}_preference.json``.

Determinism: sample i of a split depends only on the seed, the split, i and its planned
(type, answer), so the same arguments give the same bytes. ``train.json``, ``val.json``,
``captions.json`` and, last, ``meta.json`` are written atomically; a dataset with a
``meta.json`` is complete.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fastvlm.utils.io import atomic_write_text

COLOURS = {"red": (215, 35, 35), "green": (35, 165, 55), "blue": (35, 75, 225), "yellow": (235, 205, 20),
           "purple": (140, 50, 185), "orange": (245, 130, 15)}
SHAPES = ("circle", "square", "triangle", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
# Cell (row, col) of the 3x3 grid that each position answer puts its object in.
POSITIONS = {"left": (1, 0), "right": (1, 2), "top": (0, 1), "bottom": (2, 1)}
CELL_NAMES = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left", (1, 1): "centre",
              (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right"}
COUNTS = ("1", "2", "3", "4")
IMAGE_REFS = ("Image 1", "Image 2")
QUESTION_TYPES = ("colour", "shape", "count", "position", "compare")
ANSWERS = {"colour": tuple(COLOURS), "shape": SHAPES, "count": COUNTS, "position": tuple(POSITIONS),
           "compare": IMAGE_REFS}
QUESTIONS = {
    "colour": ("What colour is the {shape}?", "Which colour does the {shape} have?"),
    "shape": ("What shape is the {colour} object?", "Which shape is {colour}?"),
    "count": ("How many {shapes} are there?", "Count the {shapes}."),
    "position": ("Where is the {colour} {shape}?", "Is the {colour} {shape} left, right, top or bottom?"),
    "compare": ("Which image has more {shapes}, Image 1 or Image 2?",),
}
CELLS = [(r, c) for r in range(3) for c in range(3)]
_SPLIT_CODES = {"train": 1, "val": 2, "captions": 3}
CHANCE_DEFINITION = ("types: over each sample's evaluated question (its last turn: question_type, answer); "
                     "all_turns: over every question turn. chance: accuracy of always answering the type's most "
                     "frequent answer in the split; uniform_chance: 1 / number of possible answers of the type")


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    cell: tuple[int, int]


@dataclass
class SyntheticSplits:
    """Paths of a written dataset and its ``meta.json`` contents."""

    root: Path
    train: Path
    val: Path
    captions: Path
    image_folder: Path
    meta: dict


def _others(options, exclude, rng: random.Random, k: int) -> list:
    pool = [o for o in options if o not in exclude]
    return rng.sample(pool, k)


def _scatter(rng, specs, taken=()) -> list[Obj]:
    """Objects for (shape, colour) specs in distinct random free cells."""
    cells = rng.sample([c for c in CELLS if c not in taken], len(specs))
    return [Obj(s, c, cell) for (s, c), cell in zip(specs, cells)]


def _colour_scene(rng, answer):
    shape = rng.choice(SHAPES)
    distractors = [(s, rng.choice(list(COLOURS))) for s in _others(SHAPES, {shape}, rng, rng.randint(0, 2))]
    question = rng.choice(QUESTIONS["colour"]).format(shape=shape)
    return _scatter(rng, [(shape, answer), *distractors]), question, answer


def _shape_scene(rng, answer):
    colour = rng.choice(list(COLOURS))
    distractors = [(rng.choice(SHAPES), c) for c in _others(COLOURS, {colour}, rng, rng.randint(0, 2))]
    question = rng.choice(QUESTIONS["shape"]).format(colour=colour)
    return _scatter(rng, [(answer, colour), *distractors]), question, answer


def _count_objects(rng, shape: str, n: int) -> list[Obj]:
    colours = list(COLOURS)
    specs = [(shape, rng.choice(colours)) for _ in range(n)]
    specs += [(rng.choice([s for s in SHAPES if s != shape]), rng.choice(colours)) for _ in range(rng.randint(0, 1))]
    return _scatter(rng, specs)


def _count_scene(rng, answer):
    shape = rng.choice(SHAPES)
    question = rng.choice(QUESTIONS["count"]).format(shapes=PLURAL[shape])
    return _count_objects(rng, shape, int(answer)), question, answer


def _position_question(rng, obj: Obj) -> tuple[str, str]:
    answer = next(p for p, cell in POSITIONS.items() if cell == obj.cell)
    return rng.choice(QUESTIONS["position"]).format(colour=obj.colour, shape=obj.shape), answer


def _position_scene(rng, answer):
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    objs = [Obj(shape, colour, POSITIONS[answer])]
    if rng.random() < 0.5:  # a distractor that differs in shape and colour, elsewhere
        spec = (rng.choice([s for s in SHAPES if s != shape]), rng.choice([c for c in COLOURS if c != colour]))
        objs += _scatter(rng, [spec], taken={POSITIONS[answer]})
    question, _ = _position_question(rng, objs[0])
    return objs, question, answer


_ATTRIBUTE = {"colour": "colour", "shape": "shape", "position": "cell"}


def _ask(rng, qtype: str, obj: Obj) -> tuple[str, str, str]:
    if qtype == "colour":
        return qtype, rng.choice(QUESTIONS["colour"]).format(shape=obj.shape), obj.colour
    if qtype == "shape":
        return qtype, rng.choice(QUESTIONS["shape"]).format(colour=obj.colour), obj.shape
    return (qtype, *_position_question(rng, obj))


def _multi_turn_scene(rng, last_type: str, answer: str):
    """2-3 objects with distinct shapes, colours and position cells, the first one carrying
    ``answer``; 1-2 earlier questions about other (type, object) pairs, then the last one.
    Each object's shape, colour and position are uniform, so every answer is too."""
    k = rng.randint(2, 3)
    value = POSITIONS[answer] if last_type == "position" else answer
    pools = {"shape": list(SHAPES), "colour": list(COLOURS), "cell": list(POSITIONS.values())}
    columns = {}
    for attribute, pool in pools.items():
        fixed = [value] if attribute == _ATTRIBUTE[last_type] else []
        columns[attribute] = fixed + rng.sample([v for v in pool if v not in fixed], k - len(fixed))
    objs = [Obj(s, c, cell) for s, c, cell in zip(columns["shape"], columns["colour"], columns["cell"])]
    earlier = [(q, j) for q in ("colour", "shape", "position") for j in range(k) if (q, j) != (last_type, 0)]
    turns = [_ask(rng, q, objs[j]) for q, j in rng.sample(earlier, rng.randint(1, 2))]
    return objs, [*turns, _ask(rng, last_type, objs[0])]


def _compare_scene(rng, answer):
    shape = rng.choice(SHAPES)
    more, fewer = sorted(rng.sample(range(1, len(COUNTS) + 1), 2), reverse=True)
    counts = (more, fewer) if answer == "Image 1" else (fewer, more)
    question = "Image 1: <image>\nImage 2: <image>\n" + QUESTIONS["compare"][0].format(shapes=PLURAL[shape])
    return [_count_objects(rng, shape, n) for n in counts], question, answer


def _draw(objs: list[Obj], size: int, rng: random.Random) -> Image.Image:
    noisy = rng.random() < 0.5
    grey = rng.randint(175, 235)
    if noisy:
        noise = np.random.default_rng(rng.getrandbits(64)).normal(0.0, 14.0, (size, size, 3))
        pixels = np.clip(grey + noise, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
    else:
        image = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for obj in objs:
        half = cell * rng.uniform(0.28, 0.4)
        slack = cell / 2 - half
        cx = (obj.cell[1] + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (obj.cell[0] + 0.5) * cell + rng.uniform(-slack, slack)
        box = [cx - half, cy - half, cx + half, cy + half]
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
        else:
            bar = half / 2.5
            draw.rectangle([box[0], cy - bar, box[2], cy + bar], fill=fill)
            draw.rectangle([cx - bar, box[1], cx + bar, box[3]], fill=fill)
    return image


def caption(objs: list[Obj]) -> str:
    """A stage-1 caption listing every object with its cell, in reading order."""
    parts = [f"a {o.colour} {o.shape} at the {CELL_NAMES[o.cell]}" for o in sorted(objs, key=lambda o: o.cell)]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def _rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"fastvlm-synthetic-vqa:{seed}:{_SPLIT_CODES[split]}:{index}")


def _vqa_record(split: str, index: int, qtype: str, answer: str, seed: int, size: int, multi_turn: float,
                folder: Path) -> dict:
    rng = _rng(seed, split, index)
    name = f"{split}_{index:06d}"
    if qtype == "compare":
        scenes, question, answer = _compare_scene(rng, answer)
        images = [f"{name}_{j}.png" for j in range(2)]
        for scene, image in zip(scenes, images):
            _draw(scene, size, rng).save(folder / image)
        turns = [(qtype, question, answer)]
    else:
        if qtype in ("colour", "shape", "position") and rng.random() < multi_turn:
            objs, turns = _multi_turn_scene(rng, qtype, answer)
        else:
            objs, question, answer = {"colour": _colour_scene, "shape": _shape_scene, "count": _count_scene,
                                      "position": _position_scene}[qtype](rng, answer)
            turns = [(qtype, question, answer)]
        images = [f"{name}.png"]
        _draw(objs, size, rng).save(folder / images[0])
        turns[0] = (turns[0][0], "<image>\n" + turns[0][1], turns[0][2])
    conversations = []
    for _, question, answer in turns:
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    record = {"id": name, **({"image": images[0]} if len(images) == 1 else {"images": images}),
              "conversations": conversations, "question_type": turns[-1][0],
              "question_types": [t[0] for t in turns], "answer": turns[-1][2]}
    return record


def _caption_record(index: int, seed: int, size: int, folder: Path) -> dict:
    rng = _rng(seed, "captions", index)
    specs = [(rng.choice(SHAPES), rng.choice(list(COLOURS))) for _ in range(rng.randint(1, 3))]
    objs = _scatter(rng, specs)
    name = f"cap_{index:06d}.png"
    _draw(objs, size, rng).save(folder / name)
    return {"id": f"cap_{index:06d}", "image": name,
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption(objs)}]}


def _level(counts: Counter, qtype: str) -> dict:
    total = sum(counts.values())
    return {"questions": total, "answer_counts": dict(sorted(counts.items())),
            "chance": max(counts.values()) / total, "uniform_chance": 1 / len(ANSWERS[qtype])}


def chance_levels(records: list[dict], all_turns: bool = False) -> dict:
    """Per question type: answer counts, ``chance`` (the majority answer's share) and
    ``uniform_chance``, over the evaluated question of each sample (its last turn, the one
    ``question_type`` and ``answer`` name) or, with ``all_turns``, over every question turn."""
    counts: dict[str, Counter] = {}
    for r in records:
        answers = [t["value"] for t in r["conversations"] if t["from"] == "gpt"]
        pairs = zip(r["question_types"], answers) if all_turns else [(r["question_type"], r["answer"])]
        for qtype, answer in pairs:
            counts.setdefault(qtype, Counter())[answer] += 1
    return {qtype: _level(c, qtype) for qtype, c in sorted(counts.items())}


def _balanced_plan(n: int, types, rng: random.Random) -> list[tuple[str, str]]:
    """(question type, answer) of each sample: types in equal shares, and within a type the
    answers in equal shares (up to one), in a seeded random order."""
    order = [types[i % len(types)] for i in range(n)]
    rng.shuffle(order)
    cycles = {q: rng.sample(ANSWERS[q], len(ANSWERS[q])) for q in types}
    seen: Counter = Counter()
    plan = []
    for qtype in order:
        plan.append((qtype, cycles[qtype][seen[qtype] % len(cycles[qtype])]))
        seen[qtype] += 1
    return plan


def write_dataset(root, n_train: int, n_val: int, seed: int = 0, image_size: int = 64, *,
                  n_captions: int | None = None, question_types=QUESTION_TYPES, multi_turn_fraction: float = 0.25,
                  overwrite: bool = False) -> SyntheticSplits:
    """Write the dataset under ``root`` (``images/``, ``train.json``, ``val.json``,
    ``captions.json``, ``meta.json``); question types are balanced within each split.
    An existing complete dataset written with the same arguments is reused unless ``overwrite``."""
    for name, value in (("n_train", n_train), ("n_val", n_val)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
    n_captions = n_train if n_captions is None else n_captions
    if not isinstance(n_captions, int) or n_captions < 0:
        raise ValueError(f"n_captions: expected an int >= 0 or None, got {n_captions!r}")
    if not isinstance(image_size, int) or image_size < 24:
        raise ValueError(f"image_size: expected an int >= 24 (3x3 cells of objects), got {image_size!r}")
    question_types = tuple(question_types)
    if not question_types or any(q not in QUESTION_TYPES for q in question_types):
        raise ValueError(f"question_types: expected a non-empty subset of {QUESTION_TYPES}, got {question_types}")
    if not 0.0 <= multi_turn_fraction <= 1.0:
        raise ValueError(f"multi_turn_fraction: expected a value in [0, 1], got {multi_turn_fraction}")
    root = Path(root)
    params = _params(n_train, n_val, seed, image_size, n_captions, question_types, multi_turn_fraction)
    if not overwrite and (found := _written(root, params)) is not None:
        return found
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        plan = _balanced_plan(n, question_types, random.Random(f"fastvlm-synthetic-vqa:{seed}:{split}:plan"))
        records = [_vqa_record(split, i, qtype, answer, seed, image_size, multi_turn_fraction, folder)
                   for i, (qtype, answer) in enumerate(plan)]
        atomic_write_text(root / f"{split}.json", json.dumps(records, indent=0) + "\n")
        splits[split] = {"file": f"{split}.json", "samples": n, "types": chance_levels(records),
                         "all_turns": chance_levels(records, all_turns=True)}
    captions = [_caption_record(i, seed, image_size, folder) for i in range(n_captions)]
    atomic_write_text(root / "captions.json", json.dumps(captions, indent=0) + "\n")
    meta = {"params": params, "image_folder": "images", "question_types": list(question_types),
            "answers": {q: list(ANSWERS[q]) for q in question_types}, "chance_definition": CHANCE_DEFINITION,
            "splits": splits, "captions": {"file": "captions.json", "samples": n_captions}}
    atomic_write_text(root / "meta.json", json.dumps(meta, indent=1) + "\n")
    return _splits(root, meta)


def plausible_wrong_answer(qtype: str, answer: str, rng: random.Random) -> str:
    """A wrong answer of the same question type: for counts one off (what a model that
    miscounts says), else any other answer of the type."""
    if qtype not in ANSWERS or answer not in ANSWERS[qtype]:
        raise ValueError(f"answer: {answer!r} is not a {qtype!r} answer (expected one of {ANSWERS.get(qtype)})")
    if qtype == "count":
        return rng.choice([c for c in COUNTS if abs(int(c) - int(answer)) == 1])
    return rng.choice([a for a in ANSWERS[qtype] if a != answer])


def write_preference_pairs(splits: SyntheticSplits, split: str = "train", seed: int = 0) -> Path:
    """``{split}_preference.json`` next to the split's file (fastvlm.data.preference's format):
    per sample its image(s), its conversation up to the last question, ``chosen`` = the right
    answer and ``rejected`` = `plausible_wrong_answer`, with ``question_type`` and ``answer``.
    The same dataset and seed give the same bytes; the dataset's own files are not touched."""
    if split not in ("train", "val"):
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
    source = splits.train if split == "train" else splits.val
    records = json.loads(source.read_text())
    pairs = []
    for i, r in enumerate(records):
        rng = random.Random(f"fastvlm-synthetic-vqa-preference:{seed}:{split}:{i}")
        images = {k: r[k] for k in ("image", "images") if k in r}
        pairs.append({"id": r["id"], **images, "conversations": r["conversations"][:-1], "chosen": r["answer"],
                      "rejected": plausible_wrong_answer(r["question_type"], r["answer"], rng),
                      "question_type": r["question_type"], "answer": r["answer"]})
    out = source.with_name(f"{split}_preference.json")
    atomic_write_text(out, json.dumps(pairs, indent=0) + "\n")
    return out


def written_dataset(root, n_train: int, n_val: int, seed: int = 0, image_size: int = 64) -> SyntheticSplits | None:
    """The complete dataset under ``root`` if ``write_dataset`` wrote it with these arguments
    (and its defaults), else None; writes nothing."""
    return _written(Path(root), _params(n_train, n_val, seed, image_size))


def _params(n_train, n_val, seed, image_size, n_captions=None, question_types=QUESTION_TYPES,
            multi_turn_fraction=0.25) -> dict:
    """What meta.json records a dataset was written with (write_dataset's arguments and defaults)."""
    return {"n_train": n_train, "n_val": n_val, "n_captions": n_train if n_captions is None else n_captions,
            "seed": seed, "image_size": image_size, "question_types": list(question_types),
            "multi_turn_fraction": multi_turn_fraction}


def _written(root: Path, params: dict) -> SyntheticSplits | None:
    meta_path = root / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("params") == params:
            return _splits(root, meta)
    return None


def _splits(root: Path, meta: dict) -> SyntheticSplits:
    return SyntheticSplits(root=root, train=root / "train.json", val=root / "val.json",
                           captions=root / "captions.json", image_folder=root / meta["image_folder"], meta=meta)
