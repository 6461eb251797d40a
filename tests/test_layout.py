"""AttentionLayout: hand-written masks, FlexAttention agreement, block-map exactness, errors."""
import random

import pytest
import torch

from fastvlm import _ext
from fastvlm.ops import KINDS, AttentionLayout
from fastvlm.ops.attention import tile_predicate
from tests.layouts import all_kinds, parse_mask, random_layout, tile_classes_from_dense

# ---- hand-written layouts -----------------------------------------------------------------
# LLaVA-style sample: t t [i i i] t t
LLAVA_SEG = [[0] * 7]
LLAVA_IMG = [[-1, -1, 0, 0, 0, -1, -1]]
LLAVA = {
    "causal": """
        x......
        xx.....
        xxx....
        xxxx...
        xxxxx..
        xxxxxx.
        xxxxxxx""",
    "image_bidirectional": """
        x......
        xx.....
        xxxxx..
        xxxxx..
        xxxxx..
        xxxxxx.
        xxxxxxx""",
    "mmca": """
        x......
        xx.....
        xxx....
        xx.x...
        xx..x..
        xxxxxx.
        xxxxxxx""",
    "prefix_lm": """
        xxxxx..
        xxxxx..
        xxxxx..
        xxxxx..
        xxxxx..
        xxxxxx.
        xxxxxxx""",
}

# Multi-image multi-turn: t [i i] t [i i] t, two images.
MULTI_IMG = [[-1, 0, 0, -1, 1, 1, -1]]
MULTI = {
    "image_bidirectional": """
        x......
        xxx....
        xxx....
        xxxx...
        xxxxxx.
        xxxxxx.
        xxxxxxx""",
    "mmca": """
        x......
        xx.....
        x.x....
        xxxx...
        x..xx..
        x..x.x.
        xxxxxxx""",
}
MULTI_SPLIT_TEXT = """
        x......
        x......
        x......
        x..x...
        x..x...
        x..x...
        x..x..x"""
MULTI_SPLIT_IMAGE = """
        .......
        .x.....
        ..x....
        .xx....
        ....x..
        .....x.
        .xx.xx."""

# Three packed samples with padding between and after: [0 0 0][1 1] pad [2 2 2] pad
PACKED_SEG = [[0, 0, 0, 1, 1, -1, 2, 2, 2, -1]]
PACKED_CAUSAL = """
        x.........
        xx........
        xxx.......
        ...x......
        ...xx.....
        ..........
        ......x...
        ......xx..
        ......xxx.
        .........."""


@pytest.mark.parametrize("kind", KINDS)
def test_llava_sample(kind):
    pre = torch.tensor([[True] * 5 + [False] * 2]) if kind == "prefix_lm" else None
    layout = AttentionLayout(torch.tensor(LLAVA_SEG), torch.tensor(LLAVA_IMG), pre, kind)
    assert torch.equal(layout.dense()[0], parse_mask(LLAVA[kind]))


@pytest.mark.parametrize("kind", ["image_bidirectional", "mmca"])
def test_multi_image_multi_turn(kind):
    layout = AttentionLayout(torch.zeros(1, 7, dtype=torch.int32), torch.tensor(MULTI_IMG), kind=kind)
    assert torch.equal(layout.dense()[0], parse_mask(MULTI[kind]))


def test_mmca_split_branches():
    layout = AttentionLayout(torch.zeros(1, 7, dtype=torch.int32), torch.tensor(MULTI_IMG), kind="mmca",
                             split_softmax=True)
    text, image = layout.dense_split()
    assert torch.equal(text[0], parse_mask(MULTI_SPLIT_TEXT))
    assert torch.equal(image[0], parse_mask(MULTI_SPLIT_IMAGE))
    assert torch.equal(text | image, layout.dense())


def test_packed_with_padding():
    layout = AttentionLayout(torch.tensor(PACKED_SEG))
    assert torch.equal(layout.dense()[0], parse_mask(PACKED_CAUSAL))
    assert layout.lo.tolist() == [[0, 0, 0, 3, 3, 0, 6, 6, 6, 0]]
    assert layout.hi.tolist() == [[0, 1, 2, 3, 4, -1, 6, 7, 8, -1]]


def test_constructors_agree():
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1, -1]])
    img = torch.tensor([[-1, 0, 0, -1, 0, 1, -1, -1, -1]])
    direct = AttentionLayout(seg, img, kind="mmca")
    cu = AttentionLayout.from_cu_seqlens(torch.tensor([0, 3, 7]), 9, image_ids=img[0], kind="mmca")
    lens = AttentionLayout.from_lengths([3, 4], 9, image_spans=[[(1, 2), (4, 1), (5, 1)]], kind="mmca")
    ids = torch.tensor([[5, 9, 9, 5, 9, 7, 5, 0, 0]])
    # from_input_ids: consecutive runs of the image token are one image each (numbered per row).
    from_ids = AttentionLayout.from_input_ids(ids, 9, segment_ids=seg, kind="mmca")
    assert from_ids.image_ids.tolist() == [[-1, 0, 0, -1, 1, -1, -1, -1, -1]]
    for other in (cu, lens):
        assert torch.equal(other.dense(), direct.dense())
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    am = AttentionLayout.from_input_ids(torch.tensor([[1, 9, 9, 2, 0]]), 9, attention_mask=mask)
    assert am.segment_ids.tolist() == [[0, 0, 0, 0, -1]]
    pl = AttentionLayout.from_lengths([[4, 3]], prefix_lengths=[[2, 0]], kind="prefix_lm")
    assert pl.prefix_mask.tolist() == [[True, True, False, False, False, False, False]]


# ---- agreement with FlexAttention's create_mask ----------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_dense_matches_flex_create_mask(kind, seed):
    from torch.nn.attention.flex_attention import create_mask

    rng = random.Random(seed)
    for _ in range(4):
        n = rng.randint(1, 150)
        layout = random_layout(rng, rng.randint(1, 3), n, kind)
        flex = create_mask(layout.flex_mask_mod(), layout.batch_size, None, n, n, device="cpu")
        assert torch.equal(flex[:, 0], layout.dense())


@pytest.mark.parametrize("kind,split", all_kinds())
def test_intervals_reproduce_dense(kind, split, seed):
    """The per-token intervals (what kernels evaluate) give exactly the definitional mask."""
    rng = random.Random(seed)
    for _ in range(5):
        n = rng.randint(1, 120)
        layout = random_layout(rng, 2, n, kind, split)
        idx = torch.arange(n)
        for b in range(layout.batch_size):
            assert torch.equal(tile_predicate(layout, b, idx, idx), layout.dense()[b])


# ---- block maps --------------------------------------------------------------------------------
BLOCKS = [(1, 1), (4, 4), (3, 7), (16, 16), (16, 32), (64, 16), (128, 128)]


def _classes_from_transposed(bm):
    b, tk = bm.q_num_blocks.shape
    out = torch.zeros(b, bm.num_q_blocks, tk, dtype=torch.uint8)
    for bi in range(b):
        for kb in range(tk):
            out[bi, bm.q_indices[bi, kb, :bm.q_num_blocks[bi, kb]].long(), kb] = 1
            out[bi, bm.full_q_indices[bi, kb, :bm.full_q_num_blocks[bi, kb]].long(), kb] = 2
    return out


def _check_lists_well_formed(bm):
    for num, idx in ((bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices),
                     (bm.q_num_blocks, bm.q_indices), (bm.full_q_num_blocks, bm.full_q_indices)):
        slot = torch.arange(idx.shape[-1])
        used = slot < num[..., None]
        assert torch.all(idx[~used] == 0)
        valid = torch.where(used, idx, -1)
        ascending = (valid[..., 1:] > valid[..., :-1]) | ~used[..., 1:]
        assert bool(ascending.all())


@pytest.mark.parametrize("kind", KINDS)
def test_block_map_reference_is_exact(kind, seed):
    rng = random.Random(seed)
    for _ in range(6):
        n = rng.randint(1, 200)
        layout = random_layout(rng, rng.randint(1, 3), n, kind)
        dense = layout.dense()
        for bq, bk in rng.sample(BLOCKS, 3):
            bm = layout.block_map(bq, bk, backend="reference")
            expected = tile_classes_from_dense(dense, bq, bk)
            assert torch.equal(bm.tile_classes(), expected), (n, bq, bk)
            assert torch.equal(_classes_from_transposed(bm), expected)
            _check_lists_well_formed(bm)
            assert bm.visited_tiles() == int((expected > 0).sum())


@pytest.mark.skipif(not _ext.available(), reason=f"fastvlm._C not built: {_ext.load_error}")
@pytest.mark.parametrize("kind", KINDS)
def test_block_map_cpp_matches_reference(kind, seed):
    rng = random.Random(seed)
    for _ in range(10):
        n = rng.randint(1, 600)
        layout = random_layout(rng, rng.randint(1, 3), n, kind)
        for bq, bk in BLOCKS:
            ref = layout.block_map(bq, bk, backend="reference")
            assert layout.block_map(bq, bk, backend="cpp").equal(ref), (n, bq, bk)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_block_map_cuda_matches_reference(kind, seed):
    rng = random.Random(seed)
    for _ in range(10):
        n = rng.randint(1, 5000)
        layout = random_layout(rng, rng.randint(1, 3), n, kind, device="cuda")
        for bq, bk in BLOCKS[1:]:
            cuda = layout.block_map(bq, bk, backend="cuda")
            assert cuda.kv_indices.is_cuda
            assert cuda.equal(layout.block_map(bq, bk, backend="reference")), (n, bq, bk)


def test_block_map_auto_uses_compiled_op_and_caches():
    layout = AttentionLayout(torch.tensor(PACKED_SEG))
    bm = layout.block_map(4)
    assert layout.block_map(4) is bm
    assert bm.equal(layout.block_map(4, 4, backend="reference"))


def test_block_map_backend_errors():
    layout = AttentionLayout(torch.tensor(PACKED_SEG))
    with pytest.raises(ValueError, match="backend"):
        layout.block_map(4, backend="magic")
    with pytest.raises(RuntimeError, match="cuda"):
        layout.block_map(4, backend="cuda")
    with pytest.raises(ValueError, match="block_q"):
        layout.block_map(0)


def test_metadata_is_linear_in_n():
    n = 4096
    layout = AttentionLayout.from_lengths([1000, 2000, 1096], image_spans=[[(10, 576)]], kind="mmca")
    assert layout.nbytes() == n * (4 + 4 + 1)
    bm = layout.block_map(128)
    assert bm.nbytes() == 4 * (4 * 32 + 4 * 32 * 32)


# ---- bad input -------------------------------------------------------------------------------
def _seg(n=6):
    return torch.zeros(1, n, dtype=torch.int32)


@pytest.mark.parametrize("make,arg", [
    (lambda: AttentionLayout(torch.zeros(1, 4)), "segment_ids"),                       # float ids
    (lambda: AttentionLayout(torch.zeros(4, dtype=torch.int32)), "segment_ids"),       # 1-D
    (lambda: AttentionLayout(torch.tensor([[0, -2, 0]])), "segment_ids"),              # below -1
    (lambda: AttentionLayout(torch.tensor([[0, 1, 0]])), "segment_ids"),               # not contiguous
    (lambda: AttentionLayout(_seg(), torch.zeros(1, 5, dtype=torch.int32)), "image_ids"),  # shape
    (lambda: AttentionLayout(_seg(), torch.full((1, 6), -3)), "image_ids"),           # below -1
    (lambda: AttentionLayout(_seg(), torch.zeros(1, 6, dtype=torch.float32)), "image_ids"),
    (lambda: AttentionLayout(torch.tensor([[0, 0, -1]]), torch.tensor([[-1, -1, 0]])), "image_ids"),  # image in padding
    (lambda: AttentionLayout(_seg(), torch.tensor([[0, 0, -1, 0, -1, -1]])), "image_ids"),  # one id, two runs
    (lambda: AttentionLayout(_seg(), kind="sliding"), "kind"),
    (lambda: AttentionLayout(_seg(), kind="causal", split_softmax=True), "split_softmax"),
    (lambda: AttentionLayout(_seg(), kind="prefix_lm"), "prefix_mask"),
    (lambda: AttentionLayout(_seg(), prefix_mask=torch.ones(1, 6, dtype=torch.bool)), "prefix_mask"),
    (lambda: AttentionLayout(_seg(), prefix_mask=torch.ones(1, 6), kind="prefix_lm"), "prefix_mask"),
    (lambda: AttentionLayout(_seg(), prefix_mask=torch.tensor([[1, 0, 1, 0, 0, 0]]).bool(),
                             kind="prefix_lm"), "prefix_mask"),
    (lambda: AttentionLayout.from_cu_seqlens(torch.tensor([0, 5, 3])), "cu_seqlens"),
    (lambda: AttentionLayout.from_cu_seqlens(torch.tensor([0, 5]), 3), "seq_len"),
    (lambda: AttentionLayout.from_lengths([3, -1]), "lengths"),
    (lambda: AttentionLayout.from_lengths([3], image_spans=[[(2, 4)]]), "image_spans"),
    (lambda: AttentionLayout.from_input_ids(torch.zeros(1, 3), 5), "input_ids"),
])
def test_bad_input_names_the_argument(make, arg):
    with pytest.raises(ValueError, match=f"^{arg}"):
        make()


@pytest.mark.parametrize("kind,split", all_kinds())
@pytest.mark.parametrize("window", [None, 5])
def test_unpadded_keeps_every_mask_and_position(kind, split, window, seed):
    """The live tokens of all rows as one row: each token allows exactly the keys it did (the
    split branches too), no token sees another row's, and RoPE positions are unchanged."""
    from fastvlm.models.llm import positions_of

    rng = random.Random(seed)
    base = random_layout(rng, 3, 57, kind, split)
    layout = AttentionLayout(base.segment_ids, base.image_ids, base.prefix_mask, kind, split_softmax=split,
                             window=window)
    flat, index = layout.unpadded()
    live = (layout.segment_ids >= 0).flatten()
    assert torch.equal(index, live.nonzero().squeeze(1)) and flat.shape == (1, int(live.sum()))
    row = index // layout.seq_len
    same_row = row[:, None] == row[None, :]
    masks = layout.dense_split() if split else (layout.dense(),)
    got = flat.dense_split() if split else (flat.dense(),)
    for want, mask in zip(masks, got):
        per_row = want[row[:, None], (index % layout.seq_len)[:, None], (index % layout.seq_len)[None, :]]
        assert torch.equal(mask[0], per_row & same_row)
    assert torch.equal(positions_of(flat)[0], positions_of(layout).flatten()[index])
