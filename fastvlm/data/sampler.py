"""Deterministic, resumable batch plans: packed rows or length-grouped padded batches.

Each epoch's plan is a pure function of (lengths, options, seed, epoch): the
epoch's RNG is seeded from (seed, epoch), so the sampler state is just the epoch,
the position in it and that RNG's state, and a run resumed from
``state_dict()`` sees exactly the batches an uninterrupted run would.

Two modes:
- packed (default): each batch is one row of at most ``budget`` estimated tokens,
  planned by ``pack`` over shuffled windows of ``window`` samples (so rows differ
  from epoch to epoch), rows then shuffled.
- padded (``group_by_length=True`` or a ``batch_size``): each batch is padded to its
  longest sample. With ``batch_size`` it holds that many samples, else as many as
  fit ``budget`` padded tokens. ``group_by_length`` is LLaVA's
  ``group_by_modality_length``: samples with and without images are batched
  apart, and within windows of ``window`` samples sorted by length, so a batch
  holds similar lengths; batches are then shuffled.

With DataLoader workers, which fetch batches ahead of the training loop, iterate
through ``make_loader``: it keeps ``position`` at the batches actually consumed
(a plain DataLoader would leave it at the ones prefetched).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np
from torch.utils.data import Sampler

from fastvlm.data.packing import TRUNCATIONS, check_budget, check_lengths, pack


class PackedBatchSampler(Sampler[list[int]]):
    def __init__(self, lengths: Sequence[int], budget: int, seed: int, shuffle: bool = True,
                 group_by_length: bool = False, drop_last: bool = False, *, strategy: str = "bfd",
                 batch_size: int | None = None, has_images: Sequence[bool] | None = None,
                 truncation: str = "turn", window: int = 16384):
        self.lengths = np.asarray(check_lengths(lengths), dtype=np.int64)
        if not len(self.lengths):  # an epoch of no batches would never end
            raise ValueError("lengths: no samples to plan batches over (an empty dataset)")
        self.budget = check_budget(budget)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size <= 0):
            raise ValueError(f"batch_size: expected a positive int or None, got {batch_size!r}")
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation: expected one of {TRUNCATIONS}, got {truncation!r}")
        if not isinstance(window, int) or window <= 0:
            raise ValueError(f"window: expected a positive int (samples per packing window), got {window!r}")
        self.mode = "padded" if group_by_length or batch_size is not None else "packed"
        if drop_last and batch_size is None:
            raise ValueError("drop_last: only meaningful for padded batches of a fixed batch_size (packed rows "
                             "and token-budget batches are never short of samples)")
        if has_images is not None and len(has_images) != len(self.lengths):
            raise ValueError(f"has_images: expected {len(self.lengths)} flags (one per length), got {len(has_images)}")
        self.seed, self.shuffle, self.group_by_length, self.drop_last = int(seed), shuffle, group_by_length, drop_last
        self.strategy, self.batch_size, self.truncation, self.window = strategy, batch_size, truncation, window
        self.has_images = None if has_images is None else np.asarray(has_images, dtype=bool)
        pack([1], 1, strategy)  # validates strategy with pack's own message
        self.epoch, self.position = 0, 0
        self._tracked_externally = False  # make_loader counts consumed batches itself (workers prefetch)
        self._plans: dict[int, tuple[list[list[int]], list[int]]] = {}
        self._rng_override: dict[int, dict] = {}

    # ---- the plan -------------------------------------------------------------------------
    def rng_state(self, epoch: int) -> dict:
        if epoch in self._rng_override:
            return self._rng_override[epoch]
        return np.random.default_rng(np.random.SeedSequence([self.seed, epoch])).bit_generator.state

    def plan(self, epoch: int | None = None) -> list[list[int]]:
        """The batches (lists of sample indices) of an epoch, in order."""
        return self._plan(self.epoch if epoch is None else epoch)[0]

    def dropped(self, epoch: int | None = None) -> list[int]:
        """Samples left out of the epoch's plan (longer than the budget with truncation="drop")."""
        return self._plan(self.epoch if epoch is None else epoch)[1]

    def _plan(self, epoch: int):
        if epoch not in self._plans:
            rng = np.random.default_rng()
            rng.bit_generator.state = self.rng_state(epoch)
            order = rng.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
            plan = self._packed(order, rng) if self.mode == "packed" else self._padded(order, rng)
            self._plans = {epoch: plan}  # only the current epoch is kept
        return self._plans[epoch]

    def _packed(self, order: np.ndarray, rng):
        rows, dropped = [], []
        lengths = self.lengths.tolist()
        for start in range(0, len(order), self.window):
            part = pack(lengths, self.budget, self.strategy, self.truncation, order[start:start + self.window].tolist())
            rows += part
            dropped += part.dropped
        if self.shuffle:
            rows = [rows[i] for i in rng.permutation(len(rows))]
        return rows, sorted(dropped)

    def _padded(self, order: np.ndarray, rng):
        lengths = self.lengths
        dropped = sorted(int(i) for i in order if lengths[i] > self.budget) if self.truncation == "drop" else []
        if dropped:
            order = order[~np.isin(order, dropped)]
        groups = [order]
        if self.group_by_length and self.has_images is not None:
            groups = [order[self.has_images[order]], order[~self.has_images[order]]]
        full, partial = [], []
        for group in groups:
            for batch in self._cut(group):
                (partial if self.batch_size and len(batch) < self.batch_size else full).append(batch)
        if self.shuffle:
            full = [full[i] for i in rng.permutation(len(full))]
        if partial:  # the modalities' leftovers share the last batches, as in LLaVA
            leftovers = np.concatenate([np.asarray(b) for b in partial])
            tail = self._cut(leftovers)
            full += [b for b in tail if not (self.drop_last and len(b) < self.batch_size)]
        return full, dropped

    def _cut(self, order: np.ndarray) -> list[list[int]]:
        """Consecutive batches of `order`, sorted by length (longest first) within windows if grouping."""
        batches = []
        step = self.window if self.batch_size is None else max(1, self.window // self.batch_size) * self.batch_size
        for start in range(0, len(order), step):
            part = order[start:start + step]
            if self.group_by_length:
                part = part[np.argsort(-self.lengths[part], kind="stable")]
            part = part.tolist()
            if self.batch_size is not None:
                batches += [part[i:i + self.batch_size] for i in range(0, len(part), self.batch_size)]
            else:
                batches += self._cut_by_tokens(part)
        return batches

    def _cut_by_tokens(self, part: list[int]) -> list[list[int]]:
        batches, batch, longest = [], [], 0
        for i in part:
            n = min(int(self.lengths[i]), self.budget)
            if batch and (len(batch) + 1) * max(longest, n) > self.budget:
                batches.append(batch)
                batch, longest = [], 0
            batch.append(i)
            longest = max(longest, n)
        return batches + ([batch] if batch else [])

    def packing_efficiency(self, epoch: int | None = None) -> float:
        """Planned real / row tokens of an epoch (estimated lengths; padded batches
        count batch size x longest sample)."""
        plan = self.plan(epoch)
        capped = np.minimum(self.lengths, self.budget)
        real = sum(int(capped[b].sum()) for b in plan)
        rows = sum(len(b) * int(capped[b].max()) for b in plan) if self.mode == "padded" else len(plan) * self.budget
        return real / rows if rows else 0.0

    # ---- iteration and state --------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.plan())

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (a no-op when already in it: a resumed
        position is kept)."""
        if epoch != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def _next_epoch(self) -> None:
        self.epoch, self.position = self.epoch + 1, 0

    def __iter__(self):
        if self.position >= len(self.plan()):
            self._next_epoch()
        plan = self.plan()
        for p in range(self.position, len(plan)):
            if not self._tracked_externally:
                self.position = p + 1
            yield list(plan[p])
        if not self._tracked_externally:
            self._next_epoch()

    def fingerprint(self) -> str:
        """What the plan depends on besides seed and epoch, hashed."""
        h = hashlib.sha256(self.lengths.tobytes())
        if self.has_images is not None:
            h.update(self.has_images.tobytes())
        h.update(json.dumps([self.budget, self.shuffle, self.group_by_length, self.drop_last, self.strategy,
                             self.batch_size, self.truncation, self.window, self.mode]).encode())
        return h.hexdigest()[:16]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "rng": self.rng_state(self.epoch), "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        missing = {"epoch", "position", "seed", "rng", "fingerprint"} - set(state)
        if missing:
            raise ValueError(f"state: missing keys {sorted(missing)}")
        if state["seed"] != self.seed:
            raise ValueError(f"state: saved with seed {state['seed']}, this sampler has seed {self.seed}")
        if state["fingerprint"] != self.fingerprint():
            raise ValueError("state: saved by a sampler over other lengths or options (fingerprint "
                             f"{state['fingerprint']} != {self.fingerprint()})")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._rng_override = {self.epoch: state["rng"]}
        self._plans = {}
