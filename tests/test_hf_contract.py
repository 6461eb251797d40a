"""The drop-in's contract with transformers, for every family patch() supports: what
transformers' own model and generation test mixins check of a model (tuple and dict
outputs, attention maps, static and dynamic caches, assisted decoding, save / load,
compilation, switching the attention implementation), written here against tiny models.
Numbers are checked against the unpatched model in float64 (reference) and float32
(baseline); generated tokens by teacher forcing: the logits of every step against the
unpatched model's logits on the sequence the patched model chose, which no near-tie
between two tokens can upset. Where patch() differs from transformers on purpose (the
README's list), the test says so."""
from __future__ import annotations

import copy
import inspect
import json
import pickle

import pytest
import torch
from transformers import AttentionInterface, CompileConfig, LogitsProcessor, LogitsProcessorList
from transformers.masking_utils import AttentionMaskInterface

from fastvlm.integrations import hf_attention
from fastvlm.integrations.transformers import patch, unpatch
from tests import hf_patch_models as H
from tests.test_hf_patch import cast, qwen_positions
from tests.utils import assert_close

FAMILIES = list(H.FAMILIES)
SAME_LENGTH = ((2, 3), (2, 1))  # prompts of equal length: no padding (fp64 eager Gemma 3 gives NaN there)


def count_fastvlm_calls(monkeypatch) -> list:
    calls = []
    real = hf_attention.multimodal_attention
    monkeypatch.setattr(hf_attention, "multimodal_attention",
                        lambda q, *a, **kw: (calls.append(q.shape[2]), real(q, *a, **kw))[1])
    return calls


def models(name, seed):
    """(patched fp32, unpatched fp64 reference, unpatched fp32 baseline), all eager, same weights."""
    return (patch(H.build(name, seed).eval()), H.build(name, seed, torch.float64).eval(),
            H.build(name, seed).eval())


def text_layers(model) -> int:
    return model.config.get_text_config().num_hidden_layers


def flat(outputs) -> list:
    """The tensors of a (nested) output tuple, in order."""
    out = []
    for x in outputs:
        out.extend(flat(x) if isinstance(x, (tuple, list)) else [x])
    return out


# ---- outputs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_tuple_outputs_equal_dict_outputs(name, seed):
    """return_dict=False gives the dict output's to_tuple(), with labels (the fused loss)
    too. (config.return_dict=False is left out: unpatched transformers 5.23 fails on it for
    LLaVA, PaliGemma and both Qwens, inside their own sub-models.)"""
    model = patch(H.build(name, seed).eval())
    inputs = H.batch(H.samples(name, model, seed + 1))
    labels = torch.where(inputs["attention_mask"].bool(), inputs["input_ids"], -100)
    for extra in ({}, {"labels": labels}, {"labels": labels, "output_hidden_states": True},
                  {"output_attentions": True, "output_hidden_states": True}):
        with torch.no_grad():
            as_dict = model(**inputs, **extra)
            as_tuple = model(**inputs, **extra, return_dict=False)
        assert isinstance(as_tuple, tuple), (extra.keys(), type(as_tuple))
        want, got = flat(as_dict.to_tuple()), flat(as_tuple)
        assert len(got) == len(want)
        assert all(torch.equal(g, w) for g, w in zip(got, want) if isinstance(w, torch.Tensor))


@pytest.mark.parametrize("name", FAMILIES)
def test_attention_outputs(name, seed):
    """output_attentions=True returns one map per decoder layer, [B, heads, N, N], those of
    the unpatched eager model; so does the config's flag set before patch(). (transformers
    refuses config.output_attentions = True for any implementation but eager, so for
    "fastvlm" too: documented with C.)"""
    model, ref_model, base_model = models(name, seed)
    inputs = H.batch(H.samples(name, model, seed + 1, SAME_LENGTH))
    with torch.no_grad():
        ref = ref_model(**cast(inputs, torch.float64), output_attentions=True).attentions
        base = base_model(**inputs, output_attentions=True).attentions
        got = model(**inputs, output_attentions=True).attentions
    with pytest.raises(ValueError, match="output_attentions"):
        model.config.get_text_config().output_attentions = True
    flagged = H.build(name, seed).eval()  # the config's flag, set while the model was eager, is honoured
    flagged.config.get_text_config().output_attentions = True
    with torch.no_grad():
        by_config = patch(flagged)(**inputs).attentions
    b, n = inputs["input_ids"].shape
    heads = model.config.get_text_config().num_attention_heads
    assert len(got) == len(by_config) == text_layers(model)
    for layer, (g, c, r, w) in enumerate(zip(got, by_config, ref, base)):
        assert g.shape == (b, heads, n, n)
        assert torch.equal(c, g)
        assert_close(g, r, w, torch.float32, name=f"attention map of layer {layer}")


@pytest.mark.parametrize("name", FAMILIES)
def test_attention_outputs_keep_packed_samples_apart(name, seed):
    """On a packed row the maps give no weight across samples, and each sample's block is
    its map when run alone (unpatched eager)."""
    model, ref_model, base_model = models(name, seed)
    group = H.samples(name, model, seed + 1, ((1, 2), (2, 2)))
    packed = H.batch(group, "packed")
    if H.FAMILIES[name].kind == "qwen":
        packed["position_ids"] = qwen_positions(model, group)
    with torch.no_grad():
        got = model(**packed, output_attentions=True).attentions
        alone = [(ref_model(**cast(H.batch([s]), torch.float64), output_attentions=True).attentions,
                  base_model(**H.batch([s]), output_attentions=True).attentions) for s in group]
    spans = [cols for _, cols in H.live_positions(group, "packed")]
    assert len(got) == text_layers(model)
    for layer, maps in enumerate(got):
        for i, cols in enumerate(spans):
            block = maps[0, :, cols, cols]
            outside = torch.ones(maps.shape[-1], dtype=torch.bool)
            outside[cols] = False
            assert not maps[0, :, cols][..., outside].any(), f"layer {layer}: sample {i} attends outside itself"
            ref, base = alone[i][0][layer][0], alone[i][1][layer][0]
            assert_close(block, ref, base, torch.float32, name=f"layer {layer} sample {i} map")


# ---- generation ------------------------------------------------------------------------------
def prompt_batch(name, model, seed, batch=2):
    group = [H.prompt_only(s) for s in H.samples(name, model, seed, SAME_LENGTH[:batch])]
    return H.batch(group)


def teacher_forced(model, name, inputs, sequences):
    """Logits [B, T, V] the model gives, in one forward over `sequences` (the prompt in
    `inputs` followed by T generated tokens), at the positions that chose those tokens."""
    full = dict(inputs, **H.extend_with_generated(name, inputs, sequences))
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        logits = model(**cast(full, dtype)).logits
    prompt = inputs["input_ids"].shape[1]
    return logits[:, prompt - 1:-1]


def check_generated(name, seed, out, inputs, ref_model, base_model):
    steps = torch.stack(out.logits, 1)
    assert steps.shape[1] == out.sequences.shape[1] - inputs["input_ids"].shape[1] > 0
    ref = teacher_forced(ref_model, name, inputs, out.sequences)
    base = teacher_forced(base_model, name, inputs, out.sequences)
    assert_close(steps, ref, base, torch.float32, name="generated step logits")


# never the image placeholder or another special token: a generated placeholder has no image
# features behind it, which transformers refuses (patched or not) when it re-reads the sequence
GREEDY = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True,
              suppress_tokens=list(range(H.TEXT_MAX, H.VOCAB)))


@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("name", FAMILIES)
def test_generate_with_cache(name, cache, seed, monkeypatch):
    """generate with a static cache (its masks come from the registered mask function and run
    on sdpa) or the default dynamic one (prefill on fastvlm attention): the unpatched model's
    logits at every step."""
    model, ref_model, base_model = models(name, seed)
    inputs = prompt_batch(name, model, seed + 1)
    calls = count_fastvlm_calls(monkeypatch)
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    out = model.generate(**inputs, **GREEDY, **extra)
    assert set(calls) == (set() if cache == "static" else {inputs["input_ids"].shape[1]})
    check_generated(name, seed, out, inputs, ref_model, base_model)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_from_inputs_embeds_with_static_cache(name, seed):
    """Text-only generation from inputs_embeds into a static cache: the unpatched logits
    (where transformers generates from embeddings for the family at all; where it refuses,
    the patched model refuses the same way)."""
    model, ref_model, base_model = models(name, seed)
    ids = torch.randint(0, H.TEXT_MAX, (2, 5), generator=torch.Generator().manual_seed(seed + 1))
    embeds = model.get_input_embeddings()(ids).detach()
    if "inputs_embeds" not in inspect.signature(type(model).prepare_inputs_for_generation).parameters:
        with pytest.raises(ValueError, match="inputs_embeds"):
            model.generate(inputs_embeds=embeds, cache_implementation="static", **GREEDY)
        return
    out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), cache_implementation="static",
                         **GREEDY)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out.sequences = torch.cat([ids, out.sequences], 1)  # from embeddings, generate returns the new tokens only
    check_generated(name, seed, out, inputs, ref_model, base_model)


@pytest.mark.parametrize("name", FAMILIES)
def test_compiled_generation_with_static_cache(name, seed):
    """generate with the forward compiled with fullgraph=True on a static cache (what
    transformers does by itself on a GPU): the unpatched logits; a shorter prompt into a
    cache of the same length then runs without recompiling."""
    model, ref_model, base_model = models(name, seed)
    inputs = prompt_batch(name, model, seed + 1)
    compile_config = CompileConfig(fullgraph=True, dynamic=False, backend="eager")
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only by default
    greedy = {k: v for k, v in GREEDY.items() if k != "max_new_tokens"}
    length = inputs["input_ids"].shape[1] + GREEDY["max_new_tokens"]  # the static cache's length
    torch._dynamo.reset()
    out = model.generate(**inputs, cache_implementation="static", compile_config=compile_config, max_length=length,
                         **greedy)
    check_generated(name, seed, out, inputs, ref_model, base_model)
    shorter = {k: v[:, :-1] if k in H.PER_TOKEN else v for k, v in inputs.items()}  # drops a text token
    # transformers' static sliding-window cache layer (Gemma 3's) guards on how full it is, so
    # there the unpatched model recompiles as well (checked on 5.23): no recompilation is
    # required only of the families whose unpatched model has none
    sliding = "sliding_attention" in (getattr(model.config.get_text_config(), "layer_types", None) or ())
    with torch._dynamo.config.patch(error_on_recompile=not sliding):
        out = model.generate(**shorter, cache_implementation="static", compile_config=compile_config,
                             max_length=length, **greedy)
    check_generated(name, seed, out, shorter, ref_model, base_model)


class ForceSequence(LogitsProcessor):
    """Greedy decoding onto given sequences: the reference run then chooses the tokens the
    run under test chose, so their raw logits compare step by step (no near-tie can flip a
    token), on the reference's own decoding path."""

    def __init__(self, sequences: torch.Tensor):
        self.sequences = sequences

    def __call__(self, input_ids, scores):
        at = input_ids.shape[1]
        if at >= self.sequences.shape[1]:
            return scores
        forced = torch.full_like(scores, -torch.inf)
        return forced.scatter_(1, self.sequences[: len(scores), at:at + 1], 0.0)


@pytest.mark.parametrize("assistant", ["model", "prompt_lookup"])
@pytest.mark.parametrize("name", FAMILIES)
def test_assisted_decoding(name, assistant, seed):
    """Assisted generation (the model as its own assistant, as transformers' test does, or
    prompt lookup), output_attentions on: maps at every step, and the unpatched model's
    assisted logits. All three runs are forced onto the patched run's tokens, so they take
    the same path (which tokens the assistant proposes, how many are accepted): transformers'
    PaliGemma gives other numbers on another path, patched or not."""
    model, ref_model, base_model = models(name, seed)
    inputs = prompt_batch(name, model, seed + 1, batch=1)  # transformers' assisted decoding takes one row

    def assisted(m, dtype, force=None):
        extra = {"assistant_model": m} if assistant == "model" else {"prompt_lookup_num_tokens": 2}
        if force is not None:
            extra["logits_processor"] = LogitsProcessorList([ForceSequence(force)])
        out = m.generate(**cast(inputs, dtype), **extra, output_attentions=True, **GREEDY)
        assert out.attentions and all(len(step) == text_layers(model) for step in out.attentions)
        assert force is None or torch.equal(out.sequences, force)
        return out

    chosen = assisted(model, torch.float32).sequences
    got, ref, base = (torch.stack(assisted(m, dtype, chosen).logits, 1) for m, dtype in
                      ((model, torch.float32), (ref_model, torch.float64), (base_model, torch.float32)))
    assert_close(got, ref, base, torch.float32, name="assisted step logits")


# ---- the model object -------------------------------------------------------------------------
def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", FAMILIES)
def test_deepcopy_computes_with_its_own_weights(name, seed, monkeypatch):
    """A deep copy of a patched model (a frozen reference for DPO, an EMA, a teacher) is
    patched and computes with its own weights; the original is untouched."""
    base = H.build(name, seed).eval()
    model = patch(copy.deepcopy(base))
    inputs = H.batch(H.samples(name, model, seed + 1))
    before = logits(model, inputs)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in list(twin.parameters()) + list(base.parameters()):
            p.mul_(0.5)
    calls = count_fastvlm_calls(monkeypatch)
    assert torch.equal(logits(twin, inputs), logits(patch(base), inputs))
    assert calls
    assert torch.equal(logits(model, inputs), before)
    unpatch(twin)
    assert torch.equal(logits(model, inputs), before)


@pytest.mark.parametrize("name", FAMILIES)
def test_pickle_round_trip(name, seed, monkeypatch):
    """pickle carries a patched model over whole: the same outputs on fastvlm attention,
    the "fastvlm" functions registered where they are not yet (a fresh process), and
    unpatch works on the copy."""
    model = patch(H.build(name, seed).eval())
    data = pickle.dumps(model)  # before any call: transformers' output-capturing hooks never pickle
    inputs = H.batch(H.samples(name, model, seed + 1))
    for registry in (AttentionInterface, AttentionMaskInterface):
        monkeypatch.delitem(registry._global_mapping, hf_attention.NAME)
    loaded = pickle.loads(data)
    assert hf_attention.NAME in AttentionInterface._global_mapping
    assert hf_attention.NAME in AttentionMaskInterface._global_mapping
    calls = count_fastvlm_calls(monkeypatch)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs)) and calls
    unpatch(loaded)
    assert "_fastvlm_patch" in model.__dict__
    assert all("forward" not in m.__dict__ for m in loaded.modules())


@pytest.mark.parametrize("name", FAMILIES)
def test_save_pretrained_from_pretrained(name, seed, tmp_path):
    """save_pretrained writes the transformers checkpoint (no trace of fastvlm in it);
    from_pretrained loads an unpatched model with the same weights, equal to the patched
    one once patched."""
    model = patch(H.build(name, seed).eval())
    inputs = H.batch(H.samples(name, model, seed + 1))
    model.save_pretrained(tmp_path)
    assert "fastvlm" not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    loaded = type(model).from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert "_fastvlm_patch" not in loaded.__dict__
    assert loaded.config.get_text_config()._attn_implementation == "eager"
    assert list(loaded.state_dict()) == list(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert torch.equal(logits(patch(loaded), inputs), logits(model, inputs))


@pytest.mark.parametrize("name", FAMILIES)
def test_attn_implementation_switching(name, seed, monkeypatch):
    """The patched text config reports "fastvlm" (documented); set_attn_implementation
    switches a patched model to transformers' eager (the unpatched numbers, fastvlm unused)
    and back; unpatch restores the implementations from before patch()."""
    model, ref_model, base_model = models(name, seed)
    inputs = H.batch(H.samples(name, model, seed + 1, SAME_LENGTH))
    assert model.config.get_text_config()._attn_implementation == "fastvlm"
    vision = model.config.vision_config._attn_implementation
    assert vision == base_model.config.vision_config._attn_implementation  # the vision tower keeps its own
    calls = count_fastvlm_calls(monkeypatch)
    model.set_attn_implementation("eager")
    got = logits(model, inputs)
    assert not calls
    assert_close(got, logits(ref_model, cast(inputs, torch.float64)), logits(base_model, inputs), torch.float32,
                 name="eager logits")
    model.set_attn_implementation({"text_config": "fastvlm"})
    logits(model, inputs)
    assert calls
    unpatch(model)
    assert model.config.get_text_config()._attn_implementation == "eager"
