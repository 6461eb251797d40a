"""The training dataset: one sample = tokenized conversation + its decoded images.

``VLMDataset`` is lazy: a sample is tokenized (``encode_conversation``) and its
images decoded (PIL, in the DataLoader workers) only when it is fetched. A
sample that cannot be used — a bad image, or too long to keep even one turn
pair — comes back as ``None`` and is counted by reason in ``skipped``
(make_loader gathers the workers' counts); ``strict=True`` raises instead.
``lengths()`` gives the cheap length estimates the sampler plans with (calibrated
on a few hundred tokenized samples), cached next to the data file.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fastvlm.data.conversation import SampleTooLong, encode_conversation
from fastvlm.data.formats import estimate_length
from fastvlm.data.images import BadImageCounter, load_image_and_key
from fastvlm.data.lengths import cached_array, code_hash
from fastvlm.data.packing import TRUNCATIONS
from fastvlm.data.tokenizer import load_tokenizer
from fastvlm.models.preprocess import ImagePreprocessor

log = logging.getLogger(__name__)
CALIBRATION_SAMPLES = 256  # samples tokenized to calibrate the cheap length estimates
CALIBRATION = 0.9  # quantile of true / estimated text tokens the estimates are scaled by


def image_spans(input_ids: Sequence[int], image_token_id: int, image_tokens: int) -> list[tuple[int, int]]:
    """(start, length) of each image's run: every `image_tokens` consecutive image
    tokens are one image (so two images side by side stay two)."""
    spans, i, n = [], 0, len(input_ids)
    while i < n:
        if input_ids[i] == image_token_id:
            spans.append((i, image_tokens))
            i += image_tokens
        else:
            i += 1
    return spans


class VLMDataset(Dataset):
    def __init__(self, samples: Sequence, image_root, tokenizer, template, image_tokens: int,
                 preprocessor: ImagePreprocessor, *, strict: bool = False, max_length: int | None = None,
                 truncation: str = "turn", train_on_prompt: bool = False, last_turn_only: bool = False,
                 system: str | None = None, data_path=None, image_checks: dict | None = None):
        """samples: e.g. ``read_samples(path)``; its ``.path`` (or `data_path`) is the file
        the length cache is keyed by. max_length: longer samples are cut after the last
        whole turn pair that fits (``truncation="turn"``) or skipped (``"drop"``); both
        are counted under ``too_long`` when nothing is kept. image_checks: min_size,
        max_pixels, max_aspect for ``open_image``."""
        if not isinstance(image_tokens, int) or image_tokens < 1:
            raise ValueError(f"image_tokens: expected a positive int, got {image_tokens!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length: expected a positive int or None, got {max_length!r}")
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation: expected one of {TRUNCATIONS}, got {truncation!r}")
        if not isinstance(preprocessor, ImagePreprocessor):
            raise ValueError(f"preprocessor: expected an ImagePreprocessor, got {type(preprocessor).__name__}")
        self.samples, self.image_root = samples, Path(image_root)
        self.tokenizer = load_tokenizer(tokenizer)
        self.template, self.image_tokens, self.preprocessor = template, image_tokens, preprocessor
        self.strict, self.max_length, self.truncation = strict, max_length, truncation
        self.encode_options = {"train_on_prompt": train_on_prompt, "last_turn_only": last_turn_only,
                               "system": system}
        self.data_path = data_path if data_path is not None else getattr(samples, "path", None)
        self.image_checks = dict(image_checks or {})
        self.skipped = BadImageCounter()
        self.length_calibration: float | None = None  # set when lengths() estimates (not when read from cache)

    def __len__(self) -> int:
        return len(self.samples)

    def _skip(self, reason: str, where, message: str):
        if self.strict:
            raise ValueError(message)
        self.skipped.add(reason, where)

    def encode(self, index: int):
        """The sample's EncodedSample (truncated per max_length), or None if too long."""
        return self._encode(self.samples[index])

    def _encode(self, sample):
        cut = self.max_length if self.truncation == "turn" else None
        try:
            encoded = encode_conversation(sample.conversations, self.tokenizer, self.template, self.image_tokens,
                                          max_length=cut, **self.encode_options)
        except SampleTooLong as err:
            return self._skip("too_long", sample.id, f"sample {sample.id!r}: {err}")
        if self.max_length is not None and len(encoded) > self.max_length:
            return self._skip("too_long", sample.id, f"sample {sample.id!r}: {len(encoded)} tokens, more than "
                                                     f"max_length {self.max_length} (truncation='drop')")
        return encoded

    def __getitem__(self, index: int) -> dict | None:
        sample = self.samples[index]
        encoded = self._encode(sample)
        if encoded is None:
            return None
        pixels, keys, files = [], [], [self.image_root / rel for rel in sample.images[:encoded.num_images]]
        for path in files:  # images cut off with their turns are not decoded
            loaded = load_image_and_key(path, self.preprocessor, self.strict, counter=self.skipped,
                                        **self.image_checks)
            if loaded is None:
                return None
            pixels.append(loaded[0])
            keys.append(loaded[1])
        return {"input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
                "labels": torch.tensor(encoded.labels, dtype=torch.long),
                "pixel_values": torch.stack(pixels) if pixels else None,
                "image_spans": image_spans(encoded.input_ids, self.tokenizer.image_token_id, self.image_tokens),
                "image_files": files, "image_keys": keys, "id": sample.id, "prefix_len": encoded.prefix_len,
                "index": index}

    # ---- cheap per-sample metadata for the sampler ----------------------------------------
    def _estimates(self) -> np.ndarray:
        """[2, n]: estimated lengths and image counts, cached by data file hash (and
        everything else the numbers depend on: estimator, tokenizer, template)."""
        if self.data_path is None:
            if not hasattr(self, "_memo"):
                self._memo = self._estimate_all()
            return self._memo
        options = "|".join([f"image_tokens={self.image_tokens}", f"estimator={code_hash(estimate_length)}",
                            f"n={len(self)}", f"template={self.template!r}",
                            f"system={self.encode_options['system']!r}", f"tokenizer={self._tokenizer_hash()}",
                            f"calibration={CALIBRATION}"])
        return cached_array(self.data_path, options, self._estimate_all)

    def _tokenizer_hash(self) -> str:
        backend = getattr(self.tokenizer, "backend", None)
        text = backend.to_str() if backend is not None else repr(self.tokenizer)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _estimate_all(self) -> np.ndarray:
        """estimate_length per sample, its text part scaled by how this tokenizer and
        template really tokenize: the CALIBRATION quantile of true / estimated text
        tokens over a fixed random subset of samples (tokenized, images not decoded).
        A high quantile, because a row planned over short estimates overflows into
        a second, nearly empty row."""
        raw = np.asarray([estimate_length(s, self.image_tokens) for s in self.samples], dtype=np.int64)
        images = np.asarray([len(s.images) for s in self.samples], dtype=np.int64)
        if not len(raw):
            return np.zeros((2, 0), dtype=np.int64)
        image_part = images * self.image_tokens
        pick = np.random.default_rng(0).choice(len(raw), size=min(len(raw), CALIBRATION_SAMPLES), replace=False)
        ratios = []
        for i in pick.tolist():
            true = len(encode_conversation(self.samples[i].conversations, self.tokenizer, self.template,
                                           self.image_tokens, **self.encode_options))
            ratios.append((true - image_part[i]) / max(1, raw[i] - image_part[i]))
        self.length_calibration = float(np.quantile(ratios, CALIBRATION))
        text = np.ceil(np.maximum(1, raw - image_part) * self.length_calibration).astype(np.int64)
        return np.stack([image_part + np.maximum(1, text), images])

    def lengths(self) -> list[int]:
        """Estimated token count per sample (before truncation)."""
        return self._estimates()[0].tolist()

    def has_images(self) -> list[bool]:
        """Whether each sample has an image (for LLaVA's modality grouping)."""
        return (self._estimates()[1] > 0).tolist()


# ---- the loader -------------------------------------------------------------------------------
class _SkippingCollate:
    """Runs in the worker: drops skipped (None) items, collates the rest and hands the
    worker's new skip counts along with the batch."""

    def __init__(self, dataset, collator):
        self.dataset, self.collator = dataset, collator

    def __call__(self, items):
        kept = [item for item in items if item is not None]
        counter = getattr(self.dataset, "skipped", None)
        return {"batch": self.collator(kept) if kept else None,
                "skipped": counter.take_new() if counter is not None else BadImageCounter()}


class VLMLoader(DataLoader):
    """A DataLoader over a PackedBatchSampler (or a StepSampler of one: see
    fastvlm.data.steps; a "batch" is then one optimizer step) that

    - skips samples the dataset returned as None, and gathers the workers' skip
      counts in ``skipped`` (a BadImageCounter);
    - keeps the sampler's position at the batches *consumed*, not the ones workers
      prefetched, so ``sampler.state_dict()`` taken between steps resumes exactly;
    - sums per epoch, in ``epoch_stats[epoch]``: batches, samples, real / row /
      supervised tokens, packing efficiency (real / row tokens), skips, and the
      rows the collator added because true lengths overflowed the plan's estimates,
      and the samples the plan left out (longer than the budget, truncation="drop");
      an epoch with skips ends with the skip report logged as a warning.
    """

    def __init__(self, dataset, batch_sampler, collate_fn, **kwargs):
        super().__init__(dataset, batch_sampler=batch_sampler, collate_fn=_SkippingCollate(dataset, collate_fn),
                         **kwargs)
        self.skipped = BadImageCounter()
        self.epoch_stats: dict[int, dict] = {}

    def __iter__(self):
        sampler = self.batch_sampler
        tracked = hasattr(sampler, "_tracked_externally")  # a PackedBatchSampler or a StepSampler over one
        if tracked and sampler.position >= len(sampler):
            sampler._next_epoch()
        epoch = sampler.epoch if tracked else len(self.epoch_stats)
        stats = self.epoch_stats.setdefault(epoch, {"batches": 0, "samples": 0, "real_tokens": 0, "row_tokens": 0,
                                                    "supervised_tokens": 0, "skipped": 0, "overflow_rows": 0,
                                                    "packing_efficiency": 0.0})
        stats["dropped_by_plan"] = len(sampler.dropped()) if tracked else 0
        if tracked:
            sampler._tracked_externally = True
        try:
            for out in super().__iter__():
                if tracked:
                    sampler.position += 1
                self.skipped.merge(out["skipped"])
                stats["skipped"] += out["skipped"].total
                batch = out["batch"]
                if batch is None:
                    continue
                stats["batches"] += 1
                stats["samples"] += batch["num_samples"]
                for key in ("real_tokens", "row_tokens", "supervised_tokens"):
                    stats[key] += batch[key]
                stats["overflow_rows"] += batch.get("overflow_rows", 0)
                stats["packing_efficiency"] = stats["real_tokens"] / stats["row_tokens"]
                yield batch
            if tracked:
                sampler._next_epoch()
            if stats["skipped"]:
                log.warning("epoch %d: %s", epoch, self.skipped.report())
        finally:
            if tracked:
                sampler._tracked_externally = False

    def stats(self) -> dict:
        """Per-epoch sums and the skip report, for the metrics file."""
        return {"epochs": {e: dict(s) for e, s in self.epoch_stats.items()}, "skipped": self.skipped.as_dict()}


def worker_context():
    """Where DataLoader workers start: a forkserver (a clean, single-threaded process that
    imported torch and fastvlm.data once), not a fork of the training process. A fork
    copies a process whose other threads (an earlier loader's queue feeders, gloo's) may
    hold a lock at that instant; CPython 3.11's child then waits on it forever in
    PyOS_AfterFork_Child (seen here: a DDP rank's worker hung that way under load)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "fastvlm.data"])
    return context


def _end_with_client(client: int, init, worker_id: int) -> None:
    """worker_init_fn of a forkserver's worker: it is not its client's child, so torch's
    watchdog (which watches the parent, here the forkserver, which lives as long as its
    workers do) would never see the training process die, and a killed run would leave
    its workers behind. A daemon thread ends the worker once the client is gone."""
    def watch():
        while _alive(client):
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="fastvlm-client-watch").start()
    if init is not None:
        init(worker_id)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs: a zombie (exited, not yet reaped: e.g. a child whose
    parent waits for its output pipes, which these workers would hold open) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # no procfs: kill(pid, 0) is all there is
        return True
    return state not in ("Z", "X")


def make_loader(dataset, sampler, collator, num_workers: int = 0, **kwargs) -> VLMLoader:
    """A torch DataLoader (VLMLoader) yielding collated batches; images are decoded in
    the `num_workers` worker processes (started from ``worker_context()`` unless kwargs
    name another ``multiprocessing_context``). kwargs go to DataLoader (pin_memory, ...)."""
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers: expected an int >= 0, got {num_workers!r}")
    if num_workers and "multiprocessing_context" not in kwargs:
        kwargs["multiprocessing_context"] = worker_context()
        kwargs["worker_init_fn"] = functools.partial(_end_with_client, os.getpid(), kwargs.get("worker_init_fn"))
    return VLMLoader(dataset, sampler, collator, num_workers=num_workers, **kwargs)


def close_loader(loader: DataLoader) -> None:
    """End a loader's worker processes now (persistent workers otherwise live as long as
    the loader object). DataLoader offers no public call for it: its iterator's shutdown
    is what garbage collection would run."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None
