"""The data of a run and of each stage, on top of fastvlm.data.

``prepare_data`` gives the run its tokenizer and sample lists (generating the
synthetic VQA dataset into RUN/data, training the built-in BPE tokenizer into
RUN/tokenizer on first use). ``StageBatches`` turns a stage's samples into an
endless stream of micro-batches — packed rows of ``packing_budget`` tokens
(``batch_size`` rows each) or padded batches — whose position is the data
sampler's resumable state. What each stage type reads:

- contrastive: (image, caption) pairs of the captions file (its samples with an image);
- lm: the training conversations without their images, every token supervised;
- align: the same pairs in the ``plain`` template (LLaVA stage 1);
- instruct: the training conversations in the recipe's template.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from fastvlm.data import Sample, load_tokenizer, read_samples, train_bpe_tokenizer
from fastvlm.data.collate import collate_rows
from fastvlm.data.dataset import VLMDataset
from fastvlm.data.packing import pack
from fastvlm.data.sampler import PackedBatchSampler
from fastvlm.models.preprocess import ImagePreprocessor
from fastvlm.train.recipe import Recipe, Stage

IMAGE_TAG = "<image>"


@dataclass
class RunData:
    tokenizer: object
    train: list
    val: list
    captions: list
    image_root: Path
    chance: dict | None  # question type -> chance accuracy (synthetic data), else None
    files: dict = field(default_factory=dict)  # split -> the file its samples came from


def prepare_data(recipe: Recipe, run_dir: Path) -> RunData:
    d = recipe.data
    if d.kind == "synthetic_vqa":
        from fastvlm.data import synthetic_vqa

        root = run_dir / "data"
        if not (root / "meta.json").is_file():
            s = d.synthetic
            synthetic_vqa.write_dataset(root, s.n_train, s.n_val, seed=s.seed, image_size=s.image_size)
        train, val, captions = (root / "train.json", root / "val.json", root / "captions.json")
        meta = json.loads((root / "meta.json").read_text())
        chance = {t: v["chance"] for t, v in meta["splits"]["val"]["types"].items()}
        root = root / meta["image_folder"]
    else:
        root = _exists(d.image_root or Path(d.train).parent, "data.image_root")
        train, val = _exists(d.train, "data.train"), _exists(d.val, "data.val")
        captions, chance = _exists(d.captions, "data.captions") if d.captions else train, None
    samples = [list(read_samples(p)) for p in (train, val, captions)]
    tokenizer = run_tokenizer(recipe, run_dir, samples[0] + samples[2])
    return RunData(tokenizer, *samples, image_root=Path(root), chance=chance,
                   files={"train": Path(train), "validation": Path(val)})


def _exists(path, key: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{key}: {path} does not exist")
    return p


def run_tokenizer(recipe: Recipe, run_dir: Path, samples: list):
    """RUN/tokenizer if saved; else the model's tokenizer, or a BPE trained on `samples`' text."""
    saved = run_dir / "tokenizer"
    m = recipe.model
    if (saved / "tokenizer.json").is_file():
        return load_tokenizer(saved, image_token=m.image_token)
    if m.source == "tiny":
        texts = [t["value"].replace(IMAGE_TAG, "") for s in samples for t in s.conversations]
        tok = train_bpe_tokenizer(texts, vocab_size=m.tiny.vocab_size, seed=recipe.run.seed,
                                  image_token=m.image_token)
    else:
        source = m.tokenizer or (m.path if m.source == "pretrained" else m.llm)
        tok = load_tokenizer(_exists(source, "model.tokenizer"), image_token=m.image_token)
    tok.save(saved)
    return tok


def caption_of(sample: Sample) -> str:
    return next(t["value"] for t in reversed(sample.conversations) if t["from"] == "gpt")


def stage_samples(stage: Stage, data: RunData) -> tuple[list, str]:
    """(samples, template) a stage trains on."""
    if stage.type in ("contrastive", "align"):
        # An image and its caption: a text-only sample has no pair; of several images, the first
        # (the batch's image files are then the images it decodes, which a feature cache reads).
        pairs = [replace(s, images=s.images[:1], conversations=[{"from": "human", "value": IMAGE_TAG},
                                                                {"from": "gpt", "value": caption_of(s)}])
                 for s in data.captions if s.images]
        return pairs, "plain"
    if stage.type == "lm":
        return [replace(s, images=[], conversations=[{**t, "value": t["value"].replace(IMAGE_TAG, "").strip()}
                                                     for t in s.conversations]) for s in data.train], None
    return data.train, None


def preprocessor_for(model) -> ImagePreprocessor:
    v = model.config.vision
    return ImagePreprocessor.for_family(v.family, v.image_size)


class StageBatches:
    """Endless micro-batches of one stage; ``state_dict`` is the sampler's (taken between steps)."""

    def __init__(self, stage: Stage, recipe: Recipe, data: RunData, model, seed: int):
        self.stage, self.tokenizer = stage, data.tokenizer
        samples, template = stage_samples(stage, data)
        self.samples = samples
        template = template or recipe.data.template
        budget = stage.packing_budget
        self.kind = stage.attention_kind or recipe.model.attention_kind
        image_tokens = model.image_tokens
        self.dataset = VLMDataset(samples, data.image_root, data.tokenizer, template, image_tokens,
                                  preprocessor_for(model), max_length=min(budget, recipe.data.max_length or budget),
                                  train_on_prompt=stage.type == "lm" or stage.train_on_prompt)
        self.packed = stage.packing and stage.type != "contrastive"
        lengths = self.lengths()
        self.sampler = PackedBatchSampler(lengths, budget, seed, shuffle=True,
                                          batch_size=None if self.packed else stage.batch_size,
                                          drop_last=not self.packed and len(lengths) >= stage.batch_size)
        self.rows_per_batch = stage.batch_size if self.packed else 1
        self.pad_id = data.tokenizer.pad_token_id if data.tokenizer.pad_token_id is not None else 0
        self.image_root = data.image_root
        self.rank, self.world = 0, 1

    def shard(self, rank: int, world: int) -> None:
        """Serve rank `rank` of `world`: the global stream of micro-batches stays the same (so
        is the sampler's position, hence any world size resumes it), and every micro-batch
        of index != rank (mod world) comes out as None, not collated."""
        self.rank, self.world = rank, world

    def lengths(self) -> list[int]:
        """Exact token counts (the tokenizer is fast; exact lengths pack without overflow)."""
        if self.stage.type == "contrastive":
            return [max(1, len(self.tokenizer.encode(caption_of(s))[0])) for s in self.samples]
        encoded = (self.dataset.encode(i) for i in range(len(self.samples)))
        return [len(e) if e is not None else self.stage.packing_budget for e in encoded]

    def steps_per_epoch(self, grad_accum: int) -> int:
        return max(1, len(self.sampler) // (self.rows_per_batch * grad_accum))

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def __iter__(self):
        rows, index = [], 0
        while True:  # the sampler moves to its next epoch when one ends
            for indices in self.sampler:
                rows.append(indices)
                if len(rows) == self.rows_per_batch:
                    yield self.collate(rows) if index % self.world == self.rank else None
                    rows, index = [], index + 1

    def collate(self, rows: list[list[int]]) -> dict:
        if self.stage.type == "contrastive":
            return self.contrastive_batch(rows[0])
        planned = [[item for item in map(self.dataset.__getitem__, row) if item is not None] for row in rows]
        width = self.stage.packing_budget if self.packed else max(
            sum(i["input_ids"].numel() for i in row) for row in planned)
        fitted = []
        for row in planned:
            lengths = [i["input_ids"].numel() for i in row]
            fitted += [row] if sum(lengths) <= width else [[row[j] for j in r] for r in pack(lengths, width)]
        batch = collate_rows([r for r in fitted if r], width, self.pad_id, self.kind)
        by_id = {s.id: s for s in (self.samples[i] for row in rows for i in row)}
        batch["image_files"] = [self.image_root / p for sid in batch["ids"] for p in by_id[sid].images]
        return batch

    def contrastive_batch(self, indices: list[int]) -> dict:
        samples = [self.samples[i] for i in indices]
        ids = [self.tokenizer.encode(caption_of(s))[0] or [self.pad_id] for s in samples]
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.bool)
        for i, row in enumerate(ids):
            input_ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), True
        pixels = self.dataset.preprocessor([self.image_root / s.images[0] for s in samples])
        return {"input_ids": input_ids, "text_mask": mask, "images": pixels, "num_samples": len(samples),
                "real_tokens": int(mask.sum()), "supervised_tokens": len(samples)}


def eval_inputs(recipe: Recipe, run_dir: Path, model, split: str = "validation") -> dict:
    """Keyword arguments of fastvlm.train.evaluation.evaluate for a run's split."""
    data = prepare_data(recipe, Path(run_dir))
    samples = {"validation": data.val, "train": data.train}.get(split)
    if samples is None:
        raise ValueError(f"split: expected 'validation' or 'train', got {split!r}")
    if recipe.data.eval_samples:
        samples = samples[:recipe.data.eval_samples]
    from fastvlm.train.evaluation import read_question_types

    try:  # records may carry their question types (the synthetic dataset's do)
        types = read_question_types(data.files[split])
    except (ValueError, AttributeError):  # JSON lines, or records of another shape
        types = {}
    # The evaluation scores every question turn of the evaluated samples, so chance is the
    # majority answer's share over exactly those questions (meta.json's split-wide "types"
    # level counts only last turns, of the whole validation split).
    chance = majority_chance(samples, types) if data.chance is not None and types else data.chance
    return dict(samples=samples, image_root=data.image_root, preprocessor=preprocessor_for(model),
                template=recipe.data.template, image_tokens=model.image_tokens, chance=chance,
                question_types=types or None)


def majority_chance(samples: list, types: dict) -> dict:
    """Question type -> share of its most frequent reference answer, over every question
    turn of `samples` (`types`: sample id -> per-turn question types): the accuracy of a
    model that ignores the image and always gives a type's most common answer."""
    from collections import Counter

    from fastvlm.train.evaluation import normalize_answer

    counts: dict[str, Counter] = {}
    for sample in samples:
        answers = [t["value"] for t in sample.conversations if t["from"] == "gpt"]
        for qtype, answer in zip(types[sample.id], answers, strict=True):
            counts.setdefault(qtype, Counter())[normalize_answer(answer)] += 1
    return {qtype: max(c.values()) / sum(c.values()) for qtype, c in sorted(counts.items())}
