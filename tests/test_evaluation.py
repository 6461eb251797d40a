"""VQA evaluation: answer normalisation, greedy KV-cache answers equal a cache-free decode,
exact-match scoring per type, the token-weighted validation loss, result files."""
import json
from collections import Counter

import pytest
import torch

from fastvlm.data import encode_prompt, read_samples, synthetic_vqa, train_bpe_tokenizer
from fastvlm.models.llm import LLMConfig
from fastvlm.models.preprocess import ImagePreprocessor
from fastvlm.models.vision import VisionConfig
from fastvlm.models.vlm import VLM, VLMConfig
from fastvlm.train.evaluation import (
    evaluate,
    format_table,
    normalize_answer,
    read_question_types,
    validation_loss,
    write_results,
)
from tests.utils import assert_close

TEMPLATE = "literal"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    synthetic_vqa.write_dataset(root, n_train=0, n_val=14, seed=3, image_size=32, n_captions=0)
    samples = list(read_samples(root / "val.json"))
    texts = [t["value"] for s in samples for t in s.conversations]
    tok = train_bpe_tokenizer(texts * 3, vocab_size=300, min_frequency=1)
    return root, samples, tok


def _model(tok, seed, kind="causal"):
    torch.manual_seed(seed)
    vision = VisionConfig.clip(image_size=28, patch_size=14, hidden_size=32, num_layers=2, num_heads=4,
                               intermediate_size=64)
    llm = LLMConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return VLM(VLMConfig(vision=vision, llm=llm, image_token_id=tok.image_token_id, attention_kind=kind)).eval()


def _kwargs(root, model, **extra):
    return dict(image_root=root / "images", preprocessor=ImagePreprocessor.for_family("clip", 28), template=TEMPLATE,
                image_tokens=model.image_tokens, **extra)


@pytest.mark.parametrize("text,want", [
    ("Two.", "2"), ("the RED one!", "red 1"), ("  An apple, please ", "apple please"), ("3", "3"),
    ("twenty", "20"), ("1.5 m", "1.5 m"), ("left-top", "left top"), ("Image 1", "image 1"), ("", ""),
])
def test_normalize_answer(text, want):
    assert normalize_answer(text) == want


def _greedy_without_cache(model, tok, prompt, pixels, max_new, prefix_len):
    """The definition: re-run the whole sequence for every new token, take the argmax."""
    ids = list(prompt)
    out = []
    for _ in range(max_new):
        extra = {}
        if model.config.attention_kind == "prefix_lm":
            extra["prefix_mask"] = torch.arange(len(ids))[None] < prefix_len
        logits = model(torch.tensor([ids]), pixels, **extra)[0, -1]
        logits[model.config.image_token_id] = float("-inf")  # never generated (VLM.generate)
        nxt = int(logits.argmax())
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
        ids.append(nxt)
    return tok.decode(out, skip_special_tokens=True).split("\n", 1)[0]


@pytest.mark.parametrize("kind", ["causal", "image_bidirectional", "mmca", "prefix_lm"])
def test_answers_equal_a_cache_free_greedy_decode(data, kind, seed):
    root, samples, tok = data
    model = _model(tok, seed, kind).double()  # float64: no argmax near-tie can split the two paths
    kw = _kwargs(root, model)
    chosen = samples[:6] if kind == "causal" else samples[:3] + [s for s in samples if len(s.conversations) > 2][:1]
    result = evaluate(model, tok, chosen, batch_size=4, max_new_tokens=5, loss=False, **kw)
    for p in result["predictions"]:
        sample = next(s for s in samples if s.id == p["id"])
        gpt = [k for k, t in enumerate(sample.conversations) if t["from"] == "gpt"]
        prefix = sample.conversations[:gpt[p["turn"]]]
        prompt = encode_prompt(prefix, tok, TEMPLATE, model.image_tokens)
        first = len(encode_prompt(sample.conversations[:gpt[0]], tok, TEMPLATE, model.image_tokens))
        used = sum(t["value"].count("<image>") for t in prefix)
        pixels = kw["preprocessor"]([root / "images" / f for f in sample.images[:used]])
        assert p["prediction"] == _greedy_without_cache(model, tok, prompt, pixels, 5, first)
        assert p["answer"] == sample.conversations[gpt[p["turn"]]]["value"]


def test_scores_exact_match_per_type_against_chance(data, seed):
    root, samples, tok = data
    model = _model(tok, seed)
    meta = json.loads((root / "meta.json").read_text())
    chance = {t: v["chance"] for t, v in meta["splits"]["val"]["types"].items()}
    types = read_question_types(root / "val.json")
    single = [s for s in samples if len(types[s.id]) == 1]
    first = evaluate(model, tok, single, loss=False, max_new_tokens=4, question_types=types, **_kwargs(root, model))
    # Rewrite the references: every other one becomes the model's own answer, shouted and
    # punctuated (normalisation must still match it), the rest something it cannot say.
    edited, expected = [], {}
    for i, (s, p) in enumerate(zip(single, first["predictions"])):
        hit = i % 2 == 0
        answer = f"The {p['prediction'].upper()}!" if hit else "qqq nomatch"
        conv = [dict(t) for t in s.conversations]
        conv[-1]["value"] = answer
        edited.append({"id": s.id, "images": s.images, "conversations": conv, "question_types": types[s.id]})
        right, n = expected.get(types[s.id][0], (0, 0))
        expected[types[s.id][0]] = (right + hit, n + 1)
    result = evaluate(model, tok, edited, chance=chance, loss=False, max_new_tokens=4, **_kwargs(root, model))
    assert [p["prediction"] for p in result["predictions"]] == [p["prediction"] for p in first["predictions"]]
    for qtype, (right, n) in expected.items():
        row = result["per_type"][qtype]
        assert (row["correct"], row["n"]) == (right, n)
        assert row["accuracy"] == right / n and row["chance"] == chance[qtype]
        assert row["vs_chance"] == pytest.approx(right / n / chance[qtype])
    assert result["overall"] == sum(r for r, _ in expected.values()) / len(edited)
    # Every question turn counts, with its own type (multi-turn samples included).
    full = evaluate(model, tok, samples, loss=False, max_new_tokens=2, question_types=types, **_kwargs(root, model))
    counts = {}
    for s in samples:
        for t in types[s.id]:
            counts[t] = counts.get(t, 0) + 1
    assert {t: r["n"] for t, r in full["per_type"].items()} == counts


@pytest.mark.parametrize("kind", ["causal", "prefix_lm"])
def test_validation_loss_is_token_weighted_mean(data, kind, seed):
    root, samples, tok = data
    model = _model(tok, seed, kind)
    kw = _kwargs(root, model)
    got, n = validation_loss(model, tok, samples, batch_size=4, **kw)
    per_sample = [validation_loss(model, tok, [s], batch_size=1, **kw) for s in samples]
    model64 = model.double()
    per_sample64 = [validation_loss(model64, tok, [s], batch_size=1, **kw) for s in samples]
    assert n == sum(k for _, k in per_sample) == sum(k for _, k in per_sample64)
    want32 = torch.tensor(sum(v * k for v, k in per_sample) / n, dtype=torch.float64)
    want64 = torch.tensor(sum(v * k for v, k in per_sample64) / n, dtype=torch.float64)
    # Batching (right padding) must not change the loss: within fp32's own error of the fp64 value.
    assert_close(torch.tensor(got, dtype=torch.float64), want64, want32, dtype=torch.float32, name="val loss")
    if kind == "prefix_lm":  # the prefix mask reaches the model: the loss is not the causal one
        causal = _model(tok, seed).double()
        assert validation_loss(causal, tok, samples, batch_size=4, **kw)[0] != pytest.approx(want64.item(), rel=1e-9)
    else:
        result = evaluate(model.float(), tok, samples[:4], max_new_tokens=2, **kw)
        assert result["val_loss"] == pytest.approx(validation_loss(model, tok, samples[:4], **kw)[0], rel=1e-6)


def test_results_written_as_json_and_markdown(data, tmp_path, seed):
    root, samples, tok = data
    model = _model(tok, seed)
    meta = json.loads((root / "meta.json").read_text())
    chance = {t: v["chance"] for t, v in meta["splits"]["val"]["types"].items()}
    result = evaluate(model, tok, samples[:5], chance=chance, max_new_tokens=2,
                      question_types=read_question_types(root / "val.json"), **_kwargs(root, model))
    json_path, md_path = write_results(result, tmp_path, "instruct-step10")
    assert json.loads(json_path.read_text())["per_type"] == result["per_type"]
    md = md_path.read_text()
    assert format_table(result) in md and "| **overall** |" in md
    for qtype, row in result["per_type"].items():
        assert f"| {qtype} | {row['n']} | {row['accuracy']:.1%} | {row['chance']:.1%} |" in md


def test_bad_input_errors(data, seed):
    root, samples, tok = data
    model = _model(tok, seed)
    with pytest.raises(ValueError, match="samples"):
        evaluate(model, tok, [], **_kwargs(root, model))
    with pytest.raises(ValueError, match="max_new_tokens"):
        evaluate(model, tok, samples[:1], max_new_tokens=0, **_kwargs(root, model))
    with pytest.raises(ValueError, match="question_types"):
        evaluate(model, tok, samples[:1], question_types={samples[0].id: ["colour"] * 5}, **_kwargs(root, model))
    other = VLM(VLMConfig(vision=model.config.vision, llm=model.config.llm, image_token_id=1))
    with pytest.raises(ValueError, match="image token"):
        evaluate(other, tok, samples[:1], **_kwargs(root, model))
    with pytest.raises(ValueError, match="name"):
        write_results({"per_type": {}}, root, "a/b")


def test_cli_evaluates_a_training_run(tmp_path, capsys):
    """`fastvlm eval RUN` on a real (tiny, two-step) run: the table printed, JSON + markdown written."""
    from fastvlm.cli import main
    from fastvlm.train.checkpoint import complete_checkpoints
    from fastvlm.train.recipe import parse_recipe
    from fastvlm.train.trainer import train
    from tests.train_recipes import tiny_raw

    raw = tiny_raw(steps=2)
    raw["stages"] = raw["stages"][2:]  # align + instruct
    raw["run"]["evaluate"] = False
    run = tmp_path / "run"
    train(parse_recipe(raw), run, progress=False, echo=lambda *_: None)
    assert main(["eval", str(run), "--max-new-tokens", "2"]) == 0
    assert "| **overall** |" in capsys.readouterr().out
    result = json.loads((run / "eval" / "eval-validation-latest.json").read_text())
    val = json.loads((run / "data" / "val.json").read_text())[:raw["data"]["eval_samples"]]
    turns = [t for r in val for t in r["question_types"]]
    assert result["n"] == len(turns) == sum(row["n"] for row in result["per_type"].values())
    assert set(result["per_type"]) == set(turns)  # eval_inputs passes the split's per-turn types
    # Chance is the majority answer's share over exactly the questions scored (every turn of
    # the evaluated samples), not the split-wide last-turn level of meta.json.
    for qtype, row in result["per_type"].items():
        answers = Counter(normalize_answer(turn["value"]) for r in val
                          for t, turn in zip(r["question_types"], [c for c in r["conversations"] if c["from"] == "gpt"])
                          if t == qtype)
        assert row["chance"] == max(answers.values()) / sum(answers.values())
    assert result["val_loss"] > 0 and (run / "eval" / "eval-validation-latest.md").is_file()
    checkpoint = complete_checkpoints(run / "checkpoints")[-1]
    assert main(["eval", str(checkpoint), "--no-loss", "--max-new-tokens", "2"]) == 0
    assert (run / "eval" / f"eval-validation-{checkpoint.name}.json").is_file()
