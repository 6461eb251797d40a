"""Cached generation equals the full forward, for every layout kind and option.

Property: for random prompts with images, `VLM.generate` (prefill on the
multimodal layout, then one token at a time from the KV cache) picks the same
greedy tokens as a loop that reruns the whole forward on the prompt plus the
tokens so far, in fp32. Rows are batched with left or right padding for the
cached path and run alone for the full-forward loop.

Two fp32 computations of the same logits can pick different tokens only at a
near-tie; a mismatch is accepted only where the float64 model's logits of the
two tokens differ by less than a small multiple of the fp32 forward's own
error (tests/utils.py's rule), and the row is compared no further.
"""
import copy

import pytest
import torch

from fastvlm.models.llm import LLMConfig
from fastvlm.models.vision import VisionConfig
from fastvlm.models.vlm import VLM, VLMConfig
from tests.utils import ERROR_FACTOR, FLOOR_ULPS, assert_close, unit_roundoff

VOCAB = 64
IMG = VOCAB  # outside the vocabulary: a generated token can never be read back as a placeholder
TOKENS_PER_IMAGE = 4  # 28 px / 14 px patches, class token dropped
NEW_TOKENS = 6
KINDS = [("causal", False), ("image_bidirectional", False), ("mmca", False), ("mmca", True), ("prefix_lm", False)]


def tiny_vlm(kind="causal", split_softmax=False, max_positions=128, window=None):
    vision = VisionConfig.clip(image_size=28, patch_size=14, hidden_size=32, num_layers=2, num_heads=4,
                               intermediate_size=64)
    llm = LLMConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                    sliding_window=window)
    model = VLM(VLMConfig(vision, llm, image_token_id=IMG, attention_kind=kind, split_softmax=split_softmax))
    with torch.no_grad():  # spread the logits, so that most steps are far from a tie
        model.language_model.lm_head.weight.mul_(4)
    return model.eval()


def random_prompt(text_len: int, images: int) -> list[int]:
    """`text_len` random text tokens with `images` runs of placeholders at random places."""
    text = torch.randint(0, VOCAB, (text_len,)).tolist()
    gaps = torch.randint(0, text_len + 1, (images,)).tolist()  # two images may be back to back
    ids = []
    for i, tok in enumerate(text + [None]):
        ids += [IMG] * TOKENS_PER_IMAGE * gaps.count(i) + ([tok] if tok is not None else [])
    return ids


def batch(prompts, prefixes, left_pad: bool):
    n = max(map(len, prompts))
    ids = torch.zeros(len(prompts), n, dtype=torch.long)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    prefix = torch.zeros(len(prompts), n, dtype=torch.bool)
    for b, (p, k) in enumerate(zip(prompts, prefixes)):
        start = n - len(p) if left_pad else 0
        ids[b, start:start + len(p)] = torch.tensor(p)
        mask[b, start:start + len(p)] = 1
        prefix[b, start:start + k] = True
    return ids, mask, prefix


def full_forward_logits(model, ids, pixels, prefix_len, kind):
    ids = torch.tensor([ids])
    prefix = None
    if kind == "prefix_lm":
        prefix = torch.zeros_like(ids, dtype=torch.bool)
        prefix[0, :prefix_len] = True
    return model(ids, pixels, prefix_mask=prefix)[0, -1]


def near_tie(model, model64, ids, pixels, prefix_len, kind, a: int, b: int) -> bool:
    """Is choosing `a` over `b` within fp32 rounding of the full forward?"""
    want = full_forward_logits(model64, ids, None if pixels is None else pixels.double(), prefix_len, kind)
    got32 = full_forward_logits(model, ids, pixels, prefix_len, kind).double()
    err = float((got32 - want).abs().max())
    bound = ERROR_FACTOR * err + FLOOR_ULPS * unit_roundoff(torch.float32) * float(want.abs().max())
    return abs(float(want[a] - want[b])) <= bound


@pytest.mark.parametrize("text_len", [1, 6, 13])
@pytest.mark.parametrize("kind,split_softmax", KINDS)
def test_cached_greedy_equals_full_forward(kind, split_softmax, text_len, seed):
    check_cached_greedy(tiny_vlm(kind, split_softmax), kind, text_len)


@pytest.mark.parametrize("kind,split_softmax", KINDS)
def test_cached_greedy_with_a_sliding_window(kind, split_softmax, seed):
    """A window of 5 (less than an image and its neighbours, less than the prompts): the
    decode steps drop the keys that slide out, by position, right-padded rows included."""
    check_cached_greedy(tiny_vlm(kind, split_softmax, window=5), kind, 9)


def check_cached_greedy(model, kind, text_len):
    model64 = copy.deepcopy(model).double()
    prompts = [random_prompt(text_len, images) for images in (1, 2, 0)]
    # the prefix is at least one token and may end anywhere in the prompt, inside an image too
    prefixes = [int(torch.randint(1, len(p) + 1, ())) for p in prompts]
    per_row = [sum(t == IMG for t in p) // TOKENS_PER_IMAGE for p in prompts]
    pixels = torch.randn(sum(per_row), 3, 28, 28)
    first_image = [sum(per_row[:b]) for b in range(len(prompts))]
    for left_pad in (False, True):
        ids, mask, prefix = batch(prompts, prefixes, left_pad)
        extra = {"prefix_mask": prefix} if kind == "prefix_lm" else {}
        cached = model.generate(ids, pixels, attention_mask=mask, max_new_tokens=NEW_TOKENS, **extra)
        assert cached.shape == (len(prompts), NEW_TOKENS)
        for b, prompt in enumerate(prompts):
            row_pixels = pixels[first_image[b]:first_image[b] + per_row[b]] if per_row[b] else None
            seq = list(prompt)
            for step in range(NEW_TOKENS):
                want = int(full_forward_logits(model, seq, row_pixels, prefixes[b], kind).argmax())
                got = int(cached[b, step])
                if got != want:
                    assert near_tie(model, model64, seq, row_pixels, prefixes[b], kind, got, want), (
                        f"row {b} ({'left' if left_pad else 'right'} padded), step {step}: cached decoding "
                        f"chose {got}, the full forward {want}")
                    break
                seq.append(want)


@pytest.mark.parametrize("prompt_len", [1, 5, 12])
def test_llm_prefix_lm_generate_equals_full_forward(prompt_len, seed):
    """LLM.generate builds the prefix_lm layout itself from attention_mask and prefix_mask."""
    from fastvlm.models.llm import LLM
    from fastvlm.ops import AttentionLayout

    llm = tiny_vlm().language_model
    llm.config.attention_kind = "prefix_lm"
    llm64 = copy.deepcopy(llm).double()
    prompt = torch.randint(0, VOCAB, (1, prompt_len))
    prefix_len = int(torch.randint(1, prompt_len + 1, ()))
    prefix = torch.arange(prompt_len)[None] < prefix_len
    cached = llm.generate(prompt, prefix_mask=prefix, max_new_tokens=NEW_TOKENS)

    def last_logits(model: LLM, seq):
        n = seq.shape[1]
        layout = AttentionLayout(torch.zeros(1, n, dtype=torch.int32), prefix_mask=torch.arange(n)[None] < prefix_len,
                                 kind="prefix_lm")
        return model(seq, layout=layout)[0, -1]

    seq = prompt
    for step in range(NEW_TOKENS):
        want, got = int(last_logits(llm, seq).argmax()), int(cached[0, step])
        if got != want:
            ref = last_logits(llm64, seq)
            err = float((last_logits(llm, seq).double() - ref).abs().max())
            bound = ERROR_FACTOR * err + FLOOR_ULPS * unit_roundoff(torch.float32) * float(ref.abs().max())
            assert abs(float(ref[got] - ref[want])) <= bound, f"step {step}: cached {got}, full forward {want}"
            break
        seq = torch.cat([seq, torch.tensor([[want]])], 1)


def test_generate_never_emits_the_image_placeholder(seed):
    """With the image token in the vocabulary (as HF LLaVA has it) and made the likeliest
    first token, VLM.generate still never chooses it (LLM.generate without suppress_tokens does)."""
    model = tiny_vlm()
    img = model.config.image_token_id = VOCAB - 1
    ids = torch.randint(0, VOCAB - 1, (2, 7))
    lm = model.language_model
    # the greedy first token apart from the placeholder (which a random model may prefer already)
    first = lm.generate(ids, max_new_tokens=1, suppress_tokens=[img])[:, 0]
    with torch.no_grad():  # the placeholder's logit := the first token's + 5 for row 0's last state
        h = lm.hidden_states(ids)[0, -1]
        lm.lm_head.weight[img] = lm.lm_head.weight[first[0]] + 5 * h / h.dot(h)
    plain = lm.generate(ids, max_new_tokens=NEW_TOKENS)
    assert plain[0, 0] == img, "the construction should make the placeholder the greedy choice"
    out = model.generate(ids, max_new_tokens=NEW_TOKENS)
    assert not (out == img).any() and out[0, 0] == first[0]
    with pytest.raises(ValueError, match=r"suppress_tokens: expected token ids in \[0, 64\)"):
        lm.generate(ids, max_new_tokens=2, suppress_tokens=[VOCAB])


@pytest.mark.parametrize("left_pad", [False, True], ids=["right_padded", "left_padded"])
@pytest.mark.parametrize("kind,split_softmax", KINDS)
def test_vlm_score_answers_equals_full_forward(kind, split_softmax, left_pad, seed):
    """Answers scored against a cached prompt with images (VLM.score_answers: the prompt
    encoded and prefilled once, three answers as one chunk of the cache, each seeing the
    prompt and itself) get the logits the full float64 forward over [prompt | answer] gives
    at the positions that predict the answer's tokens; bound: that forward's float32 error
    (not rescaled to float64: RMSNorm rounds to fp32 whatever the dtype, so two float64
    paths that differ in the last bits may round a value apart there)."""
    model64 = tiny_vlm(kind, split_softmax).double()
    prompts = [random_prompt(text_len, images) for text_len, images in ((5, 1), (3, 2))]
    prefixes = [int(torch.randint(1, len(p) + 1, ())) for p in prompts]
    per_row = [sum(t == IMG for t in p) // TOKENS_PER_IMAGE for p in prompts]
    pixels = torch.randn(sum(per_row), 3, 28, 28, dtype=torch.float64)
    answers = [torch.randint(0, VOCAB, (len(prompts), n)) for n in (3, 1, 2)]
    ids, mask, prefix = batch(prompts, prefixes, left_pad)
    extra = {"prefix_mask": prefix} if kind == "prefix_lm" else {}
    got = model64.score_answers(answers, ids, pixels, attention_mask=mask, **extra)
    model32 = copy.deepcopy(model64).float()
    start = 0
    for b, prompt in enumerate(prompts):
        row_pixels = pixels[start:start + per_row[b]]
        start += per_row[b]
        for j, answer in enumerate(answers):
            seq = torch.tensor([prompt + answer[b].tolist()])
            pre = torch.zeros_like(seq, dtype=torch.bool)
            pre[0, :prefixes[b]] = True
            kw = {"prefix_mask": pre} if kind == "prefix_lm" else {}
            span = slice(len(prompt) - 1, len(prompt) - 1 + answer.shape[1])
            with torch.no_grad():
                want = model64(seq, row_pixels, **kw)[0, span]
                base = model32(seq, row_pixels.float(), **kw)[0, span]
            assert_close(got[j][b], want, base, torch.float32, name=f"row {b} answer {j}")
