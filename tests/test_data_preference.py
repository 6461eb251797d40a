"""Preference pairs: every record format, the shared-prompt item token for token against the
prompt + each answer encoded alone, skips and errors, collation of several pairs per row, the
loader, and the synthetic VQA pairs."""
import json
import os

import pytest
import torch

from fastvlm.data import read_samples, synthetic_vqa, train_bpe_tokenizer
from fastvlm.data.collate import PackedCollator, PaddedCollator
from fastvlm.data.conversation import encode_conversation
from fastvlm.data.dataset import make_loader
from fastvlm.data.preference import PreferenceDataset, PreferencePair, encode_pair, read_preference
from fastvlm.data.sampler import PackedBatchSampler
from fastvlm.models.llm import shift_labels
from fastvlm.models.preprocess import ImagePreprocessor
from fastvlm.ops import linear_logprob
from tests.conftest import BASE_SEED
from tests.test_data_templates import CHATML, SPECIALS
from tests.test_data_tokenizer import word_tokenizer

IMAGE_SIZE, IMAGE_TOKENS = 28, 4


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    """A small synthetic dataset, its preference pairs and a tokenizer trained on its text.
    Module-scoped (one write for the checks), fresh per run unless FASTVLM_TEST_SEED replays it."""
    seed = BASE_SEED if BASE_SEED is not None else int.from_bytes(os.urandom(4), "little")
    print(f"dataset seed={seed}")
    splits = synthetic_vqa.write_dataset(tmp_path_factory.mktemp("vqa"), 24, 6, seed=seed, image_size=32,
                                         multi_turn_fraction=0.5)
    pairs = synthetic_vqa.write_preference_pairs(splits, "train", seed=5)
    texts = [t["value"] for s in read_samples(splits.train) for t in s.conversations]
    return splits, pairs, train_bpe_tokenizer(texts, vocab_size=300, seed=seed % 1000)


@pytest.fixture(scope="module")
def chatml(vqa):
    """A word-level tokenizer with a ChatML chat template (answers end ``<|im_end|>\\n``)."""
    _, pairs, _ = vqa
    texts = [t["value"] for r in json.loads(pairs.read_text()) for t in r["conversations"]]
    texts += [a for r in json.loads(pairs.read_text()) for a in (r["chosen"], r["rejected"])]
    return word_tokenizer(texts + ["user assistant"], specials=SPECIALS, chat_template=CHATML)


def _write(path, records, lines=False):
    path.write_text("\n".join(json.dumps(r) for r in records) if lines else json.dumps(records))
    return path


def _dataset(vqa, path=None, tokenizer=None, template="llava_v1", **kw):
    splits, pairs, bpe = vqa
    return PreferenceDataset(read_preference(path or pairs), splits.image_folder, tokenizer or bpe, template,
                             IMAGE_TOKENS, ImagePreprocessor.for_family("clip", IMAGE_SIZE), **kw)


# ---- formats ------------------------------------------------------------------------------------
LLAVA = {"id": "a", "image": "x.png", "chosen": "Red.", "rejected": "Blue.",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}]}
MESSAGES = {"id": "a", "images": ["x.png"], "chosen": {"role": "assistant", "content": "Red."},
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}],
            "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat colour?"}]}]}
TRL = {"id": "a", "images": ["x.png"], "prompt": [{"role": "user", "content": [
           {"type": "image"}, {"type": "text", "text": "\nWhat colour?"}]}],
       "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
       "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]}
TRL_STRINGS = {"id": "a", "images": ["x.png"], "prompt": "<image>\nWhat colour?", "chosen": "Red.",
               "rejected": "Blue."}


@pytest.mark.parametrize("record", [LLAVA, MESSAGES, TRL, TRL_STRINGS], ids=["llava", "messages", "trl", "trl-str"])
@pytest.mark.parametrize("lines", [False, True])
def test_every_format_reads_to_the_same_pair(tmp_path, record, lines):
    pairs = read_preference(_write(tmp_path / ("p.jsonl" if lines else "p.json"), [record, record], lines))
    want = PreferencePair("a", ["x.png"], [{"from": "human", "value": "<image>\nWhat colour?"}], "Red.", "Blue.")
    assert len(pairs) == 2 and pairs[1] == want


def test_multi_turn_prompt_and_system_turn(tmp_path):
    record = {"id": 7, "image": "x.png", "chosen": "4", "rejected": "3", "conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image>\nColour?"},
        {"from": "gpt", "value": "Red."}, {"from": "human", "value": "How many?"}]}
    (pair,) = read_preference(_write(tmp_path / "p.json", [record]))
    assert pair.id == "7" and len(pair.prompt) == 4 and pair.prompt[-1]["value"] == "How many?"


@pytest.mark.parametrize("change,reason", [
    (lambda r: r["conversations"].append({"from": "gpt", "value": "x"}), "must end on a user turn"),
    (lambda r: r.pop("chosen"), "missing 'chosen'"),
    (lambda r: r.update(rejected={"role": "user", "content": "x"}), "'rejected': expected a string or one assistant"),
    (lambda r: r.update(rejected=[{"role": "assistant", "content": "x"}] * 2), "'rejected': expected a string"),
    (lambda r: r.update(chosen={"role": "assistant", "content": [{"type": "image"}]}), "cannot hold an image"),
    (lambda r: r.update(chosen="<image> red"), "cannot hold an image"),
    (lambda r: r.pop("image"), "1 <image> tag"),
    (lambda r: r.update(prompt="What?"), "exactly one of 'prompt'"),
    (lambda r: r.pop("conversations"), "exactly one of 'prompt'"),
    (lambda r: r.update(image="../x.png"), "escapes the image folder"),
])
def test_bad_records_name_the_file_and_sample(tmp_path, change, reason):
    record = json.loads(json.dumps(LLAVA))
    change(record)
    pairs = read_preference(_write(tmp_path / "p.jsonl", [LLAVA, record], lines=True))
    assert pairs[0].chosen == "Red."
    with pytest.raises(ValueError, match=rf"p\.jsonl:2: sample 'a': .*{reason[:30]}".replace("(", r"\(")):
        pairs[1]


# ---- encoding -----------------------------------------------------------------------------------
def _alone(pair, answer, tokenizer, template):
    return encode_conversation([*pair.prompt, {"from": "gpt", "value": answer}], tokenizer, template, IMAGE_TOKENS,
                               last_turn_only=True)


@pytest.mark.parametrize("template", ["llava_v1", "literal", "chat_template"])
def test_item_is_prompt_plus_each_answer_token_for_token(vqa, chatml, template):
    """The shared part plus branch b, in order, is exactly the prompt + that answer encoded
    alone: tokens, labels (the answer and its end-of-turn token), positions 0.. and next-token
    targets; the answers' log-prob tokens (targets counted per sequence) are that answer's
    supervised tokens, nothing else."""
    dataset = _dataset(vqa, template=template, tokenizer=chatml if template == "chat_template" else None)
    for i in range(len(dataset)):
        item, pair = dataset[i], dataset.samples[i]
        shared = item["prefix_len"]
        assert bool((item["branch_ids"][:shared] == 0).all()) and item["branch_ids"][shared] == 1
        for branch, answer in ((1, pair.chosen), (2, pair.rejected)):
            alone = _alone(pair, answer, dataset.tokenizer, template)
            view = (item["branch_ids"] == 0) | (item["branch_ids"] == branch)
            assert item["input_ids"][view].tolist() == alone.input_ids
            assert item["labels"][view].tolist() == alone.labels
            assert item["position_ids"][view].tolist() == list(range(len(alone)))
            assert item["targets"][view].tolist() == alone.labels[1:] + [-100]
            counted = (item["sequence_ids"] == branch - 1) & (item["targets"] != -100)
            assert int(counted.sum()) == sum(label != -100 for label in alone.labels)
            assert bool((item["sequence_ids"][item["branch_ids"] == branch] == branch - 1).all())
        assert alone.labels[-1] == dataset.tokenizer.eos_token_id if template == "llava_v1" else True
        assert bool((item["sequence_ids"][:shared] == -1).all()) and bool((item["targets"][:shared] == -100).all())
        assert len(item["input_ids"]) == dataset.lengths()[i]
        assert item["pixel_values"].shape[0] == len(pair.images) == len(item["image_spans"])
        for start, n in item["image_spans"]:
            assert start + n <= shared and bool((item["input_ids"][start:start + n] == dataset.tokenizer.image_token_id)
                                                .all())


def test_plain_template_cannot_share_a_prompt_ending_on_its_image(vqa):
    _, _, tokenizer = vqa
    pair = PreferencePair("c", ["x.png"], [{"from": "human", "value": "<image>"}], "A red circle.", "A cross.")
    with pytest.raises(ValueError, match="sample 'c': template 'plain': the prompt ends on an image token"):
        encode_pair(pair, tokenizer, "plain", IMAGE_TOKENS)


# ---- skips --------------------------------------------------------------------------------------
def test_bad_pairs_are_counted_skips_or_errors(vqa, tmp_path):
    splits, pairs, _ = vqa
    records = json.loads(pairs.read_text())[:4]
    records[0]["rejected"] = records[0]["chosen"]
    records[1]["image" if "image" in records[1] else "images"] = "nowhere.png" if "image" in records[1] else [
        "nowhere.png", "nowhere2.png"]
    path = _write(tmp_path / "bad.json", records)
    lengths = _dataset(vqa, path).lengths()
    dataset = _dataset(vqa, path, max_length=lengths[2] - 1)
    got = [dataset[i] for i in range(4)]
    assert got[0] is None and got[1] is None and got[2] is None and (got[3] is None) == (lengths[3] >= lengths[2])
    # a pair too long is skipped before its images are read
    too_long = [i for i in (1, 2, 3) if lengths[i] >= lengths[2]]
    assert dict(dataset.skipped.counts) == {"identical_answers": 1, "too_long": len(too_long),
                                            **({} if 1 in too_long else {"missing": 1})}
    assert dataset.skipped.examples["identical_answers"] == [records[0]["id"]]
    lenient = _dataset(vqa, path)
    assert lenient[1] is None and dict(lenient.skipped.counts) == {"missing": 1}
    assert lenient.skipped.examples["missing"][0].endswith("nowhere.png")
    strict = _dataset(vqa, path, strict=True)
    with pytest.raises(ValueError, match=f"sample '{records[0]['id']}': chosen and rejected are the same"):
        strict[0]
    with pytest.raises(ValueError, match="nowhere"):
        strict[1]
    with pytest.raises(ValueError, match=f"sample '{records[2]['id']}': prompt and answers are .* max_length 5"):
        _dataset(vqa, path, strict=True, max_length=5)[2]


# ---- collation ----------------------------------------------------------------------------------
class _NoAttention(torch.nn.Module):
    """hidden_t = f(token_t, position_t): the same for a token wherever the row puts it, so a
    packed shared-prompt batch and each answer run alone must give the same log-probs (the
    attention layout is tested with the layout; this checks ids, positions, targets, sequences)."""

    def __init__(self, vocab, width=16):
        super().__init__()
        self.tokens, self.positions = torch.nn.Embedding(vocab, width), torch.nn.Embedding(512, width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, ids, positions):
        return torch.tanh(self.tokens(ids) + self.positions(positions))


@pytest.mark.parametrize("packed", [True, False])
def test_collated_pairs_score_as_each_answer_alone(vqa, packed):
    dataset = _dataset(vqa)
    items = [dataset[i] for i in range(5)]
    pad = dataset.tokenizer.pad_token_id if dataset.tokenizer.pad_token_id is not None else 0
    collate = PackedCollator(pad, 3 * max(len(i["input_ids"]) for i in items)) if packed else PaddedCollator(pad)
    batch = collate(items)
    assert batch["num_sequences"] == 10 and batch["num_samples"] == 5
    assert batch["input_ids"].shape[0] == (2 if packed else 5)
    # targets are the labels shifted within each sample (what the LM's own loss shift gives)
    assert torch.equal(batch["targets"][:, :-1], shift_labels(batch["labels"], batch["segment_ids"]))
    assert bool((batch["branch_ids"][batch["segment_ids"] < 0] == 0).all())
    model = _NoAttention(len(dataset.tokenizer)).double().requires_grad_(False)
    hidden = model(batch["input_ids"], batch["position_ids"])
    logp, counts = linear_logprob(hidden, model.head, batch["targets"], batch["sequence_ids"], 10)
    order = [dataset.samples[item["index"]] for item in items]
    want = {}
    for p, item_id in enumerate(batch["ids"]):
        pair = next(s for s in order if s.id == item_id)
        for k, answer in enumerate((pair.chosen, pair.rejected)):
            alone = _alone(pair, answer, dataset.tokenizer, "llava_v1")
            ids = torch.tensor(alone.input_ids)
            h = model(ids, torch.arange(len(ids)))
            want[2 * p + k] = linear_logprob(h, model.head, torch.tensor(alone.labels[1:] + [-100]),
                                             torch.zeros(len(ids), dtype=torch.long), 1)
    # the same float64 terms summed in other orders: each of a sum's n tokens' log-probs is
    # off by ~(width + vocab) roundings of its size, the sum by n more
    width, vocab = model.head.in_features, model.head.out_features
    for s in range(10):
        n = int(counts[s])
        assert n == int(want[s][1][0]) and n > 0
        bound = 2 * n * (width + vocab) * torch.finfo(torch.float64).eps * abs(float(want[s][0][0]))
        assert abs(float(logp[s] - want[s][0][0])) <= bound


def test_plain_and_shared_prompt_items_do_not_mix(vqa):
    dataset = _dataset(vqa)
    item = dataset[0]
    plain = {k: item[k] for k in ("input_ids", "labels", "pixel_values", "image_spans", "id")}
    with pytest.raises(ValueError, match="^items: shared-prompt items"):
        PaddedCollator(0)([item, plain])
    broken = {**item, "targets": item["targets"][:-1]}
    with pytest.raises(ValueError, match="^items: .* expected targets of the shape"):
        PaddedCollator(0)([broken])


def test_loader_gathers_skips_and_packs_rows(vqa):
    dataset = _dataset(vqa)
    dataset.samples = list(dataset.samples)
    dataset.samples[3] = PreferencePair(dataset.samples[3].id, dataset.samples[3].images, dataset.samples[3].prompt,
                                        "same", "same")
    budget = 3 * max(dataset.lengths())
    sampler = PackedBatchSampler(dataset.lengths(), budget, seed=0)
    loader = make_loader(dataset, sampler, PackedCollator(0, budget))
    seen = set()
    for batch in loader:
        assert batch["input_ids"].shape[1] == budget and batch["num_sequences"] == 2 * batch["num_samples"]
        seen.update(batch["ids"])
    assert len(seen) == len(dataset) - 1 and dict(loader.skipped.counts) == {"identical_answers": 1}
    assert dataset.has_images() == [True] * len(dataset)


# ---- synthetic pairs ----------------------------------------------------------------------------
def test_synthetic_pairs(vqa, tmp_path):
    splits, path, _ = vqa
    records, pairs = json.loads(splits.train.read_text()), json.loads(path.read_text())
    assert path == splits.train.with_name("train_preference.json") and len(pairs) == len(records)
    for record, pair in zip(records, pairs):
        assert pair["conversations"] == record["conversations"][:-1] and pair["chosen"] == record["answer"]
        assert pair["rejected"] != pair["chosen"]
        assert pair["rejected"] in synthetic_vqa.ANSWERS[record["question_type"]]
        if record["question_type"] == "count":
            assert abs(int(pair["rejected"]) - int(pair["chosen"])) == 1
        assert {k: record[k] for k in ("image", "images") if k in record} == \
            {k: pair[k] for k in ("image", "images") if k in pair}
    before = path.read_bytes()
    assert synthetic_vqa.write_preference_pairs(splits, "train", seed=5).read_bytes() == before  # deterministic
    others = [json.loads(synthetic_vqa.write_preference_pairs(splits, "train", seed=s).read_text()) for s in (6, 7, 8)]
    assert any([p["rejected"] for p in other] != [p["rejected"] for p in pairs] for other in others)
    synthetic_vqa.write_preference_pairs(splits, "train", seed=5)
    val = synthetic_vqa.write_preference_pairs(splits, "val")
    assert len(read_preference(val)) == len(json.loads(splits.val.read_text()))
    # the dataset's own files are what write_dataset writes without pairs (make demo's data unchanged)
    plain = synthetic_vqa.write_dataset(tmp_path / "plain", 24, 6, seed=splits.meta["params"]["seed"], image_size=32,
                                        multi_turn_fraction=0.5)
    assert plain.train.read_bytes() == splits.train.read_bytes()
    assert sorted(p.name for p in plain.root.glob("*.json")) == ["captions.json", "meta.json", "train.json",
                                                                 "val.json"]
    with pytest.raises(ValueError, match="^split"):
        synthetic_vqa.write_preference_pairs(splits, "captions")
