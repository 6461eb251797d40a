"""The data of a run and of each stage, on top of fastvlm.data.

``prepare_data`` gives the run its tokenizer and sample lists (generating the
synthetic VQA dataset into RUN/data, training the built-in BPE tokenizer into
RUN/tokenizer on first use). Before anything trains it refuses an empty file and
checks that every image a sample references exists (a stat, not a decode): samples
with a missing image are dropped and counted, and past ``data.max_skipped_fraction``
of a split the run stops with the list. ``StageBatches`` turns a stage's samples
into an endless stream of optimizer steps through fastvlm.data's one data path (its
dataset, collators, and DataLoader over fastvlm.data.steps: the per-rank split
inside the sampler, images decoded in ``data.num_workers`` worker processes), each
step a list of micro-batches — packed rows of ``packing_budget`` tokens
(``batch_size`` rows each) or padded batches — whose position is the data sampler's
resumable state. ``open_feature_cache`` / ``fill_feature_cache`` serve a frozen
tower's features. An epoch sees every sample
once: its last micro-batch and its last step may be short (a step's micro-batches
are weighted by their supervised tokens, so a short one is simply a smaller batch).

What each stage type reads:

- contrastive: (image, caption) pairs of the captions file (the train file without
  one): samples with exactly one image; the others are counted as filtered out;
- lm: the training conversations without their images, every token supervised;
- align: each captioned image sample in the ``plain`` template (LLaVA stage 1), one
  ``<image>`` per image; text-only samples are counted as filtered out;
- instruct: the training conversations in the recipe's template;
- preference: the pairs of ``data.preference`` (synthetic data: generated from the training
  split, the right answer against a plausible wrong one), one shared-prompt row item each.

Samples that cannot be used at run time (a corrupt or truncated image, too long to
keep one turn pair) are skipped by the dataset and counted per stage
(``StageBatches.skipped``); past ``data.max_skipped_fraction`` of the stage's samples
the stage stops (``TooManySkipped``) with the reasons and the first file names.
"""
from __future__ import annotations

import json
import math
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from fastvlm.data import load_tokenizer, read_samples, synthetic_vqa, train_bpe_tokenizer
from fastvlm.data.collate import PackedCollator, PaddedCollator
from fastvlm.data.dataset import VLMDataset, close_loader, make_loader
from fastvlm.data.hf_collate import HFPackedCollator, HFPaddedCollator
from fastvlm.data.images import BadImageCounter, load_image_and_key
from fastvlm.data.pairs import CaptionPairs, PairCollator, caption_of
from fastvlm.data.preference import PairPackedCollator, PairPaddedCollator, PreferenceDataset, read_preference
from fastvlm.data.sampler import PackedBatchSampler
from fastvlm.data.steps import StepCollator, StepItems, StepSampler
from fastvlm.integrations.hf_trainable import HFVLM
from fastvlm.models.feature_cache import FeatureCache
from fastvlm.models.preprocess import ImagePreprocessor
from fastvlm.train.hf_build import RunProcessor, hf_stage_dataset
from fastvlm.train.recipe import Recipe, Stage

IMAGE_TAG = "<image>"


class TooManySkipped(ValueError):
    """More samples could not be used than ``data.max_skipped_fraction`` allows."""


@dataclass
class RunData:
    tokenizer: object
    train: list
    val: list
    captions: list
    image_root: Path
    chance: dict | None  # question type -> chance accuracy (synthetic data), else None
    files: dict = field(default_factory=dict)  # split -> the file its samples came from
    # split -> samples dropped before training (their images are missing), by reason
    dropped: dict = field(default_factory=dict)
    max_skipped_fraction: float = 0.01
    evaluable: dict = field(default_factory=dict)  # (split, n) -> usable_for_evaluation's answer
    preference: list = field(default_factory=list)  # preference stages' pairs (read only when a stage is one)
    preference_val: list = field(default_factory=list)


def prepare_data(recipe: Recipe, run_dir: Path, write: bool = True, scratch: Path | None = None) -> RunData:
    """The run's samples and tokenizer. ``write=False`` (``--dry-run``, ranks other than 0)
    leaves `run_dir` untouched: synthetic data it does not hold is generated into `scratch`,
    a tokenizer not saved there is trained in memory."""
    d = recipe.data
    if d.kind == "synthetic_vqa":
        s = d.synthetic
        splits = synthetic_vqa.written_dataset(Path(run_dir) / "data", s.n_train, s.n_val, s.seed, s.image_size)
        if splits is None:  # not written yet, or with other settings: write it (never into run_dir unless `write`)
            if not write and scratch is None:
                raise ValueError(f"scratch: {run_dir}/data holds no dataset of these settings and "
                                 "prepare_data(write=False) needs a folder to generate one into")
            splits = synthetic_vqa.write_dataset((Path(run_dir) if write else Path(scratch)) / "data", s.n_train,
                                                 s.n_val, seed=s.seed, image_size=s.image_size)
        files = {"data.train": splits.train, "data.val": splits.val, "data.captions": splits.captions}
        meta = splits.meta
        chance = {t: v["chance"] for t, v in meta["splits"]["val"]["types"].items()}
        image_root = splits.image_folder
    else:
        image_root = _exists(d.image_root or Path(d.train).parent, "data.image_root")
        files = {"data.train": _exists(d.train, "data.train"), "data.val": _exists(d.val, "data.val")}
        if d.captions:
            files["data.captions"] = _exists(d.captions, "data.captions")
        chance = None
    samples, dropped = {}, {}
    for key, path in files.items():
        found = list(read_samples(path))
        if key == "data.val" and not recipe.run.evaluate:  # only `fastvlm eval` reads it (and checks it)
            samples[key], dropped[key] = found, BadImageCounter()
            continue
        _non_empty(found, key, path)
        samples[key], dropped[key] = drop_missing_images(found, image_root, key, path, d.max_skipped_fraction)
    if "data.captions" not in files:  # no captions file: the train file's samples
        samples["data.captions"], dropped["data.captions"] = samples["data.train"], dropped["data.train"]
    tokenizer = run_tokenizer(recipe, run_dir, samples["data.train"] + samples["data.captions"], files, write)
    pairs = preference_data(recipe, splits if d.kind == "synthetic_vqa" else None, image_root, dropped)
    return RunData(tokenizer, samples["data.train"], samples["data.val"], samples["data.captions"], **pairs,
                   image_root=Path(image_root), chance=chance,
                   files={"train": Path(files["data.train"]), "validation": Path(files["data.val"])},
                   dropped=dropped, max_skipped_fraction=d.max_skipped_fraction)


def preference_data(recipe: Recipe, splits, image_root, dropped: dict) -> dict:
    """{"preference": pairs, "preference_val": pairs} when a stage is a preference stage: the
    synthetic dataset's generated pairs (``{split}_preference.json`` beside its split, written
    once: the same dataset gives the same bytes) or the data.preference / data.preference_val
    files; pairs whose images are missing are dropped and counted in `dropped`."""
    if not any(s.type == "preference" for s in recipe.stages):
        return {}
    d = recipe.data
    if splits is not None:
        files = {}
        for key, split in (("data.preference", "train"), ("data.preference_val", "val")):
            path = (splits.train if split == "train" else splits.val).with_name(f"{split}_preference.json")
            if not path.is_file():
                path = synthetic_vqa.write_preference_pairs(splits, split, d.synthetic.seed)
            files[key] = path
    else:
        files = {"data.preference": _exists(d.preference, "data.preference")}
        if d.preference_val:
            files["data.preference_val"] = _exists(d.preference_val, "data.preference_val")
    out = {"preference": [], "preference_val": []}
    for key, path in files.items():
        found = list(read_preference(path))
        _non_empty(found, key, path)
        out[key.removeprefix("data.")], dropped[key] = drop_missing_images(found, image_root, key, path,
                                                                          d.max_skipped_fraction)
    return out


class MissingPath(ValueError):
    """A file or directory the recipe names does not exist."""


def _exists(path, key: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise MissingPath(f"{key}: {path} does not exist")
    return p


def _non_empty(samples: list, key: str, path) -> None:
    if not samples:
        raise ValueError(f"{key}: {path} holds no samples (an empty list); a run needs at least one")


def drop_missing_images(samples: list, image_root, key: str, path, max_fraction: float) -> tuple[list, BadImageCounter]:
    """`samples` without those referencing an image file that does not exist (one stat per
    distinct path), and their count; more than `max_fraction` of them is an error listing them."""
    root = Path(image_root)
    exists: dict[str, bool] = {}
    kept, missing = [], BadImageCounter()
    for sample in samples:
        for p in sample.images:
            if p not in exists:
                exists[p] = (root / p).is_file()
        gone = [p for p in sample.images if not exists[p]]
        if gone:
            missing.add("missing", root / gone[0])
        else:
            kept.append(sample)
    with_images = sum(1 for s in samples if s.images)
    every = (f" (every sample with an image: is data.image_root = {root} the folder the image paths are "
             "relative to?)") if missing.total and missing.total == with_images else ""
    check_skipped(missing, len(samples), max_fraction, f"{key} ({path}): images under {root}", every)
    return kept, missing


def check_skipped(counter: BadImageCounter, total: int, max_fraction: float, where: str, every: str = "") -> None:
    if total and counter.total > max_fraction * total:
        every = every or (" (every sample)" if counter.total >= total else "")
        raise TooManySkipped(f"{where}: {counter.total} of {total} samples{every} cannot be used, more than "
                             f"data.max_skipped_fraction = {max_fraction:g} allows; {counter.report()}")


def run_tokenizer(recipe: Recipe, run_dir: Path, samples: list, files: dict | None = None, write: bool = True):
    """RUN/tokenizer if the run has started (its model uses it, whatever the data files say
    now) or if saved from the same source; else the model's tokenizer, or a BPE trained on
    `samples`' text. Saved with what it came from, so a corrected recipe after a failed start
    (another model, vocabulary or data) never reuses a stale one."""
    saved = Path(run_dir) / "tokenizer"
    m = recipe.model
    if m.source == "hf":  # the model directory's own processor (never trained, never copied into the run)
        key = "model.tokenizer" if m.tokenizer else "model.path"
        return RunProcessor.of_recipe(recipe, _exists(m.tokenizer or m.path, key))
    if m.source == "tiny":
        data = {k: _file_key(v) for k, v in sorted((files or {}).items())}
        origin = {"source": "tiny", "vocab_size": m.tiny.vocab_size, "seed": recipe.run.seed, "data": data}
    else:
        key = "model.tokenizer" if m.tokenizer else "model.path" if m.source == "pretrained" else "model.llm"
        source = _exists(m.tokenizer or (m.path if m.source == "pretrained" else m.llm), key)
        origin = {"source": str(Path(source).resolve())}
    origin["image_token"] = m.image_token
    origin_file = saved / "fastvlm_origin.json"
    started = (Path(run_dir) / "recipe.json").is_file()  # its model was built on the saved tokenizer
    if (saved / "tokenizer.json").is_file() and (started or origin_file.is_file()
                                                  and json.loads(origin_file.read_text()) == origin):
        return load_tokenizer(saved, image_token=m.image_token)
    if m.source == "tiny":
        texts = [t["value"].replace(IMAGE_TAG, "") for s in samples for t in s.conversations]
        tok = train_bpe_tokenizer(texts, vocab_size=m.tiny.vocab_size, seed=recipe.run.seed,
                                  image_token=m.image_token)
    else:
        try:
            tok = load_tokenizer(source, image_token=m.image_token)
        except ValueError as err:  # say which recipe key named the directory
            raise ValueError(f"{key}: {err}" + ("" if m.tokenizer else "; or name the tokenizer's directory "
                                                "with model.tokenizer")) from None
    if write:
        tok.save(saved)
        origin_file.write_text(json.dumps(origin))
    return tok


def _file_key(path) -> list:
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def stage_samples(stage: Stage, data: RunData) -> tuple[list, str | None, BadImageCounter]:
    """(samples, template, filtered out) a stage trains on."""
    filtered = BadImageCounter()
    if stage.type in ("contrastive", "align"):
        pairs = []
        for s in data.captions:
            if not s.images:
                filtered.add("no_image", s.id)
            elif stage.type == "contrastive" and len(s.images) > 1:
                filtered.add("several_images", s.id)  # a contrastive pair is one image, one caption
            elif not any(t["from"] == "gpt" for t in s.conversations):
                filtered.add("no_caption", s.id)
            else:
                pairs.append(replace(s, conversations=[{"from": "human", "value": IMAGE_TAG * len(s.images)},
                                                       {"from": "gpt", "value": caption_of(s)}]))
        return pairs, "plain", filtered
    if stage.type == "preference":
        return data.preference, None, filtered
    if stage.type == "lm":
        return [replace(s, images=[], conversations=[{**t, "value": t["value"].replace(IMAGE_TAG, "").strip()}
                                                     for t in s.conversations]) for s in data.train], None, filtered
    return data.train, None, filtered


def preprocessor_for(model) -> ImagePreprocessor:
    v = model.config.vision
    return ImagePreprocessor.for_family(v.family, v.image_size)


def preference_dataset(pairs: list, stage: Stage, recipe: Recipe, data: RunData, model) -> PreferenceDataset:
    """`pairs` as a preference stage encodes them (its template, the pair within its budget)."""
    budget = stage.packing_budget
    return PreferenceDataset(pairs, data.image_root, data.tokenizer, recipe.data.template, model.image_tokens,
                             preprocessor_for(model), max_length=min(budget, recipe.data.max_length or budget))


class StageBatches:
    """One stage's data: its samples; the dataset that encodes them (tokens in the main
    process for the sampler's exact lengths, images decoded by the DataLoader's
    ``data.num_workers`` worker processes); ``sampler``, the plan of packed rows or padded
    batches; and ``loader``, fastvlm.data's DataLoader over this rank's share of each
    optimizer step (fastvlm.data.steps). ``steps()`` yields those shares, endlessly.
    ``state_dict`` is the sampler's (taken between steps) with the job's record of skipped
    samples: ``skipped`` counts the stage's samples that could not be used (each once,
    whichever rank or epoch met it), ``filtered`` those its type does not train on."""

    def __init__(self, stage: Stage, recipe: Recipe, data: RunData, model, seed: int, *, rank: int = 0,
                 world: int = 1, gather=None, num_workers: int | None = None):
        self.stage, self.tokenizer = stage, data.tokenizer
        samples, template, self.filtered = stage_samples(stage, data)
        if not samples:
            raise ValueError(f"stages.{stage.name}: no sample to train on ({self.filtered.report()}); a "
                             f"{stage.type} stage needs " + ("captioned images" if stage.type in (
                                 "contrastive", "align") else "preference pairs" if stage.type == "preference"
                                 else "conversations"))
        self.samples, self.image_root = samples, data.image_root
        self.pad_id = data.tokenizer.pad_token_id if data.tokenizer.pad_token_id is not None else 0
        budget, kind = stage.packing_budget, stage.attention_kind or recipe.model.attention_kind
        self.packed = stage.packing and stage.type != "contrastive"
        self.hf = isinstance(model, HFVLM)  # its own processor's items and collators
        if self.hf:
            self.dataset = hf_stage_dataset(samples, data.image_root, data.tokenizer, recipe, stage)
            self.collator = HFPackedCollator(self.pad_id, budget) if self.packed else HFPaddedCollator(self.pad_id)
        elif stage.type == "contrastive":
            self.dataset = CaptionPairs(samples, data.image_root, data.tokenizer, preprocessor_for(model))
            self.collator = PairCollator(self.pad_id)
        elif stage.type == "preference":
            self.dataset = preference_dataset(samples, stage, recipe, data, model)
            self.collator = (PairPackedCollator(self.pad_id, budget, kind) if self.packed
                             else PairPaddedCollator(self.pad_id, kind))
        else:
            self.dataset = VLMDataset(samples, data.image_root, data.tokenizer, template or recipe.data.template,
                                      model.image_tokens, preprocessor_for(model),
                                      max_length=min(budget, recipe.data.max_length or budget),
                                      train_on_prompt=stage.type == "lm" or stage.train_on_prompt)
            self.collator = (PackedCollator(self.pad_id, budget, kind) if self.packed
                             else PaddedCollator(self.pad_id, kind))
        self.max_skipped_fraction = recipe.data.max_skipped_fraction
        self.skipped = BadImageCounter()
        self._skipped_ids: set[int] = set()
        self._new_skips: list[tuple[int, str, str]] = []  # noted in this process, for the next step's gather
        lengths = self.lengths()  # every rank computes them all: its skips need no gathering
        self._record_skips([self._new_skips])
        self.sampler = PackedBatchSampler(lengths, budget, seed, shuffle=True,
                                          batch_size=None if self.packed else stage.batch_size)
        self.rows_per_batch = stage.batch_size if self.packed else 1
        self.num_workers = recipe.data.num_workers if num_workers is None else num_workers
        self.seed, self._filler = seed, None
        self.shard(rank, world, gather)

    def shard(self, rank: int, world: int, gather=None) -> None:
        """Serve rank `rank` of `world` (see fastvlm.data.steps: the global stream of steps
        is the same for any world size, hence so is the sampler's position, and any world
        size resumes it; grad_accum is a multiple of `world`). `gather` (an object -> every
        rank's objects, e.g. Distributed.all_gather) shares each step's skipped samples, so
        every rank keeps the job's record and stops alike."""
        self.rank, self.world, self._gather = rank, world, gather or _alone
        self.step_sampler = StepSampler(self.sampler, self.rows_per_batch, self.stage.grad_accum, rank, world)
        # The loader's own generator: the seed a DataLoader draws for its workers on each
        # iteration would otherwise come from the global RNG (dropout's), and a resumed run
        # (which starts one more iteration) would see other random numbers.
        # Workers persist across epochs (started once per stage; close() ends them).
        self.loader = make_loader(StepItems(self.dataset), self.step_sampler, StepCollator(self.collator),
                                  self.num_workers, generator=torch.Generator().manual_seed(self.seed),
                                  persistent_workers=self.num_workers > 0)
        # A run that stops early (Ctrl-C, an error) ends the workers too, at the latest at exit.
        weakref.finalize(self, close_loader, self.loader)

    def close(self) -> None:
        """End the DataLoader's worker processes (at the stage's end)."""
        close_loader(self.loader)

    def lengths(self) -> list[int]:
        """Exact token counts (the tokenizer is fast; exact lengths pack without overflow).
        A sample too long to keep is planned as a whole row, then skipped (and counted).
        Contrastive pairs and a Hugging Face processor's samples: the dataset's estimates
        (a row they overflow is re-packed by the collator)."""
        if self.stage.type == "contrastive" or self.hf:
            return self.dataset.lengths()
        out = []
        for i in range(len(self.samples)):
            encoded = self.dataset.encode(i)
            if encoded is None:
                self._note_skip(i)
            out.append(len(encoded) if encoded is not None else self.stage.packing_budget)
        return out

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.sampler) / (self.rows_per_batch * self.stage.grad_accum))

    def total_steps(self) -> int:
        """The stage's optimizer steps: max_steps, else its epochs over the data, each epoch's
        own plan counted (packed in windows, epochs may differ by a row); the last step of an
        epoch may be short, a fractional epoch ends at a whole step."""
        if self.stage.max_steps:
            return self.stage.max_steps
        per_step = self.rows_per_batch * self.stage.grad_accum
        whole, part = divmod(self.stage.epochs, 1)
        steps = sum(math.ceil(len(self.sampler.plan(e)) / per_step) for e in range(int(whole)))
        if part:
            steps += math.ceil(part * math.ceil(len(self.sampler.plan(int(whole))) / per_step))
        return max(1, steps)

    def state_dict(self) -> dict:
        """The sampler's position, and the samples skipped so far (a resumed stage counts on)."""
        return {**self.sampler.state_dict(), "skipped": self.skipped.as_dict(),
                "skipped_ids": sorted(self._skipped_ids)}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        skipped, ids = state.pop("skipped", None), state.pop("skipped_ids", [])
        self.sampler.load_state_dict(state)
        if skipped is not None:
            self.skipped = BadImageCounter.from_dict(skipped)
            self._skipped_ids = set(ids)

    def steps(self):
        """Endless: per optimizer step, this rank's micro-batches (collated batch dicts), an
        empty slot filled with a copy that weighs nothing (see filler)."""
        while True:
            for step in self.loader:  # one epoch
                self._record_skips(self._gather(step["skipped"] + self._new_skips))
                yield [batch if batch is not None else self.filler() for batch in step["micro"]]

    def __iter__(self):
        """Endless micro-batches (one process: every micro-batch of every step, in order)."""
        for step in self.steps():
            yield from step

    def filler(self) -> dict:
        """A micro-batch that costs its forward and backward but weighs nothing: the first
        usable sample, its supervised tokens, samples and tokens counted as zero."""
        if self._filler is None:
            for i in range(len(self.samples)):
                item = self.dataset[i]
                if item is None:
                    self._note_skip(i)
                    continue
                collate = getattr(self.collator, "collate_planned", None)
                batch = collate([[item]]) if collate is not None else self.collator([item])
                self._filler = {**batch, "supervised_tokens": 0, "real_tokens": 0, "num_samples": 0}
                break
        return self._filler

    def _note_skip(self, index: int) -> None:
        """Note a sample this process found unusable, with the dataset's own record of why."""
        new = self.dataset.skipped.take_new()
        reason = next(iter(new.counts), "unusable")
        where = (new.examples.get(reason) or [self.samples[index].id])[0]
        self._new_skips.append((index, reason, str(where)))

    def _record_skips(self, per_rank: list) -> None:
        """Add every rank's newly noted samples to the job's record (each sample once), then
        stop (TooManySkipped, on every rank alike) past the stage's bound."""
        for noted in per_rank:
            for index, reason, where in noted:
                if index not in self._skipped_ids:
                    self._skipped_ids.add(index)
                    self.skipped.add(reason, where)
        self._new_skips = []
        check_skipped(self.skipped, len(self.samples), self.max_skipped_fraction, f"stages.{self.stage.name}")


def _alone(obj) -> list:
    """One process's gather: its own object."""
    return [obj]


def open_feature_cache(model, run_dir: Path, dist) -> FeatureCache:
    """One cache per run: a later stage with the same frozen tower reads the earlier one's
    features (the cache's fingerprint covers the weights; other weights reset it). Ranks
    share the directory; rank 0 opens (or resets) it first."""
    def open_cache():
        return FeatureCache(Path(run_dir) / "feature_cache", model.vision_tower, model.feature_layers,
                            on_stale="reset")

    cache = open_cache() if dist.is_main else None
    dist.barrier()
    return cache or open_cache()


def fill_feature_cache(cache: FeatureCache, batches: StageBatches, dist, chunk: int = 16) -> None:
    """Encode every image of the stage once across the job (so the ranks' steps only read):
    rank r takes every W-th file, writes its shards to the shared cache directory; then
    every rank indexes them all. Bad files are left to the dataset, which skips their samples."""
    files = sorted({batches.image_root / p for s in batches.samples for p in s.images})[dist.rank::dist.world]
    for i in range(0, len(files), chunk):
        loaded = [load_image_and_key(p, batches.dataset.preprocessor) for p in files[i:i + chunk]]
        pixels = {key: x for x, key in filter(None, loaded) if key not in cache}
        if pixels:
            with torch.no_grad():
                cache.features(list(pixels), lambda missing: torch.stack([pixels[k] for k in missing]))
    dist.barrier()
    cache.refresh()

