"""Packing samples into rows of a fixed token budget (a bin-packing plan over lengths).

``pack`` only plans: it groups sample indices into rows whose lengths sum to at
most ``budget``. The tokens themselves are laid out by ``PackedCollator``.

- ``bfd``: best-fit decreasing. Samples longest first; each goes into the open row
  with the least room that still fits it, else a new row. Within 11/9 OPT + 6/9
  rows of the optimum, and in practice within a row or two of it.
- ``greedy``: next-fit in the given order (the order is kept, so a shuffled input
  gives random rows): a sample that does not fit closes the row.

A sample longer than the budget is either kept as a row of its own, to be
truncated at a turn boundary by the dataset (``truncation="turn"``), or left out
of every row and reported in ``PackedRows.dropped`` (``truncation="drop"``).
"""
from __future__ import annotations

from collections.abc import Sequence

STRATEGIES = ("bfd", "greedy")
TRUNCATIONS = ("turn", "drop")


class PackedRows(list):
    """list[list[int]] of sample indices per row, plus what the plan left out."""

    def __init__(self, rows=(), dropped=()):
        super().__init__(rows)
        self.dropped: list[int] = list(dropped)


def check_budget(budget) -> int:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"budget: expected a positive int (tokens per row), got {budget!r}")
    return budget


def check_lengths(lengths) -> list[int]:
    lengths = [int(n) for n in lengths]
    bad = next((i for i, n in enumerate(lengths) if n <= 0), None)
    if bad is not None:
        raise ValueError(f"lengths: expected positive token counts, got {lengths[bad]} at index {bad}")
    return lengths


def pack(lengths: Sequence[int], budget: int, strategy: str = "bfd", truncation: str = "turn",
         order: Sequence[int] | None = None) -> PackedRows:
    """Rows of sample indices (into `lengths`), each summing to at most `budget`.

    order: the indices to pack, in this order (default all, 0..n-1); greedy keeps
    it, bfd uses it to break ties between equal lengths.
    """
    budget = check_budget(budget)
    lengths = check_lengths(lengths)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation: expected one of {TRUNCATIONS}, got {truncation!r}")
    order = range(len(lengths)) if order is None else order
    dropped = [i for i in order if lengths[i] > budget] if truncation == "drop" else []
    skip = set(dropped)
    items = [(min(lengths[i], budget), i) for i in order if i not in skip]
    rows = _best_fit_decreasing(items, budget) if strategy == "bfd" else _next_fit(items, budget)
    return PackedRows(rows, dropped)


def _next_fit(items: list[tuple[int, int]], budget: int) -> list[list[int]]:
    rows, row, used = [], [], 0
    for length, index in items:
        if row and used + length > budget:
            rows.append(row)
            row, used = [], 0
        row.append(index)
        used += length
    if row:
        rows.append(row)
    return rows


def _best_fit_decreasing(items: list[tuple[int, int]], budget: int) -> list[list[int]]:
    """O(n log n + n * budget / 64): rows are kept in buckets by free room, and the
    set of non-empty buckets is one Python int used as a bitset, so "the smallest
    room >= length" is a shift and a lowest-set-bit, not a scan over rows."""
    items = sorted(items, key=lambda item: -item[0])  # stable: ties keep `order`
    rows: list[list[int]] = []
    by_room: list[list[int]] = [[] for _ in range(budget + 1)]  # free room -> rows with exactly that room
    occupied = 0  # bit r set <=> by_room[r] is not empty
    for length, index in items:
        fits = occupied >> length
        if fits:
            room = length + ((fits & -fits).bit_length() - 1)
            row = by_room[room].pop()
            if not by_room[room]:
                occupied &= ~(1 << room)
        else:
            room, row = budget, len(rows)
            rows.append([])
        rows[row].append(index)
        left = room - length
        if left:  # a full row takes no more samples
            if not by_room[left]:
                occupied |= 1 << left
            by_room[left].append(row)
    return rows


def row_fill(rows: Sequence[Sequence[int]], lengths: Sequence[int], budget: int) -> float:
    """Planned packing efficiency: real tokens / row tokens."""
    real = sum(min(int(lengths[i]), budget) for row in rows for i in row)
    return real / (len(rows) * budget) if rows else 0.0


def fit_planned_rows(rows: Sequence[Sequence], lengths: Sequence[Sequence[int]], budget: int) -> list[list]:
    """Planned rows of items (`lengths`: each item's true length), each kept as planned when
    it fits `budget`, else re-packed (best-fit decreasing) into as many rows as it needs.
    Every item must fit the budget on its own (the callers check)."""
    fitted = []
    for items, sizes in zip(rows, lengths):
        fitted += ([list(items)] if sum(sizes) <= budget
                   else [[items[i] for i in row] for row in pack(sizes, budget, "bfd")])
    return fitted
