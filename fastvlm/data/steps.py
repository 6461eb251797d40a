"""Optimizer steps from one global stream of batches, split across the ranks of a job.

A ``PackedBatchSampler``'s plan (packed rows, or padded batches: one "row" each) is
cut into steps of ``rows_per_batch * grad_accum`` consecutive rows; a step's
micro-batches are ``rows_per_batch`` rows each, and micro-batch j goes to rank
j mod ``world``. Every rank gets the same number of micro-batch slots per step (the
ranks' collectives pair up): a slot a short step leaves empty, or whose samples were
all unusable, comes out as None, for the training loop to fill with a copy that
weighs nothing.

- ``StepSampler`` yields, per step, references to the samples of this rank's share;
- ``StepItems`` fetches them from the dataset (in the DataLoader workers), turning an
  unusable sample into a ``Skip`` that names it;
- ``StepCollator`` builds the step's micro-batches with the batch collator.

``make_loader(StepItems(dataset), StepSampler(...), StepCollator(...), num_workers)``
then yields one step at a time — ``{"micro": [batch or None per slot], "skipped":
[(index, reason, where)], counts}`` — and keeps the sampler at the steps consumed,
not those the workers prefetched, so ``state_dict()`` between steps resumes exactly.
The state is the plan sampler's, its position in plan rows: global, so a job of any
world size resumes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch.utils.data import Dataset, Sampler

from fastvlm.data.collate import PackedCollator
from fastvlm.data.hf_collate import HFPackedCollator
from fastvlm.data.sampler import PackedBatchSampler

COUNTS = ("num_samples", "real_tokens", "row_tokens", "supervised_tokens")


@dataclass(frozen=True)
class Ref:
    """One sample of a step: its micro-batch slot on this rank, its row in that micro-batch."""
    slot: int
    row: int
    index: int


@dataclass(frozen=True)
class StepHeader:
    """Opens every step's references: how many micro-batch slots this rank's share has
    (a rank may have none of a short step's micro-batches, and still needs the count)."""
    slots: int


@dataclass(frozen=True)
class Skip:
    """A sample the dataset could not use: its index, the reason, and a file or id."""
    index: int
    reason: str
    where: str


def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


class StepSampler(Sampler[list]):
    """This rank's share of each optimizer step of `plan` (see the module docstring)."""

    def __init__(self, plan: PackedBatchSampler, rows_per_batch: int, grad_accum: int, rank: int = 0,
                 world: int = 1):
        if not isinstance(plan, PackedBatchSampler):
            raise ValueError(f"plan: expected a PackedBatchSampler, got {type(plan).__name__}")
        self.plan_sampler = plan
        self.rows_per_batch = _positive(rows_per_batch, "rows_per_batch")
        self.grad_accum = _positive(grad_accum, "grad_accum")
        self.world = _positive(world, "world")
        if not isinstance(rank, int) or not 0 <= rank < world:
            raise ValueError(f"rank: expected an int in [0, {world}), got {rank!r}")
        self.rank = rank
        self.per_step = rows_per_batch * grad_accum
        self._tracked_externally = False  # make_loader counts consumed steps itself (workers prefetch)

    @property
    def position(self) -> int:
        """Steps of the current epoch consumed; kept in the plan sampler as its rows."""
        return math.ceil(self.plan_sampler.position / self.per_step)

    @position.setter
    def position(self, step: int) -> None:
        self.plan_sampler.position = min(step * self.per_step, len(self.plan_sampler.plan()))

    @property
    def epoch(self) -> int:
        return self.plan_sampler.epoch

    def steps_in(self, epoch: int | None = None) -> int:
        return math.ceil(len(self.plan_sampler.plan(epoch)) / self.per_step)

    def __len__(self) -> int:
        return self.steps_in()

    def dropped(self) -> list[int]:
        return self.plan_sampler.dropped()

    def set_epoch(self, epoch: int) -> None:
        self.plan_sampler.set_epoch(epoch)

    def _next_epoch(self) -> None:
        self.plan_sampler.set_epoch(self.epoch + 1)

    def step_refs(self, step: int) -> list:
        """The references of this rank's share of `step` of the current epoch."""
        rows = self.plan_sampler.plan()[step * self.per_step:(step + 1) * self.per_step]
        micro = [rows[i:i + self.rows_per_batch] for i in range(0, len(rows), self.rows_per_batch)]
        mine = micro[self.rank::self.world]
        return [StepHeader(math.ceil(len(micro) / self.world))] + [
            Ref(slot, r, int(index)) for slot, batch in enumerate(mine) for r, row in enumerate(batch)
            for index in row]

    def __iter__(self):
        if self.position >= len(self):
            self._next_epoch()
        for step in range(self.position, len(self)):
            if not self._tracked_externally:
                self.position = step + 1
            yield self.step_refs(step)
        if not self._tracked_externally:
            self._next_epoch()

    def state_dict(self) -> dict:
        """The plan sampler's state at the steps consumed (its position in plan rows)."""
        return self.plan_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.plan_sampler.load_state_dict(state)


class StepItems(Dataset):
    """`dataset` fetched by Ref: an item tagged with its slot and row, or a Skip."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def skipped(self):
        return self.dataset.skipped

    def __getitem__(self, ref):
        if isinstance(ref, StepHeader):
            return ref
        item = self.dataset[ref.index]
        if item is not None:
            return {**item, "slot": ref.slot, "row": ref.row}
        new = self.dataset.skipped.take_new()
        reason = next(iter(new.counts), "unusable")
        where = (new.examples.get(reason) or [self.dataset.samples[ref.index].id])[0]
        return Skip(ref.index, reason, str(where))


class StepCollator:
    """One step's fetched items -> {"micro": [batch or None per slot], "skipped": [...],
    the counts summed}. A PackedCollator (or HFPackedCollator) collates a slot's rows as planned (re-packing a
    row only if the true lengths overflow it); any other collator takes the slot's items."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, items: list) -> dict:
        header = items[0]
        if not isinstance(header, StepHeader):
            raise ValueError("items: a step's items start with its StepHeader (fetch them through StepItems "
                             "from a StepSampler)")
        slots: list[list[dict]] = [[] for _ in range(header.slots)]
        for item in items[1:]:
            if isinstance(item, dict):
                slots[item["slot"]].append(item)
        micro = [self._collate(slot) if slot else None for slot in slots]
        step = {"micro": micro, "skipped": [(s.index, s.reason, s.where) for s in items if isinstance(s, Skip)]}
        return {**step, **{key: sum(b[key] for b in micro if b is not None) for key in COUNTS}}

    def _collate(self, items: list[dict]) -> dict:
        if isinstance(self.collator, (PackedCollator, HFPackedCollator)):
            rows: dict[int, list[dict]] = {}
            for item in items:
                rows.setdefault(item["row"], []).append(item)
            return self.collator.collate_planned([rows[r] for r in sorted(rows)])
        return self.collator(items)
