"""Decoder LLM: parity with transformers (logits, gradients, RoPE variants), packing, loading."""
import copy

import pytest
import torch

from fastvlm.models.llm import LLM, LLMConfig
from fastvlm.ops import AttentionLayout
from tests.utils import assert_close

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}


def _hf_model(arch, rope=None, **extra):
    cfg_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                          "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                          "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[arch]
    kwargs = dict(TINY, **extra)
    if rope is not None:
        kwargs["rope_scaling"] = dict(rope)
    model = model_cls(cfg_cls(**kwargs, attn_implementation="eager")).float().eval()
    with torch.no_grad():  # biases and norms default to 0 / 1: make them random so they are tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.5 if "norm" in name else 0.0, 0.2)
    return model


def _load_ours(hf, tmp_path):
    hf.save_pretrained(tmp_path)
    return LLM.from_pretrained(tmp_path).eval()


def _hf_float64(hf):
    """The transformers model in float64: the reference; the fp32 one is the plain-PyTorch baseline."""
    return copy.deepcopy(hf).double()




@pytest.mark.parametrize("arch,extra", [("llama", {}), ("llama", {"attention_bias": True}),
                                        ("qwen2", {}), ("mistral", {}),
                                        ("mistral", {"sliding_window": 7}),
                                        ("qwen2", {"use_sliding_window": True, "sliding_window": 5,
                                                   "max_window_layers": 1}),
                                        ("llama", {"tie_word_embeddings": True})])
def test_logits_and_grads_match_transformers(arch, extra, tmp_path, seed):
    hf = _hf_model(arch, **extra)
    ours, hf64 = _load_ours(hf, tmp_path), _hf_float64(hf)
    ids = torch.randint(0, TINY["vocab_size"], (2, 37))
    logits64 = hf64(ids).logits
    assert_close(ours(ids), logits64, hf(ids).logits, name="logits")
    labels = ids.clone()
    labels[:, :10] = -100
    # Plain PyTorch's fp32 error depends on its attention algorithm: on the q/k gradients (which
    # cancel, see below) the eager softmax's and SDPA's differ by up to 5x, either way round, so
    # the baseline is whichever of the two errs more on each tensor.
    hf_sdpa = copy.deepcopy(hf)
    hf_sdpa.set_attn_implementation("sdpa")
    losses = [m(ids, labels=labels) for m in (ours, hf64, hf, hf_sdpa)]
    losses = [loss if isinstance(loss, torch.Tensor) else loss.loss for loss in losses]
    # one number: its floor from the logits it is computed from (|dloss| <= 2 max |dlogit|)
    assert_close(*losses[:3], scale=2 * float(logits64.norm()), name="loss")
    for loss in losses:
        loss.backward()
    params64 = dict(hf64.named_parameters())
    params32 = [dict(m.named_parameters()) for m in (hf, hf_sdpa)]

    def baseline(name):
        ref = params64[name].grad
        return max((p[name].grad for p in params32), key=lambda g: float((g.double() - ref).norm()))

    for name, p in ours.named_parameters():
        # a bias gradient is a sum over the T tokens (sum_t dq_t) that cancels, q/k's almost fully
        # (softmax ignores a shift shared by all keys): its rounding grows like sqrt(T) times the
        # summands, whose size the weight gradient sum_t x_t dq_t shows (x is O(1) after RMSNorm)
        tokens = ids.numel()
        scale = (tokens ** 0.5 * float(params64[name[:-len("bias")] + "weight"].grad.norm())
                 if name.endswith(".bias") else None)
        assert_close(p.grad, params64[name].grad, baseline(name), scale=scale, name=name)


@pytest.mark.parametrize("rope", list(ROPES))
def test_rope_variants_match_transformers(rope, tmp_path, seed):
    hf = _hf_model("llama", ROPES[rope])
    ours = _load_ours(hf, tmp_path)
    n = 90 if rope == "dynamic" else 40  # dynamic scaling only acts past max_position_embeddings
    ids = torch.randint(0, TINY["vocab_size"], (1, n))
    assert_close(ours(ids), _hf_float64(hf)(ids).logits, hf(ids).logits, name="logits")


@pytest.mark.parametrize("extra", [{}, {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 0}])
def test_packed_samples_are_independent(extra, tmp_path, seed):
    """Two samples packed in one row give the logits of each sample run alone (a sliding
    window slides within each sample)."""
    hf = _hf_model("qwen2", **extra)
    ours, hf64 = _load_ours(hf, tmp_path), _hf_float64(hf)
    a, b = torch.randint(0, 97, (1, 13)), torch.randint(0, 97, (1, 22))
    seg = torch.tensor([[0] * 13 + [1] * 22 + [-1] * 3], dtype=torch.int32)
    ids = torch.cat([a, b, torch.zeros(1, 3, dtype=torch.long)], 1)
    packed = ours(ids, segment_ids=seg)
    assert_close(packed[:, :13], hf64(a).logits, hf(a).logits, name="sample a")
    assert_close(packed[:, 13:35], hf64(b).logits, hf(b).logits, name="sample b")
    # The loss never asks the last token of sample a to predict the first of b.
    labels = ids.clone()
    loss = ours(ids, segment_ids=seg, labels=labels)
    alone = [(m(a, labels=a).loss * 12 + m(b, labels=b).loss * 21) / 33 for m in (hf64, hf)]
    assert_close(loss, *alone, scale=2 * float(packed.norm()), name="loss")  # floor from the logits


def test_config_and_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="^config"):
        LLMConfig.from_dict({"hidden_size": 8, "num_layers": 2})
    with pytest.raises(ValueError, match="^rope_scaling"):
        LLMConfig(rope_scaling={"rope_type": "longrope"})
    with pytest.raises(ValueError, match="^num_key_value_heads"):
        LLMConfig(num_attention_heads=4, num_key_value_heads=3)
    for bad in ({"sliding_layers": [0]}, {"sliding_window": 4, "sliding_layers": [2]},
                {"sliding_window": 4, "sliding_layers": [1, 1]}, {"sliding_window": 4, "sliding_layers": 1}):
        with pytest.raises(ValueError, match="^sliding_layers"):
            LLMConfig(num_hidden_layers=2, **bad)
    with pytest.raises(ValueError, match="^sliding_window"):
        LLMConfig(sliding_window=0)
    # one form per meaning: every layer listed is None, no layer listed is no window
    assert LLMConfig(num_hidden_layers=2, sliding_window=4, sliding_layers=[1, 0]).sliding_layers is None
    assert LLMConfig(num_hidden_layers=2, sliding_window=4, sliding_layers=[]).sliding_window is None
    assert LLMConfig.from_hf({**TINY, "model_type": "mistral"}).sliding_window == 4096  # transformers' default
    assert LLMConfig.from_hf({**TINY, "model_type": "qwen2", "use_sliding_window": True,
                              "max_window_layers": 1}).sliding_layers == [1]
    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    f = next(tmp_path.glob("*.safetensors"))
    state = load_file(str(f))
    state.pop("model.norm.weight")
    state["model.extra.weight"] = torch.zeros(1)
    save_file(state, str(f))
    keys = r"missing keys \['model.norm.weight'\].*unexpected keys \['model.extra.weight'\]"
    with pytest.raises(ValueError, match=keys):
        LLM.from_pretrained(tmp_path)
    ours = LLM(LLMConfig.from_dict(dict(TINY)))
    with pytest.raises(ValueError, match="^input_ids"):
        ours(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="^labels"):
        ours(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 3, dtype=torch.long))
    windowed = AttentionLayout(torch.zeros(1, 4, dtype=torch.int32)).with_window(2)
    for call in (lambda: ours(torch.zeros(1, 4, dtype=torch.long), layout=windowed),
                 lambda: ours.generate(torch.zeros(1, 4, dtype=torch.long), layout=windowed, max_new_tokens=1)):
        with pytest.raises(ValueError, match="^layout: has window=2"):
            call()


def _greedy_by_recompute(model, prompt, steps):
    """Reference: run the whole sequence again for every new token, no cache."""
    seq = prompt.clone()
    for _ in range(steps):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[:, prompt.shape[1]:]


@pytest.mark.parametrize("padding", ["left", "right"])
def test_cached_generation_equals_recompute(padding, seed):
    model = LLM(LLMConfig.from_dict(dict(TINY, qkv_bias=True))).eval()
    lengths = [9, 4, 13]
    prompts = [torch.randint(1, 97, (1, n)) for n in lengths]
    n = max(lengths)
    ids = torch.zeros(3, n, dtype=torch.long)
    mask = torch.zeros(3, n, dtype=torch.long)
    for i, p in enumerate(prompts):
        sl = slice(n - p.shape[1], n) if padding == "left" else slice(0, p.shape[1])
        ids[i, sl], mask[i, sl] = p[0], 1
    got = model.generate(ids, attention_mask=mask, max_new_tokens=6)
    for i, p in enumerate(prompts):
        assert torch.equal(got[i], _greedy_by_recompute(model, p, 6)[0]), i


def test_sampling_is_reproducible_and_top_p_narrows_to_greedy(seed):
    model = LLM(LLMConfig.from_dict(dict(TINY))).eval()
    ids = torch.randint(0, 97, (2, 7))
    draw = [model.generate(ids, max_new_tokens=5, temperature=1.0, top_p=0.9,
                           generator=torch.Generator().manual_seed(seed)) for _ in range(2)]
    assert torch.equal(draw[0], draw[1])
    near_greedy = model.generate(ids, max_new_tokens=5, temperature=1.0, top_p=1e-6)
    assert torch.equal(near_greedy, model.generate(ids, max_new_tokens=5))
    eos = int(model.generate(ids[:1], max_new_tokens=1)[0, 0])
    stopped = model.generate(ids[:1], max_new_tokens=4, eos_token_id=eos, pad_token_id=-1)
    assert stopped.tolist() == [[eos, -1, -1, -1]]


@pytest.mark.parametrize("policy", ["full", "selective", "every_k:2", "offload", "full+offload"])
def test_checkpointing_policies_keep_gradients(policy, seed):
    cfg = LLMConfig.from_dict(dict(TINY, num_hidden_layers=3))
    model = LLM(cfg)
    ids = torch.randint(0, 97, (2, 21))
    seg = torch.tensor([[0] * 10 + [1] * 11, [0] * 21], dtype=torch.int32)
    model(ids, segment_ids=seg, labels=ids).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_checkpointing(policy)(ids, segment_ids=seg, labels=ids).backward()
    for n, p in model.named_parameters():  # recomputation repeats the same ops on the same values
        assert torch.equal(p.grad, want[n]), n


def _loss_from_logits(model, ids, seg, labels):
    """The loss as the logits path gives it: every position of every row runs, padding too."""
    from fastvlm.models.llm import shift_labels

    logits = model(ids, segment_ids=seg)[:, :-1]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), shift_labels(labels, seg).flatten())


@pytest.mark.parametrize("kind,window", [("causal", None), ("image_bidirectional", None), ("causal", 4)])
def test_loss_skips_padding_and_matches_the_full_rows(kind, window, seed):
    """With labels, padding is dropped and the rows run as one packed row: the loss and every
    gradient are those of running the padded rows in full (a sliding window, in the unpadded
    row too, slides within each sample)."""
    model = LLM(LLMConfig.from_dict(dict(TINY, num_hidden_layers=2, attention_kind=kind, sliding_window=window)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model64 = copy.deepcopy(model).double()
    ids = torch.randint(0, 97, (3, 23))
    seg = torch.tensor([[0] * 9 + [1] * 8 + [-1] * 6, [0] * 23, [-1] * 2 + [0] * 5 + [-1] * 16], dtype=torch.int32)
    labels = torch.where(torch.rand(3, 23) < 0.3, -100, ids)
    runs = []
    for m, loss_fn in ((model, lambda m: m(ids, segment_ids=seg, labels=labels)),
                       (model, lambda m: _loss_from_logits(m, ids, seg, labels)),
                       (model64, lambda m: _loss_from_logits(m, ids, seg, labels))):
        m.zero_grad(set_to_none=True)
        loss = loss_fn(m)
        loss.backward()
        runs.append([loss.detach()] + [p.grad.clone() for p in m.parameters()])
    names = ["loss"] + [n for n, _ in model.named_parameters()]
    for name, got, base, want in zip(names, *runs):
        assert_close(got, want, base, name=name)
