"""Shared-prompt layouts (``branch_ids``): a prompt and k answers in one row, each answer
seeing the prompt and itself, on top of every mask kind, through every backend.

The one property that matters downstream: a row [prompt | chosen | rejected] through the
model gives each answer's tokens the logits (and the gradients) of [prompt | answer] run
alone. The rest checks each derivation against the rule written from its prose."""
import random

import pytest
import torch

from fastvlm import _ext
from fastvlm.models.llm import LLM, LLMConfig
from fastvlm.ops import AttentionLayout, multimodal_attention
from fastvlm.ops.attention import attention_reference
from fastvlm.ops.layout import shared_prompt_mrope_positions
from tests.layouts import all_kinds, parse_mask, random_branched_layout, tile_classes_from_dense
from tests.test_attention_triton import INTERPRETER_BWD_CONFIG, check_against_reference, make_inputs, run_kernels
from tests.test_mask_kinds import check_derivations, oracle
from tests.utils import assert_close

KIND_IDS = ["causal", "prefix_lm", "image_bidirectional", "mmca", "mmca_split"]


def branch_oracle(layout: AttentionLayout) -> torch.Tensor:
    """The kind's pairs (test_mask_kinds' oracle, from raw metadata), keeping a key only if
    it is in the prompt (branch 0) or in the query's own branch."""
    br = layout.branch_ids
    return oracle(layout) & ((br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None]))


# ---- the mask ---------------------------------------------------------------------------------
def test_picture_of_the_docstring():
    """mask_kinds' picture: causal prompt ``t i i``, answers ``a a`` and ``b b``."""
    layout = AttentionLayout(torch.zeros(1, 7, dtype=torch.int32), torch.tensor([[-1, 0, 0, -1, -1, -1, -1]]),
                             branch_ids=torch.tensor([[0, 0, 0, 1, 1, 2, 2]]))
    want = parse_mask("""
        x......
        xx.....
        xxx....
        xxxx...
        xxxxx..
        xxx..x.
        xxx..xx""")
    assert torch.equal(layout.dense()[0], want)
    assert layout.positions().tolist() == [[0, 1, 2, 3, 4, 3, 4]]


@pytest.mark.parametrize("kind,split", all_kinds(), ids=KIND_IDS)
def test_every_derivation_matches_the_rule(kind, split, seed):
    """Dense mask, tile predicate, FlexAttention's mask_mod, the split branches and the O(N)
    pair count against the oracle, k up to 3 answers, packed with plain samples and padding;
    a row whose branch_ids are all 0 keeps today's mask exactly."""
    rng = random.Random(seed)
    for _ in range(4):
        layout = random_branched_layout(rng, rng.randint(1, 3), rng.randint(1, 100), kind, split)
        check_derivations(layout, branch_oracle(layout))
        plain = AttentionLayout(layout.segment_ids, layout.image_ids, layout.prefix_mask, kind, split_softmax=split,
                                branch_ids=torch.zeros_like(layout.segment_ids))
        assert plain.cut is None and torch.equal(plain.dense(), oracle(plain))


def test_positions_continue_from_the_prompt():
    """Every answer starts at the prompt's length; a packed plain sample restarts at 0."""
    seg = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, -1]])
    br = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 3, 0, 0, 0, 0]])
    layout = AttentionLayout(seg, branch_ids=br)
    assert layout.positions().tolist() == [[0, 1, 2, 3, 2, 3, 4, 2, 0, 1, 2, 11]]
    assert torch.equal(layout.with_window(2).positions(), layout.positions())  # a window cuts no position
    # M-RoPE: an image's 3-row positions in the prompt, the answers from its max + 1 on all rows
    prompt = torch.tensor([[0, 1, 1, 1, 1, 3], [0, 1, 1, 2, 2, 3], [0, 1, 2, 1, 2, 3]])
    got = shared_prompt_mrope_positions(prompt, [2, 3])
    assert got[:, :6].tolist() == prompt.tolist()
    assert got[:, 6:].tolist() == [[4, 5, 4, 5, 6]] * 3
    with pytest.raises(ValueError, match="prompt_positions"):
        shared_prompt_mrope_positions(prompt[:2], [1])


@pytest.mark.parametrize("kind,split", all_kinds(), ids=KIND_IDS)
def test_unpadded_keeps_mask_and_positions(kind, split, seed):
    """AttentionLayout.unpadded (what LLM.forward runs with labels) keeps each live token's
    keys and position, branches included."""
    rng = random.Random(seed)
    n = rng.randint(2, 60)
    layout = random_branched_layout(rng, 3, n, kind, split)
    packed, index = layout.unpadded()
    row, pos = index // n, index % n
    want = layout.dense()[row[:, None], pos[:, None], pos[None, :]] & (row[:, None] == row[None, :])
    assert torch.equal(packed.dense()[0], want)
    assert torch.equal(packed.positions()[0], layout.positions()[row, pos])


@pytest.mark.parametrize("branch,img,pre,arg", [
    ([[0, 1, 0, 1]], None, None, "branch_ids: each answer"),      # an answer in two runs
    ([[1, 1, 0, 0]], None, None, "branch_ids: the shared prompt"),  # prompt after an answer
    ([[0, 0, 1, 1]], [[-1, 0, 0, -1]], None, "image_ids: an image's run crosses"),
    ([[0, 0, 1, 1]], None, [[True, True, True, False]], "prefix_mask: the prefix crosses"),
    ([[0, -1, 1, 1]], None, None, "branch_ids: expected ids >= 0"),
    ([[0.0, 1.0, 1.0, 1.0]], None, None, "branch_ids: expected an integer tensor"),
])
def test_bad_branches_are_named(branch, img, pre, arg):
    kind = "prefix_lm" if pre is not None else "causal"
    tensor = torch.tensor(branch)
    with pytest.raises(ValueError, match=arg):
        AttentionLayout(torch.zeros(1, 4, dtype=torch.int32), None if img is None else torch.tensor(img),
                        None if pre is None else torch.tensor(pre), kind, branch_ids=tensor)


# ---- block maps ------------------------------------------------------------------------------
BACKENDS = ["reference"] + (["cpp"] if _ext.available() else [])


@pytest.mark.parametrize("kind,split", all_kinds(), ids=KIND_IDS)
def test_block_maps_are_exact(kind, split, seed):
    """Every tile empty / partial / full exactly as the dense mask says, torch and C++, odd
    lengths, square and rectangular tiles, with and without a window (the cut meets the window)."""
    rng = random.Random(seed)
    for _ in range(3):
        n = rng.randint(1, 90)
        layout = random_branched_layout(rng, rng.randint(1, 3), n, kind, split)
        for window in (None, rng.randint(1, 12)):
            windowed = layout.with_window(window)
            assert torch.equal(windowed.dense(), branch_oracle(layout) & _window(n, window))
            for bq, bk in ((16, 32), (8, 8), (4, 16), (32, 16)):
                want = tile_classes_from_dense(windowed.dense(), bq, bk)
                maps = [windowed.block_map(bq, bk, backend=be) for be in BACKENDS]
                assert torch.equal(maps[0].tile_classes(), want), (n, bq, bk, window)
                assert all(m.equal(maps[0]) for m in maps[1:])


def _window(n: int, window):
    pos = torch.arange(n)
    return torch.ones(n, n, dtype=torch.bool) if window is None else pos[None, :] > pos[:, None] - window


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind,split", all_kinds(), ids=KIND_IDS)
def test_block_map_cuda_is_exact(kind, split, seed):
    rng = random.Random(seed)
    for _ in range(4):
        n = rng.randint(1, 300)
        layout = random_branched_layout(rng, rng.randint(1, 3), n, kind, split, device="cuda")
        for bq, bk in ((16, 32), (64, 64), (128, 32)):
            assert layout.block_map(bq, bk, backend="cuda").equal(layout.block_map(bq, bk, backend="reference"))


# ---- attention, every backend ------------------------------------------------------------------
# (batch, q heads, kv heads, N, head_dim, dtype): GQA, N not a multiple of the tiles
SHAPES = [(2, 4, 2, 77, 32, torch.float32), (1, 4, 1, 53, 64, torch.float16)]


@pytest.mark.parametrize("deterministic", [False, True], ids=["fused_dq", "deterministic"])
@pytest.mark.parametrize("shape", SHAPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("kind,split", all_kinds(), ids=KIND_IDS)
def test_triton_kernels_match_reference(kind, split, shape, deterministic, seed):
    """Forward and both backward modes under the interpreter, at backward tiles other than
    the forward's, against float64 (bounds: plain PyTorch's error in the dtype)."""
    batch, hq, hkv, n, d, dtype = shape
    layout = random_branched_layout(random.Random(seed), batch, n, kind, split)
    q, k, v, dout = make_inputs(batch, hq, hkv, n, d, dtype)
    results = run_kernels(q, k, v, dout, layout, d ** -0.5, bwd_cfg=INTERPRETER_BWD_CONFIG,
                          deterministic=deterministic)
    check_against_reference(layout, q, k, v, dout, results)


@pytest.mark.parametrize("backend", ["sdpa_cpu", "reference", "triton"])
@pytest.mark.parametrize("kind,split", all_kinds(), ids=KIND_IDS)
def test_public_op_matches_reference(kind, split, backend, seed):
    """multimodal_attention's dispatch hands the cut to each backend: out and gradients.
    The reference also runs blockwise (its block map's tiles, the kernels' predicate)."""
    layout = random_branched_layout(random.Random(seed), 2, 61, kind, split)
    q, k, v, dout = make_inputs(2, 4, 2, 61, 32, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    if backend == "reference":
        out = attention_reference(*leaves, layout, impl="blockwise", block=16)
    else:
        out = multimodal_attention(*leaves, layout, backend=backend)
    out.backward(dout)
    check_against_reference(layout, q, k, v, dout, (out.detach(), *(t.grad for t in leaves)))


# ---- the model: [prompt | chosen | rejected] == [prompt | answer] alone ------------------------
def tiny_llm(kind: str = "causal") -> LLM:
    cfg = LLMConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    attention_kind=kind)
    return LLM(cfg).eval()


def _answer_row(prompt_len: int, lengths, kind: str, image: tuple[int, int] | None, device="cpu"):
    """Metadata of [prompt | answers...] (answers = `lengths`), one image span in the prompt,
    the prompt the prefix under prefix_lm: (layout, its spans per answer)."""
    n = prompt_len + sum(lengths)
    img = torch.full((1, n), -1, dtype=torch.int32)
    if image is not None:
        img[0, image[0]:image[0] + image[1]] = 0
    pre = torch.zeros(1, n, dtype=torch.bool)
    pre[0, :prompt_len] = True
    branch = torch.zeros(1, n, dtype=torch.int32)
    spans, start = [], prompt_len
    for j, ln in enumerate(lengths):
        branch[0, start:start + ln] = j + 1
        spans.append((start, start + ln))
        start += ln
    split = kind == "mmca_split"
    kind = "mmca" if split else kind
    layout = AttentionLayout(torch.zeros(1, n, dtype=torch.int32), img, pre if kind == "prefix_lm" else None,
                             kind, split_softmax=split, branch_ids=branch if len(lengths) > 1 else None)
    return layout, spans


def _run(model, embeds, layout, weights):
    """sum over answers of <weights_j, logits at answer j's tokens>, its logits and the
    gradients of the input embeddings and every parameter."""
    model.zero_grad()
    embeds = embeds.detach().requires_grad_()
    logits = model(inputs_embeds=embeds, layout=layout)
    loss = sum((w * logits[0, a:b]).sum() for (a, b), w in weights)
    loss.backward()
    return logits.detach(), embeds.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["causal", "prefix_lm", "image_bidirectional", "mmca", "mmca_split"])
@pytest.mark.parametrize("answers", [2, 3])
def test_branched_row_equals_each_answer_alone(kind, answers, seed):
    """Float64 tiny LLM: each answer's logits in the shared row equal those of [prompt |
    answer]; the gradient of a loss over all answers equals the sum of each alone's (the
    prompt, shared, adds both; an answer's embeddings get their own alone's). Bounds: the
    float32 run's error itself, not rescaled to float64: RMSNorm computes in fp32 whatever
    the dtype (as the HF models do), so its backward rounds each alone's share of a prompt
    token's gradient apart where the shared row rounds their sum, and two float64 paths
    that differ in the last bits may round a value apart in its forward too."""
    gen = torch.Generator().manual_seed(seed)
    prompt_len = 9
    lengths = [int(x) for x in torch.randint(1, 6, (answers,), generator=gen)]
    model = tiny_llm().double()
    hidden = model.config.hidden_size
    embeds = torch.randn(1, prompt_len + sum(lengths), hidden, generator=gen, dtype=torch.float64)
    layout, spans = _answer_row(prompt_len, lengths, kind, (2, 4))
    weights = [torch.randn(b - a, model.config.vocab_size, generator=gen, dtype=torch.float64) for a, b in spans]
    got_logits, got_embeds_grad, got_grads = _run(model, embeds, layout, list(zip(spans, weights)))

    def alone(dtype):
        m = model.to(dtype)
        logits, embeds_grad, grads = [], torch.zeros_like(embeds, dtype=dtype), None
        for (a, b), w in zip(spans, weights):
            single, [(s0, s1)] = _answer_row(prompt_len, [b - a], kind, (2, 4))
            x = torch.cat([embeds[:, :prompt_len], embeds[:, a:b]], 1).to(dtype)
            lg, eg, g = _run(m, x, single, [((s0, s1), w.to(dtype))])
            logits.append(lg[0, s0:s1])
            embeds_grad[:, :prompt_len] += eg[:, :prompt_len]
            embeds_grad[:, a:b] = eg[:, s0:s1]
            grads = g if grads is None else {n: grads[n] + g[n] for n in g}
        return torch.cat(logits), embeds_grad, grads

    ref_logits, ref_embeds_grad, ref_grads = alone(torch.float64)
    base_logits, base_embeds_grad, base_grads = alone(torch.float32)
    model.double()
    got_answer_logits = torch.cat([got_logits[0, a:b] for a, b in spans])
    assert_close(got_answer_logits, ref_logits, base_logits, torch.float32, name="answer logits")
    assert_close(got_embeds_grad, ref_embeds_grad, base_embeds_grad, torch.float32, name="embedding grads")
    for name in ref_grads:
        assert_close(got_grads[name], ref_grads[name], base_grads[name], torch.float32, name=name)


def test_llm_forward_takes_branch_ids_and_labels(seed):
    """LLM.forward(input_ids, branch_ids=...): the loss over answer tokens equals the mean
    of the losses of [prompt | answer] alone, where an answer's last token never predicts
    the next answer (shift_labels) and the prompt's last token predicts the first answer's
    first token only (the rejected answer's first token is not a target in the shared row)."""
    gen = torch.Generator().manual_seed(seed)
    model = tiny_llm().double()
    prompt, chosen, rejected = (torch.randint(0, 40, (1, n), generator=gen) for n in (6, 3, 4))
    ids = torch.cat([prompt, chosen, rejected], 1)
    branch = torch.tensor([[0] * 6 + [1] * 3 + [2] * 4])
    labels = ids.clone()
    labels[:, :6] = -100
    loss = model(ids, labels=labels, branch_ids=branch)
    # the same targets one at a time: chosen's 3 tokens; rejected's last 3 (its first has no
    # predictor in the shared row)
    logits_c = model(torch.cat([prompt, chosen], 1))
    logits_r = model(torch.cat([prompt, rejected], 1))
    nll = torch.nn.functional.cross_entropy
    terms = torch.cat([nll(logits_c[0, 5:8], chosen[0], reduction="none"),
                       nll(logits_r[0, 6:9], rejected[0, 1:], reduction="none")])
    torch.testing.assert_close(loss, terms.mean(), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="branch_ids: give them to the layout"):
        model(ids, layout=AttentionLayout(torch.zeros(1, 13, dtype=torch.int32)), branch_ids=branch)


# ---- decode: answers scored against a cached prompt -----------------------------------------
@pytest.mark.parametrize("kind", ["causal", "prefix_lm", "image_bidirectional", "mmca", "mmca_split"])
def test_score_answers_from_the_cache_equals_full_forward(kind, seed):
    """LLM.score_answers (prompt prefilled once, k answers as one cached chunk) gives each
    answer the logits of the full forward over [prompt | answer] at the positions that
    predict its tokens, float64, left-padded prompts batched (bound: as in
    test_branched_row_equals_each_answer_alone)."""
    gen = torch.Generator().manual_seed(seed)
    model = tiny_llm().double()
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    lengths = [3, 1, 4]
    prompt_lens = [7, 5]
    n = max(prompt_lens)
    embeds = torch.randn(2, n, hidden, generator=gen, dtype=torch.float64)
    mask = torch.zeros(2, n, dtype=torch.bool)
    for b, p in enumerate(prompt_lens):
        mask[b, n - p:] = True  # left padding
    answers = [torch.randint(0, vocab, (2, ln), generator=gen) for ln in lengths]
    split = kind == "mmca_split"
    base_kind = "mmca" if split else kind
    img = torch.full((2, n), -1, dtype=torch.int32)
    img[:, n - 4:n - 2] = 0  # an image inside each prompt
    pre = mask.clone() if base_kind == "prefix_lm" else None
    layout = AttentionLayout(torch.where(mask, 0, -1).to(torch.int32), img, pre, base_kind, split_softmax=split)
    got = model.score_answers(answers, inputs_embeds=embeds, attention_mask=mask, layout=layout)

    def full(dtype):
        out = []
        for j, a in enumerate(answers):
            rows = []
            for b, p in enumerate(prompt_lens):
                x = torch.cat([embeds[b:b + 1, n - p:], model.model.embed_tokens(a[b:b + 1])], 1).to(dtype)
                m = torch.zeros(1, x.shape[1], dtype=torch.bool)
                m[0, :p] = True
                single = AttentionLayout(torch.zeros(1, x.shape[1], dtype=torch.int32),
                                         torch.cat([img[b:b + 1, n - p:], torch.full((1, lengths[j]), -1)], 1),
                                         m if base_kind == "prefix_lm" else None, base_kind, split_softmax=split)
                rows.append(model.to(dtype)(inputs_embeds=x, layout=single)[0, p - 1:p - 1 + lengths[j]])
            out.append(torch.stack(rows))
        return out

    with torch.no_grad():
        ref, base = full(torch.float64), full(torch.float32)
    model.double()
    for j, (g, r, b) in enumerate(zip(got, ref, base)):
        assert g.shape == (2, lengths[j], vocab)
        assert_close(g, r, b, torch.float32, name=f"answer {j} logits")
