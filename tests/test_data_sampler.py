"""PackedBatchSampler: every sample once per epoch, determinism, exact resume (also
through make_loader with worker processes), padded length-grouped batches."""
import numpy as np
import pytest
import torch

from fastvlm.data.collate import PackedCollator
from fastvlm.data.dataset import make_loader
from fastvlm.data.images import BadImageCounter
from fastvlm.data.sampler import PackedBatchSampler
from tests.test_data_packing import random_items


def _random_lengths(rng, n=None, budget=64):
    n = int(rng.integers(20, 300)) if n is None else n
    return rng.integers(1, budget + 1, size=n).tolist(), budget


MODES = {
    "packed_bfd": {},
    "packed_greedy": {"strategy": "greedy"},
    "padded_tokens": {"group_by_length": True},
    "padded_fixed": {"batch_size": 4},
    "padded_grouped": {"batch_size": 4, "group_by_length": True},
}


@pytest.mark.parametrize("mode", MODES)
def test_every_sample_once_per_epoch_and_deterministic(mode, seed):
    rng = np.random.default_rng(seed)
    lengths, budget = _random_lengths(rng)
    has_images = rng.random(len(lengths)) < 0.5
    window = int(rng.integers(2, 16)) * 8
    sampler = PackedBatchSampler(lengths, budget, seed, window=window, has_images=has_images, **MODES[mode])
    again = PackedBatchSampler(lengths, budget, seed, window=window, has_images=has_images, **MODES[mode])
    epochs = []
    for _ in range(3):
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        if sampler.mode == "packed":
            assert all(sum(lengths[i] for i in b) <= budget for b in batches)
        elif sampler.batch_size is None:
            assert all(len(b) * max(lengths[i] for i in b) <= budget for b in batches)
        else:
            assert all(len(b) == 4 for b in batches[:-1]) and 1 <= len(batches[-1]) <= 4
        epochs.append(batches)
    assert sampler.epoch == 3 and sampler.position == 0
    assert [list(again) for _ in range(3)] == epochs  # same seed, same batches
    assert epochs[0] != epochs[1]  # a new order every epoch
    other = PackedBatchSampler(lengths, budget, seed + 1, window=window, has_images=has_images, **MODES[mode])
    assert list(other) != epochs[0]


def test_packing_efficiency_is_the_plan_fill(seed):
    rng = np.random.default_rng(seed)
    lengths, budget = _random_lengths(rng, 200)
    sampler = PackedBatchSampler(lengths, budget, seed)
    plan = sampler.plan()
    assert sampler.packing_efficiency() == pytest.approx(sum(lengths) / (len(plan) * budget))
    padded = PackedBatchSampler(lengths, budget, seed, group_by_length=True)
    batches = padded.plan(2)
    want = sum(lengths) / sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded.packing_efficiency(2) == pytest.approx(want)


def test_length_grouping_batches_sorted_runs(seed):
    """With one window over all samples, length-grouped batches are consecutive runs of
    the samples sorted by length; modalities are batched apart except the leftovers."""
    rng = np.random.default_rng(seed)
    lengths, budget = _random_lengths(rng, 203)
    has_images = rng.random(len(lengths)) < 0.4
    sampler = PackedBatchSampler(lengths, budget, seed, group_by_length=True, batch_size=8, window=4096,
                                 has_images=has_images)
    batches = sampler.plan()
    left = int(has_images.sum()) % 8 + int((~has_images).sum()) % 8  # each modality's short last batch
    full, tail = batches[:len(batches) - -(-left // 8)], batches[len(batches) - -(-left // 8):]
    assert sum(len(b) for b in tail) == left and all(len(b) == 8 for b in full)
    assert all(len({bool(has_images[i]) for i in b}) == 1 for b in full)
    for flag in (True, False):
        runs = sorted(([lengths[i] for i in b] for b in full if bool(has_images[b[0]]) == flag), key=max)
        assert all(max(a) <= min(b) for a, b in zip(runs, runs[1:]))
    dropping = PackedBatchSampler(lengths, budget, seed, batch_size=8, drop_last=True, has_images=has_images,
                                  group_by_length=True)
    assert all(len(b) == 8 for b in dropping.plan())


@pytest.mark.parametrize("mode", ["packed_bfd", "padded_grouped"])
def test_resume_gives_the_same_batches(mode, seed):
    rng = np.random.default_rng(seed)
    lengths, budget = _random_lengths(rng)
    options = dict(MODES[mode], has_images=rng.random(len(lengths)) < 0.5)
    reference = PackedBatchSampler(lengths, budget, seed, **options)
    epoch_len = [len(reference.plan(e)) for e in range(3)]
    stream = [b for _ in range(3) for b in reference]  # three uninterrupted epochs
    # stop inside epoch 0, exactly at its end, and inside epoch 1
    for k in (int(rng.integers(1, epoch_len[0])), epoch_len[0], epoch_len[0] + int(rng.integers(1, epoch_len[1]))):
        first = PackedBatchSampler(lengths, budget, seed, **options)
        got, it = [], iter(first)
        while len(got) < k:
            try:
                got.append(next(it))
            except StopIteration:
                it = iter(first)
        state = first.state_dict()
        resumed = PackedBatchSampler(lengths, budget, seed, **options)
        resumed.load_state_dict(state)
        while len(got) < len(stream):
            got += list(resumed)
        assert got == stream, f"resumed at step {k} (epochs of {epoch_len} batches)"


def test_state_errors(seed):
    rng = np.random.default_rng(seed)
    lengths, budget = _random_lengths(rng, 50)
    state = PackedBatchSampler(lengths, budget, seed).state_dict()
    with pytest.raises(ValueError, match="^state: saved with seed"):
        PackedBatchSampler(lengths, budget, seed + 1).load_state_dict(state)
    with pytest.raises(ValueError, match="^state: saved by a sampler over other"):
        PackedBatchSampler(lengths[:-1], budget, seed).load_state_dict(state)
    with pytest.raises(ValueError, match="^state: missing keys"):
        PackedBatchSampler(lengths, budget, seed).load_state_dict({"epoch": 0})


def test_sampler_bad_input():
    with pytest.raises(ValueError, match="^budget"):
        PackedBatchSampler([3], -1, 0)
    with pytest.raises(ValueError, match="^seed"):
        PackedBatchSampler([3], 8, -1)
    with pytest.raises(ValueError, match="^drop_last"):
        PackedBatchSampler([3], 8, 0, drop_last=True)
    with pytest.raises(ValueError, match="^has_images"):
        PackedBatchSampler([3, 4], 8, 0, has_images=[True])
    with pytest.raises(ValueError, match="^strategy"):
        PackedBatchSampler([3], 8, 0, strategy="first_fit")
    with pytest.raises(ValueError, match="^batch_size"):
        PackedBatchSampler([3], 8, 0, batch_size=0)


class ItemsDataset(torch.utils.data.Dataset):
    """Stand-in dataset over prepared items; every `bad`-th sample is skipped as corrupt."""

    def __init__(self, items, bad: int):
        self.items, self.bad, self.skipped = items, bad, BadImageCounter()

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        if i % self.bad == 0:
            self.skipped.add("corrupt", f"img{i}.jpg")
            return None
        return self.items[i]


@pytest.mark.parametrize("num_workers,persistent", [(0, False), (2, False), (2, True)])
def test_loader_resume_with_workers(num_workers, persistent, seed):
    """Workers prefetch ahead of the trainer; the sampler state saved between steps still
    resumes exactly at the next unconsumed batch, across an epoch boundary."""
    rng = np.random.default_rng(seed)
    items = random_items(rng, 40)
    lengths = [len(item["input_ids"]) for item in items]
    budget = max(lengths) + 20
    bad = int(rng.integers(5, 9))

    def loader():
        dataset = ItemsDataset(items, bad)
        sampler = PackedBatchSampler(lengths, budget, seed)
        return sampler, make_loader(dataset, sampler, PackedCollator(0, budget), num_workers=num_workers,
                                    persistent_workers=persistent)

    sampler, full = loader()
    stream = [batch["ids"] for _ in range(2) for batch in full]
    skipped_per_epoch = len(range(0, 40, bad))
    assert full.skipped.counts["corrupt"] == 2 * skipped_per_epoch
    assert full.epoch_stats[0]["samples"] == 40 - skipped_per_epoch and full.epoch_stats[1]["skipped"] == \
        skipped_per_epoch
    assert 0 < full.epoch_stats[0]["packing_efficiency"] <= 1
    epoch_len = [full.epoch_stats[e]["batches"] for e in range(2)]  # batches yielded (not all-skipped rows)
    for k in (int(rng.integers(1, epoch_len[0])), epoch_len[0] + int(rng.integers(1, epoch_len[1]))):
        sampler, first = loader()
        got = []
        while len(got) < k:  # stop mid-epoch with workers still prefetching
            for batch in first:
                got.append(batch["ids"])
                if len(got) == k:
                    break
        state = sampler.state_dict()
        del first
        sampler, resumed = loader()
        sampler.load_state_dict(state)
        while len(got) < len(stream):
            got += [batch["ids"] for batch in resumed]
        assert got == stream, f"stopped after {k} batches (epochs of {epoch_len} rows)"
