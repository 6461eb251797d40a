"""Packing plans and packed/padded collation: invariants on random datasets."""
import numpy as np
import pytest
import torch

from fastvlm.data.collate import PackedCollator, PaddedCollator, model_inputs
from fastvlm.data.packing import pack, row_fill
from fastvlm.data.sampler import PackedBatchSampler
from fastvlm.models.llm import shift_labels
from fastvlm.ops import KINDS, AttentionLayout

IMAGE_ID = 60  # the image placeholder id of the stand-in items
IMAGE_TOKENS = 3


def random_item(rng, index: int, max_text: int = 30) -> dict:
    """A stand-in for a VLMDataset item: text runs around 0-2 images (each a run of
    IMAGE_TOKENS image tokens, sometimes two side by side), answers supervised,
    each image's pixels filled with a value unique to (sample, image)."""
    n_images = int(rng.integers(0, 3))
    ids, spans = [1], []  # BOS
    for k in range(n_images):
        ids += rng.integers(2, 50, size=int(rng.integers(0, 4))).tolist()
        spans.append((len(ids), IMAGE_TOKENS))
        ids += [IMAGE_ID] * IMAGE_TOKENS
    prompt = len(ids) + int(rng.integers(1, max_text))
    ids += rng.integers(2, 50, size=prompt - len(ids)).tolist()
    answer = rng.integers(2, 50, size=int(rng.integers(1, max_text))).tolist()
    ids += answer
    labels = [-100] * prompt + answer
    pixels = torch.stack([torch.full((3, 4, 4), float(index * 10 + k)) for k in range(n_images)]) \
        if n_images else None
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pixels,
            "image_spans": spans, "id": f"s{index}", "prefix_len": prompt, "index": index}


def random_items(rng, count: int, max_text: int = 30) -> list[dict]:
    return [random_item(rng, i, max_text) for i in range(count)]


@pytest.mark.parametrize("strategy", ["bfd", "greedy"])
def test_pack_every_sample_once_within_budget(strategy, seed):
    rng = np.random.default_rng(seed)
    budget = int(rng.integers(16, 200))
    lengths = rng.integers(1, int(budget * 1.3), size=int(rng.integers(1, 400))).tolist()
    rows = pack(lengths, budget, strategy, truncation="turn")
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths))) and rows.dropped == []
    assert all(sum(min(lengths[i], budget) for i in row) <= budget for row in rows)
    dropping = pack(lengths, budget, strategy, truncation="drop")
    assert dropping.dropped == [i for i, n in enumerate(lengths) if n > budget]
    assert sorted(i for row in dropping for i in row) == [i for i, n in enumerate(lengths) if n <= budget]
    assert all(sum(lengths[i] for i in row) <= budget for row in dropping)


def test_bfd_rows_cannot_be_merged(seed):
    """Best-fit decreasing opens a row only when no row has room for the (longest
    remaining) sample, so any two of its rows together overflow the budget."""
    rng = np.random.default_rng(seed)
    budget = int(rng.integers(20, 300))
    lengths = rng.integers(1, budget + 1, size=300).tolist()
    rows = pack(lengths, budget, "bfd")
    fills = sorted(sum(lengths[i] for i in row) for row in rows)
    assert len(fills) < 2 or fills[0] + fills[1] > budget
    assert len(rows) >= -(-sum(lengths) // budget)  # never below the volume bound (sanity of the sums)
    assert row_fill(rows, lengths, budget) == pytest.approx(sum(lengths) / (len(rows) * budget))
    greedy = pack(lengths, budget, "greedy")
    assert [i for row in greedy for i in row] == list(range(len(lengths)))  # greedy keeps the order


def test_pack_bad_input():
    with pytest.raises(ValueError, match="^budget"):
        pack([3], 0)
    with pytest.raises(ValueError, match="^lengths: expected positive"):
        pack([3, 0], 8)
    with pytest.raises(ValueError, match="^strategy"):
        pack([3], 8, "ffd")
    with pytest.raises(ValueError, match="^truncation"):
        pack([3], 8, truncation="cut")


def check_batch(batch: dict, items: list[dict], kind: str, width: int | None = None):
    """The invariants every collated batch must hold (packed or padded)."""
    by_id = {item["id"]: item for item in items}
    ids, labels, seg, img = batch["input_ids"], batch["labels"], batch["segment_ids"], batch["image_ids"]
    assert sorted(batch["ids"]) == sorted(by_id)
    if width is not None:
        assert ids.shape[1] == width
    images, order = batch["images"], 0
    for r in range(ids.shape[0]):
        live = int((seg[r] >= 0).sum())
        assert bool((seg[r, live:] == -1).all()) and bool((seg[r, :live] >= 0).all())  # padding at the tail only
        assert bool((seg[r, 1:live] - seg[r, :live - 1] >= 0).all()) and (live == 0 or seg[r, 0] == 0)
        assert bool((labels[r, live:] == -100).all())
    for s_row, item_id in zip(_segments(seg), batch["ids"]):
        r, start, end = s_row
        item = by_id[item_id]
        assert torch.equal(ids[r, start:end], item["input_ids"]) and torch.equal(labels[r, start:end], item["labels"])
        assert torch.equal(batch["position_ids"][r, start:end], torch.arange(end - start))
        for k, (s0, n) in enumerate(item["image_spans"]):  # images in placeholder order, one id per image
            assert bool((img[r, start + s0:start + s0 + n] == order).all())
            assert torch.equal(images[order], item["pixel_values"][k])
            order += 1
        if batch["prefix_mask"] is not None:
            assert int(batch["prefix_mask"][r, start:end].sum()) == item["prefix_len"]
            assert bool(batch["prefix_mask"][r, start:start + item["prefix_len"]].all())
    assert (images is None and order == 0) or images.shape[0] == order
    assert int((img >= 0).sum()) == sum(n for item in items for _, n in item["image_spans"])
    # every supervised (shifted) label is the next token of its own sample
    target = shift_labels(labels, seg)
    q, p = (target != -100).nonzero(as_tuple=True)
    assert torch.equal(target[q, p], ids[q, p + 1]) and torch.equal(seg[q, p], seg[q, p + 1])
    assert int((target != -100).sum()) == batch["supervised_tokens"]
    assert batch["real_tokens"] == int((seg >= 0).sum()) and batch["row_tokens"] == seg.numel()
    # segments never share an attention entry: the mask is block-diagonal by segment
    layout = AttentionLayout(seg, img, batch["prefix_mask"], kind)
    dense = layout.dense()
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    assert not bool((dense & ~same).any())
    diag = torch.diagonal(dense, dim1=1, dim2=2)
    assert torch.equal(diag, seg >= 0)  # every real token sees itself, padding sees nothing


def _segments(seg: torch.Tensor):
    """(row, start, end) of each segment, row by row (the order of batch["ids"])."""
    out = []
    for r in range(seg.shape[0]):
        row = seg[r].tolist()
        for s in range(max(row) + 1):
            where = [i for i, v in enumerate(row) if v == s]
            out.append((r, where[0], where[-1] + 1))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_packed_collation_invariants(kind, seed):
    rng = np.random.default_rng(seed)
    items = random_items(rng, int(rng.integers(5, 40)))
    budget = max(len(item["input_ids"]) for item in items) + int(rng.integers(0, 40))
    lengths = [len(item["input_ids"]) for item in items]
    sampler = PackedBatchSampler(lengths, budget, seed=seed, strategy=str(rng.choice(["bfd", "greedy"])))
    collate = PackedCollator(pad_id=0, budget=budget, kind=kind)
    seen = []
    for row in sampler:
        batch = collate([items[i] for i in row])
        assert batch["input_ids"].shape[0] == 1 and batch["overflow_rows"] == 0
        check_batch(batch, [items[i] for i in row], kind, width=budget)
        seen += row
    assert sorted(seen) == list(range(len(items)))
    assert set(model_inputs(batch)) == {"input_ids", "images", "labels", "segment_ids", "prefix_mask"}


def test_packed_collator_repacks_when_estimates_are_short(seed):
    """Planned over too-small estimates, a row's true tokens overflow: the collator
    spreads them over more rows of the budget instead of exceeding it or losing one."""
    rng = np.random.default_rng(seed)
    items = random_items(rng, 12)
    budget = max(len(item["input_ids"]) for item in items)
    batch = PackedCollator(0, budget)(items)
    total = sum(len(item["input_ids"]) for item in items)
    rows = batch["input_ids"].shape[0]
    assert rows >= max(2, -(-total // budget)) and batch["overflow_rows"] == rows - 1
    check_batch(batch, items, "causal", width=budget)
    long = dict(items[0], input_ids=torch.ones(budget + 1, dtype=torch.long),
                labels=torch.ones(budget + 1, dtype=torch.long), image_spans=[], pixel_values=None)
    with pytest.raises(ValueError, match="max_length"):
        PackedCollator(0, budget)([long])


@pytest.mark.parametrize("kind", ["causal", "prefix_lm"])
def test_padded_collation(kind, seed):
    rng = np.random.default_rng(seed)
    items = random_items(rng, int(rng.integers(1, 9)))
    batch = PaddedCollator(pad_id=7, kind=kind, pad_to_multiple_of=8)(items)
    longest = max(len(item["input_ids"]) for item in items)
    assert batch["input_ids"].shape == (len(items), -(-longest // 8) * 8)
    assert bool((batch["input_ids"][batch["segment_ids"] < 0] == 7).all())
    check_batch(batch, items, kind)


def test_collator_bad_input(seed):
    item = random_item(np.random.default_rng(seed), 0)
    with pytest.raises(ValueError, match="^kind"):
        PackedCollator(0, 64, kind="sliding")
    with pytest.raises(ValueError, match="^items: nothing"):
        PackedCollator(0, 64)([])
    bad = dict(item, image_spans=item["image_spans"] + [(0, IMAGE_TOKENS)])
    with pytest.raises(ValueError, match="image token runs"):
        PaddedCollator(0)([bad])
    with pytest.raises(ValueError, match="^pad_to_multiple_of"):
        PaddedCollator(0, pad_to_multiple_of=0)
