"""fastvlm.data.hf_processor / hf_collate: samples through each patched family's own
processor and chat template (tiny tokenizers and processors built in tests/hf_processors.py):
label masks token for token against the render, train_on_prompt, Qwen's pixel budget,
packing / padding, and every refusal naming its sample or key."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from fastvlm.data import PackedBatchSampler, make_loader
from fastvlm.data.formats import read_samples
from fastvlm.data.hf_collate import HFPackedCollator, HFPaddedCollator, concat_padded
from fastvlm.data.hf_processor import HFProcessorDataset, RenderError, to_messages
from fastvlm.data.images import open_image
from fastvlm.train.hf_build import RunProcessor
from fastvlm.train.hf_evaluation import prompt_text
from tests import hf_patch_models as H
from tests import hf_processors as P

FAMILIES = [n for n in H.FAMILIES if P.buildable(n)]  # those tests/hf_processors.py builds
EOT = {"llava": "</s>", "llava_next": "</s>", "gemma3": "<end_of_turn>", "paligemma": "<eos>",
       "qwen2_vl": "<|im_end|>", "qwen2_5_vl": "<|im_end|>", "qwen3_vl": "<|im_end|>",
       "idefics3": "<end_of_utterance>", "smolvlm": "<end_of_utterance>", "llava_onevision": "<|im_end|>"}
TRIMS = {"gemma3"}  # templates that trim message text
IMAGE_SIZES = {"a.png": (56, 84), "b.png": (112, 56), "c.png": (40, 40), "big.png": (224, 224)}
RECORDS = [
    {"id": "one", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is the color?"}, {"from": "gpt", "value": "Red then blue."}]},
    {"id": "two", "images": ["b.png", "c.png"], "conversations": [
        {"from": "system", "value": "Be short."}, {"from": "human", "value": "<image>\nCompare <image> please."},
        {"from": "gpt", "value": "The first."}, {"from": "human", "value": "And then?"},
        {"from": "gpt", "value": " the other one "}]},
    {"id": "parts", "messages": [
        {"role": "user", "content": [{"type": "image", "image": "big.png"}, {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": "A noisy square, then more."}]},
    {"id": "text", "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi there"}]},
]


def answers(record) -> list[str]:
    turns = record.get("conversations") or record["messages"]
    return [t.get("value", t.get("content")) for t in turns if t.get("from", t.get("role")) in ("gpt", "assistant")]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A data file, its images, and a checkpoint directory per family (model, processor)."""
    root = tmp_path_factory.mktemp("hfdata")
    P.write_images(root / "img", IMAGE_SIZES, seed=0)
    (root / "data.json").write_text(json.dumps(RECORDS))
    for name in FAMILIES:
        P.save_family(name, 0, root / name)
    return root


def dataset(root, name, **kwargs):
    return HFProcessorDataset(read_samples(root / "data.json"), root / "img", root / name, **kwargs)


def usable(name):
    """Records the family's processor takes (PaliGemma's refuses a sample without an image)."""
    return [i for i, r in enumerate(RECORDS) if name != "paligemma" or r["id"] != "text"]


def supervised_runs(tok, ids, labels) -> list[str]:
    """The text of each contiguous run of supervised tokens."""
    runs, current = [], []
    for token, label in zip(tok.convert_ids_to_tokens(ids.tolist()), labels.tolist()):
        if label != -100:
            current.append(token)
        elif current:
            runs.append("".join(current))
            current = []
    return runs + (["".join(current)] if current else [])


@pytest.mark.parametrize("name", list(H.FAMILIES))
def test_every_patched_family_has_a_processor(name):
    """Each family the patch supports gets a processor with the tiny model's image token (the
    per-family tests below run on them); one whose class needs a module this environment
    lacks is skipped, naming it."""
    if P.missing(name):
        pytest.skip(f"{name}: its processor needs {P.missing(name)} (requirements/test.txt), not installed here")
    assert P.buildable(name), f"{name}: tests/hf_processors.py builds no processor for it"
    proc = P.build_processor(name)
    assert proc.tokenizer.convert_tokens_to_ids(proc.tokenizer.image_token) == H.IMAGE


@pytest.mark.parametrize("name", FAMILIES)
def test_label_mask_token_for_token(root, name):
    """Supervised: exactly each answer as the template renders it plus the end-of-turn token;
    labels equal the ids there; images, prompts, system text, template text are never labels.
    The ids are the processor's own (image placeholders expanded by it)."""
    ds = dataset(root, name)
    tok = ds.processor.tokenizer
    for i in usable(name):
        item = ds[i]
        sample = ds.samples[i]
        text, _ = ds.render(sample)
        expected = ds.process(text, [open_image(root / "img" / f) for f in sample.images])["input_ids"][0]
        assert torch.equal(item["input_ids"], expected)
        ids, labels = item["input_ids"], item["labels"]
        sup = labels != -100
        assert torch.equal(labels[sup], ids[sup])
        want = [(a.strip() if name in TRIMS else a) + EOT[name] for a in answers(RECORDS[i])]
        assert supervised_runs(tok, ids, labels) == want, (name, RECORDS[i]["id"])
        assert not (ids[sup] == H.IMAGE).any()
        assert item["num_images"] == len(sample.images) and len(item["image_files"]) == len(sample.images)
        assert int((ids == H.IMAGE).sum()) > 0 or not sample.images


# llava-1.5-hf's template shape: an answer ends with ' ' and the next turn, no end-of-turn token
LLAVA_NO_EOS = P.LLAVA_TEMPLATE.replace("{{ part['text'] }}{% endfor %}</s>", "{{ part['text'] }}{% endfor %} ")


def test_answer_without_end_of_turn_gets_the_eos(root):
    """A template that renders no special token after an answer: the tokenizer's EOS is
    inserted after each answer and supervised (the model learns to stop), with one warning;
    a template with its own end of turn is left as it renders."""
    assert "</s>" not in LLAVA_NO_EOS
    ds = dataset(root, "llava", chat_template=LLAVA_NO_EOS)
    tok = ds.processor.tokenizer
    with pytest.warns(UserWarning, match="EOS '</s>' is added after each such answer"):
        items = [ds[i] for i in usable("llava")]
    for i, item in zip(usable("llava"), items):
        text, spans = ds.render(ds.samples[i])
        assert text.count("</s>") == len(answers(RECORDS[i])) == len(spans)
        assert all(text.startswith("</s>", end) for _, end in spans)
        assert supervised_runs(tok, item["input_ids"], item["labels"]) == [a + "</s>" for a in answers(RECORDS[i])]
    own = dataset(root, "llava")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text, _ = own.render(own.samples[1])
    assert text == own._render(to_messages(own.samples[1].conversations))


def test_inserted_eos_is_a_label_with_train_on_prompt_when_it_is_the_pad(root):
    """train_on_prompt drops padding ids from the labels, but not an answer's end of turn
    that has the pad id (a tokenizer whose pad is its EOS)."""
    ds = dataset(root, "llava", chat_template=LLAVA_NO_EOS, train_on_prompt=True)
    tok = ds.processor.tokenizer
    tok.pad_token = tok.eos_token
    with pytest.warns(UserWarning, match="EOS"):
        item = ds[0]
    ids, labels = item["input_ids"], item["labels"]
    eos = ids == tok.eos_token_id
    assert int(eos.sum()) == len(answers(RECORDS[0])) and torch.equal(labels[eos], ids[eos])


def test_evaluation_prompts_end_earlier_answers_as_training_does(root):
    """The prompt of a later question holds the earlier answers as training renders them: with
    the EOS where the template ends an answer with none, unchanged where it has its own."""
    turns = RECORDS[1]["conversations"][:4]  # system, question, answer, the next question
    own = RunProcessor.load(root / "llava")
    plain = own.processor.apply_chat_template(to_messages(turns), tokenize=False, add_generation_prompt=True)
    assert prompt_text(own, turns) == plain and plain.count("</s>") == 1
    bare = RunProcessor(own.processor, LLAVA_NO_EOS)
    text = prompt_text(bare, turns)
    assert text.count("</s>") == 1 and "The first.</s>" in text and text.endswith("ASSISTANT:")
    assert prompt_text(bare, turns[:2]) == own.processor.apply_chat_template(
        to_messages(turns[:2]), chat_template=LLAVA_NO_EOS, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("name", ["qwen2_vl", "gemma3", "paligemma"])
def test_train_on_prompt_labels_everything_but_images(root, name):
    ds = dataset(root, name, train_on_prompt=True)
    image_ids = ds.image_ids
    for i in usable(name):
        item = ds[i]
        ids, labels = item["input_ids"], item["labels"]
        is_image = torch.isin(ids, torch.tensor(sorted(image_ids)))
        want = torch.where(is_image, -100, ids)
        want[0] = -100  # nothing in the sample predicts its first token
        assert torch.equal(labels, want)


def test_paligemma_token_types_mark_the_answer_as_suffix(root):
    """PaliGemma's processor takes a suffix: token_type_ids 0 on the prefix (image, prompt),
    1 from the first answer token on."""
    item = dataset(root, "paligemma")[0]
    types, labels = item["token_inputs"]["token_type_ids"], item["labels"]
    first = int((labels != -100).nonzero()[0])
    assert types[:first].eq(0).all() and types[first:].eq(1).all()


def test_qwen_pixel_budget_sets_image_token_counts(root):
    """Qwen's dynamic resolution: each image's token count is its grid's (t*h*w / merge^2),
    varying per image, and a smaller max_pixels gives fewer."""
    counts = {}
    for max_pixels in (112 * 112, 56 * 56):
        ds = dataset(root, "qwen2_vl", max_pixels=max_pixels)
        item = ds[2]  # one 224x224 image
        grid = item["vision_inputs"]["image_grid_thw"]
        n = int((item["input_ids"] == H.IMAGE).sum())
        assert n == int(grid.prod()) // 4
        assert item["vision_inputs"]["pixel_values"].shape[0] == int(grid.prod())
        counts[max_pixels] = n
    assert counts[56 * 56] < counts[112 * 112]
    two = dataset(root, "qwen2_vl")[1]["vision_inputs"]["image_grid_thw"]
    assert two[0].tolist() != two[1].tolist()  # two sizes, two grids
    with pytest.raises(ValueError, match=r"data.min_pixels \(20000\) is above data.max_pixels \(3136\)"):
        dataset(root, "qwen2_vl", min_pixels=20000, max_pixels=56 * 56)
    with pytest.raises(ValueError, match="data.min_pixels / data.max_pixels: CLIPImageProcessor"):
        dataset(root, "llava", max_pixels=56 * 56)


def test_no_chat_template_is_an_error_unless_given(root, tmp_path):
    bare = tmp_path / "bare"
    P.build_processor("qwen2_vl", chat_template=False).save_pretrained(bare)
    with pytest.raises(ValueError, match="processor: Qwen2VLProcessor has no chat template; give one"):
        HFProcessorDataset(read_samples(root / "data.json"), root / "img", bare)
    ds = HFProcessorDataset(read_samples(root / "data.json"), root / "img", bare, chat_template=P.QWEN_TEMPLATE)
    assert torch.equal(ds[0]["labels"], dataset(root, "qwen2_vl")[0]["labels"])


@pytest.mark.parametrize("template, match", [
    # drops the system message: its text cannot be found
    (P.QWEN_TEMPLATE.replace("{% for message in messages %}",
                             "{% for message in messages if message['role'] != 'system' %}"),
     "did not render each message's text once"),
    # changes the answers' text
    (P.QWEN_TEMPLATE.replace("{{ part['text'] }}", "{{ part['text'] | upper }}"), "cannot be aligned to its messages"),
    # renders no image placeholder
    (P.QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", ""),
     r"the chat template rendered 0 image placeholder\(s\) '<\|image_pad\|>' for 1 image\(s\)"),
    # the answer's first characters merge with the template's last one ("t" + "he...")
    (P.QWEN_TEMPLATE.replace("<|im_start|>{{ message['role'] }}\n", "<|im_start|>{{ message['role'] }}\nt"),
     "straddles the boundary of an assistant message"),
])
def test_render_that_cannot_be_aligned_names_the_sample(root, template, match):
    records = [{"id": "odd", "image": "a.png", "conversations": [
        {"from": "system", "value": "Be short."}, {"from": "human", "value": "<image>Hi?"},
        {"from": "gpt", "value": "here"}]}]
    path = root / "odd.json"
    path.write_text(json.dumps(records))
    ds = HFProcessorDataset(read_samples(path), root / "img", root / "qwen2_vl", chat_template=template)
    with pytest.raises(RenderError, match=f"sample 'odd': .*{match}"):
        ds[0]


def test_skips_are_counted_by_reason_or_raised_when_strict(root, tmp_path):
    """A missing image file, an image the processor rejects (PaliGemma without one), a sample
    over max_length: None, counted with the sample named; strict=True raises naming it."""
    records = RECORDS + [{"id": "lost", "image": "nope.png", "conversations": RECORDS[0]["conversations"]}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    limit = len(dataset(root, "paligemma")[0]["input_ids"])  # the shortest; "two" and "parts" are longer
    ds = HFProcessorDataset(read_samples(path), root / "img", root / "paligemma", max_length=limit)
    items = [ds[i] for i in range(len(records))]
    assert [it is None for it in items] == [False, True, True, True, True]
    counts = ds.skipped.as_dict()
    assert counts["counts"] == {"missing": 1, "rejected": 1, "too_long": 2}
    assert counts["examples"]["rejected"] == ["text"] and sorted(counts["examples"]["too_long"]) == ["parts", "two"]
    strict = HFProcessorDataset(read_samples(path), root / "img", root / "paligemma", max_length=limit, strict=True)
    with pytest.raises(ValueError, match=f"sample 'two': [0-9]+ tokens, more than max_length {limit}"):
        strict[1]
    with pytest.raises(ValueError, match="sample 'text': the processor rejected it: ValueError"):
        strict[3]
    with pytest.raises(ValueError, match="nope.png: missing image"):
        strict[4]


def test_lengths_estimate_text_and_each_image(root):
    """Estimates: the processor's count per image at its size plus calibrated text, within
    a few tokens of the true lengths on this data; has_images per sample."""
    ds = dataset(root, "qwen2_vl")
    true = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    est = ds.lengths()
    assert ds.has_images() == [True, True, True, False]
    assert all(abs(e - t) <= 0.25 * t for e, t in zip(est, true)), (est, true)
    assert est[2] - est[0] >= 16 - 6  # 224x224 at max 112x112 pixels: 16 tokens; 56x84: 6


@pytest.mark.parametrize("name", ["qwen2_vl", "llava_next", "gemma3"])
def test_image_token_estimate_without_the_processors_count(root, name, monkeypatch):
    """A processor that cannot count its image tokens from sizes: the count is measured on a
    blank image of each size, the same as the processor's own count where it has one."""
    ds = dataset(root, name)
    own = [ds._image_tokens(s) for s in ds.samples]
    monkeypatch.delattr(type(ds.processor), "_get_num_multimodal_tokens")
    measured = [ds._image_tokens(s) for s in ds.samples]
    true = [int(torch.isin(ds[i]["input_ids"], torch.tensor(sorted(ds.image_ids))).sum()) for i in range(len(ds))]
    assert measured == true
    # Gemma 3's processor names <start_of_image> its image token: counted among the image ids
    # (one per image), not in its own count of soft tokens
    wrappers = [len(s.images) if name == "gemma3" else 0 for s in ds.samples]
    assert own == [t - w for t, w in zip(true, wrappers)]


@pytest.mark.parametrize("name", [n for n in ("llava_onevision", "smolvlm", "idefics3") if n in FAMILIES])
def test_image_token_estimate_is_the_processors_expansion(root, name):
    """The image part of the length estimates is exactly what the processor puts in place of
    a sample's image placeholders (its ids less the render's tokens, one placeholder token
    per image), on samples of one image and of two of different sizes: LLaVA-OneVision gives
    each image of a multi-image sample its base tile only, SmolVLM's count holds its tile tags
    and newlines (as Idefics3's own count does)."""
    ds = dataset(root, name)
    assert sorted(len(s.images) for s in ds.samples) == [0, 1, 1, 2]
    for i, sample in enumerate(ds.samples):
        text, _ = ds.render(sample)
        rendered = len(ds.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        assert ds._image_tokens(sample) == len(ds[i]["input_ids"]) - rendered + len(sample.images), sample.id


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_rows_hold_whole_samples(root, name):
    """One row of `budget` tokens: each sample's tokens, labels and per-token inputs in
    order, segment ids and positions restarting per sample, padding at the tail; vision
    inputs concatenated in sample order; padded rows carry the same per sample."""
    ds = dataset(root, name)
    items = [ds[i] for i in usable(name)]
    budget = sum(len(it["input_ids"]) for it in items) + 5
    pad = ds.processor.tokenizer.pad_token_id
    packed = HFPackedCollator(pad, budget)(items)
    padded = HFPaddedCollator(pad, pad_to_multiple_of=8)(items)
    assert packed["input_ids"].shape == (1, budget) and packed["overflow_rows"] == 0
    assert padded["input_ids"].shape[1] % 8 == 0
    start = 0
    for s, item in enumerate(items):
        n = len(item["input_ids"])
        for batch, r, cols in ((packed, 0, slice(start, start + n)), (padded, s, slice(0, n))):
            assert torch.equal(batch["input_ids"][r, cols], item["input_ids"])
            assert torch.equal(batch["labels"][r, cols], item["labels"])
            assert batch["segment_ids"][r, cols].eq(0 if batch is padded else s).all()
            assert torch.equal(batch["position_ids"][r, cols], torch.arange(n))
            for key, value in item["token_inputs"].items():
                assert torch.equal(batch[key][r, cols], value)
        start += n
    assert packed["segment_ids"][0, start:].eq(-1).all() and packed["labels"][0, start:].eq(-100).all()
    assert packed["input_ids"][0, start:].eq(pad).all() and packed["attention_mask"][0, start:].eq(0).all()
    for key in items[0]["vision_inputs"]:
        parts = [it["vision_inputs"][key] for it in items if key in it["vision_inputs"]]
        assert torch.equal(packed[key], concat_padded(parts, key)) and torch.equal(padded[key], packed[key])
    assert packed["sample_images"].tolist() == [it["num_images"] for it in items]
    assert packed["image_files"] == [f for it in items for f in it["image_files"]]
    assert packed["supervised_tokens"] == sum(int((it["labels"] != -100).sum()) for it in items)


def test_collator_refusals_and_overflow(root):
    ds = dataset(root, "llava")
    items = [ds[i] for i in range(len(ds))]
    longest = max(len(it["input_ids"]) for it in items)
    with pytest.raises(ValueError, match=f"items: sample 'two' has {longest} tokens, more than the row budget 50"):
        HFPackedCollator(0, 50)(items)
    batch = HFPackedCollator(0, longest)(items)  # planned as one row, true lengths need more
    assert batch["input_ids"].shape[0] == 1 + batch["overflow_rows"] > 1
    assert sorted(batch["ids"]) == sorted(r["id"] for r in RECORDS)
    with pytest.raises(ValueError, match="budget: expected a positive int"):
        HFPackedCollator(0, 0)
    with pytest.raises(ValueError, match="pad_to_multiple_of: expected a positive int"):
        HFPaddedCollator(0, pad_to_multiple_of=0)


def test_concat_padded_pads_other_dims():
    a, b = torch.randn(1, 2, 3), torch.randn(2, 1, 3)
    out = concat_padded([a, b], "pixel_values")
    assert out.shape == (3, 2, 3) and torch.equal(out[0], a[0]) and torch.equal(out[1:, :1], b)
    assert out[1:, 1:].eq(0).all()
    with pytest.raises(ValueError, match="pixel_values: samples disagree on its number of dimensions"):
        concat_padded([a, torch.randn(2, 3)], "pixel_values")


def test_loader_packs_and_gathers_skips(root, tmp_path):
    """Through make_loader with the packed sampler: every usable sample once, the skipped
    one counted."""
    ds = dataset(root, "paligemma", max_length=200)
    sampler = PackedBatchSampler(ds.lengths(), 200, seed=0)
    loader = make_loader(ds, sampler, HFPackedCollator(ds.processor.tokenizer.pad_token_id, 200))
    seen = [i for batch in loader for i in batch["ids"]]
    assert sorted(seen) == sorted(RECORDS[i]["id"] for i in usable("paligemma"))
    assert loader.skipped.as_dict()["counts"] == {"rejected": 1}


def test_image_the_processor_rejects_and_tag_count_mismatch(root, tmp_path):
    """An image Qwen's resize refuses (aspect ratio over 200, let through open_image's own
    check): a counted skip naming the sample, or the processor's error with strict=True. More
    <image> tags than images: the file's sample is refused naming it."""
    P.write_images(tmp_path / "img", {"thin.png": (2100, 10)}, seed=0)
    records = [{"id": "thin", "image": "thin.png", "conversations": RECORDS[0]["conversations"]},
               {"id": "tags", "image": "thin.png", "conversations": [
                   {"from": "human", "value": "<image><image>Hi?"}, {"from": "gpt", "value": "Yes."}]}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    checks = {"max_aspect": 1000.0}
    ds = HFProcessorDataset(read_samples(path), tmp_path / "img", root / "qwen2_vl", image_checks=checks)
    assert ds[0] is None and ds.skipped.as_dict()["examples"] == {"rejected": ["thin"]}
    strict = HFProcessorDataset(read_samples(path), tmp_path / "img", root / "qwen2_vl", image_checks=checks,
                                strict=True)
    with pytest.raises(ValueError, match="sample 'thin': the processor rejected it: ValueError: .*aspect ratio"):
        strict[0]
    with pytest.raises(ValueError, match="sample 'tags': 2 <image> tag\\(s\\) but 1 image\\(s\\)"):
        ds[1]


def test_processor_that_changes_an_answer_token_is_an_error(root):
    """Tokens the processor inserts are never labels; a supervised token it changed makes the
    labels unalignable: an error naming the sample and the token."""
    ds = dataset(root, "llava")
    sample = ds.samples[0]
    text, spans = ds.render(sample)
    ids = ds.process(text, [open_image(root / "img" / "a.png")])["input_ids"][0].tolist()
    labels, _ = ds.labels(sample, text, spans, ids)
    inserted = ids[:3] + [H.IMAGE] * 5 + ids[3:]  # more tokens from the processor: shifted, never labels
    shifted, _ = ds.labels(sample, text, spans, inserted)
    assert shifted[:3].tolist() == labels[:3].tolist() and (shifted[3:8] == -100).all()
    assert shifted[8:].tolist() == labels[3:].tolist()
    answer = int((labels != -100).nonzero()[0][0])
    changed = ids[:answer] + [ids[answer] + 1] + ids[answer + 1:]
    with pytest.raises(RenderError, match="sample 'one': the processor changed supervised token 'R'"):
        ds.labels(sample, text, spans, changed)
