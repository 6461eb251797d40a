"""Mask kinds are defined once (fastvlm.ops.mask_kinds): every derivation agrees with
an oracle written from their prose, and the compiled / Triton copies of the kind
codes agree with the definitions."""
import random
import re
from pathlib import Path

import pytest
import torch

from fastvlm import _ext
from fastvlm.ops import KINDS, AttentionLayout, mask_kinds
from tests.layouts import all_kinds, random_layout, tile_classes_from_dense

ROOT = Path(__file__).resolve().parents[1]


def oracle(layout: AttentionLayout) -> torch.Tensor:
    """bool [B, N, N] from the kinds' definitions in words, pair by pair over the raw
    metadata (segment / image / prefix ids), never from lo / hi."""
    seg, img, pre = layout.segment_ids, layout.image_ids, layout.prefix_mask
    pos = torch.arange(layout.seq_len)
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    causal = pos[None, None, :] <= pos[None, :, None]
    text_q, text_k = (img < 0)[:, :, None], (img < 0)[:, None, :]
    rule = {
        "causal": lambda: causal,
        "prefix_lm": lambda: causal | (pre[:, :, None] & pre[:, None, :]),
        "image_bidirectional": lambda: causal | ((img[:, :, None] == img[:, None, :]) & ~text_q),
        "mmca": lambda: causal & (text_q | text_k | (pos[:, None] == pos[None, :])[None]),
    }
    return same & rule[layout.kind]()


@pytest.mark.parametrize("kind,split", all_kinds())
def test_every_derivation_matches_the_definition(kind, split, seed):
    """Dense mask, tile predicate and FlexAttention's mask_mod (under its vmap) against the
    oracle; the split branches partition it by key type; the O(N) pair count matches."""

    rng = random.Random(seed)
    for _ in range(4):
        layout = random_layout(rng, rng.randint(1, 3), rng.randint(1, 130), kind, split)
        check_derivations(layout, oracle(layout))


def check_derivations(layout: AttentionLayout, want: torch.Tensor) -> None:
    """Every derivation of the layout's mask equals `want` [B, N, N] (see the test above)."""
    from torch.nn.attention.flex_attention import create_mask

    n = layout.seq_len
    assert torch.equal(layout.dense(), want)
    idx = torch.arange(n)
    for b in range(layout.batch_size):
        assert torch.equal(layout.tile_predicate(b, idx, idx), want[b])
    flex = create_mask(layout.flex_mask_mod(), layout.batch_size, None, n, n, device="cpu")
    assert torch.equal(flex[:, 0], want)
    text, image = layout.dense_split()
    assert torch.equal(text | image, want) and not bool((text & image).any())
    assert torch.equal(image, want & layout.is_image[:, None, :])
    assert layout.allowed_pairs() == int(want.sum())


@pytest.mark.parametrize("kind", [k for k in KINDS if mask_kinds.KIND_DEFS[k].isolates_images])
def test_isolating_kinds_keep_image_queries_causal(kind, seed):
    """The tile rules of the block maps rely on it (see mask_kinds' docstring)."""
    rng = random.Random(seed)
    layout = random_layout(rng, 3, rng.randint(20, 200), kind)
    pos = torch.arange(layout.seq_len).expand(layout.batch_size, -1)
    image = layout.is_image
    assert torch.equal(layout.hi[image].long(), pos[image])


def test_codes_are_distinct_and_dense():
    codes = sorted(k.code for k in mask_kinds.KIND_DEFS.values())
    assert codes == list(range(len(KINDS)))
    assert [mask_kinds.KIND_DEFS[k].code for k in KINDS] == codes


def _header_kinds() -> dict[str, int]:
    """name -> code, parsed from csrc/block_map/block_map.h (the CPU op and the CUDA kernel share it)."""
    text = (ROOT / "csrc" / "block_map" / "block_map.h").read_text()
    enum = dict(re.findall(r"\b(k\w+) = (\d+),", re.search(r"enum MaskKind[^{]*\{(.*?)\};", text, re.S).group(1)))
    table = re.search(r"kMaskKinds\[\] = \{(.*?)\};", text, re.S).group(1)
    return {name: int(enum[const]) for name, const in re.findall(r'\{"(\w+)", (k\w+)\}', table)}


def test_compiled_kind_codes_match_the_definitions():
    want = {k.name: k.code for k in mask_kinds.KIND_DEFS.values()}
    assert _header_kinds() == want
    text = (ROOT / "csrc" / "block_map" / "block_map.h").read_text()
    isolating = re.search(r"bool isolates_images\(int32_t kind\) \{ return (.*?); \}", text).group(1)
    assert isolating.count("kind ==") == sum(k.isolates_images for k in mask_kinds.KIND_DEFS.values())
    if not _ext.available():
        pytest.skip(f"fastvlm._C not built: {_ext.load_error}")
    compiled = {name: (code, isolates) for name, code, isolates in _ext._C.mask_kinds()}
    assert compiled == {k.name: (k.code, k.isolates_images) for k in mask_kinds.KIND_DEFS.values()}


def test_triton_constants_match_the_definitions():
    kernels = pytest.importorskip("fastvlm.kernels.attention")
    assert kernels.IMAGE_ISOLATING_KINDS == {k.code for k in mask_kinds.KIND_DEFS.values() if k.isolates_images}


def test_a_new_kind_is_one_definition(monkeypatch, seed):
    """A sliding window (each query sees itself and the 2 tokens before it, within its
    segment), defined as one interval rule, gets a dense mask, a FlexAttention mask_mod
    and an exact reference block map without touching anything else."""
    def window(t):
        return torch.maximum(t.segment_start, t.pos - 2), t.pos

    code = len(KINDS)
    kind = mask_kinds.MaskKind("window", code, window)
    monkeypatch.setitem(mask_kinds.KIND_DEFS, "window", kind)
    monkeypatch.setitem(mask_kinds._BY_CODE, code, kind)
    rng = random.Random(seed)
    for _ in range(4):
        n = rng.randint(1, 120)
        base = random_layout(rng, 2, n, "causal")
        layout = AttentionLayout(base.segment_ids, base.image_ids, kind="window")
        pos = torch.arange(n)
        want = oracle(base) & (pos[None, :] - pos[:, None] >= -2)[None]
        assert torch.equal(layout.dense(), want)
        for bq, bk in ((1, 1), (3, 7), (16, 16)):
            got = layout.block_map(bq, bk, backend="reference").tile_classes()
            assert torch.equal(got, tile_classes_from_dense(want, bq, bk)), (n, bq, bk)
