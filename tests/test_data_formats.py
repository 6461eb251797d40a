"""Conversation files: LLaVA JSON lists, JSON-lines, the `messages` form; laziness; bad input."""
import json
import random

import pytest

from fastvlm.data import Sample, estimate_length, read_samples
from fastvlm.data.formats import JSONLinesSamples, parse_record

LLAVA = [
    {"id": "single", "image": "a/1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]},
    {"id": 7, "images": ["x.png", "y.png"], "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Image 1: <image> Image 2: <image> Same?"}, {"from": "gpt", "value": "No."},
        {"from": "human", "value": "Why?"}, {"from": "gpt", "value": "Colours."}]},
    {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
]
MESSAGES = {"id": "msg", "images": ["m.png"], "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is it?"}]},
    {"role": "assistant", "content": "A dog."}]}


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_read_llava_and_messages_forms(tmp_path, fmt):
    records = [*LLAVA, MESSAGES]
    path = (write_json if fmt == "json" else write_jsonl)(tmp_path / f"data.{fmt}", records)
    samples = read_samples(path)
    assert len(samples) == 4
    assert samples[0] == Sample("single", ["a/1.jpg"], LLAVA[0]["conversations"])
    assert samples[1].id == "7" and samples[1].images == ["x.png", "y.png"] and len(samples[1].conversations) == 5
    assert samples[2].images == []
    assert samples[-1] == Sample("msg", ["m.png"], [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image>\nWhat is it?"},
        {"from": "gpt", "value": "A dog."}])
    assert [s.id for s in samples[1:3]] == ["7", "text"]
    with pytest.raises(IndexError):
        samples[4]


def test_image_paths_in_content_parts(tmp_path):
    record = {"id": "parts", "messages": [
        {"role": "user", "content": [{"type": "image", "image": "p/q.png"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "This."}]}
    assert read_samples(write_json(tmp_path / "d.json", [record]))[0].images == ["p/q.png"]


def test_to_record_round_trips(seed):
    rng = random.Random(seed)
    for record in LLAVA:
        sample = parse_record(record, "f", 0)
        assert parse_record(sample.to_record(), "f", 0) == sample
    n = rng.randint(2, 5)
    sample = Sample("s", [f"{i}.png" for i in range(n)], [{"from": "human", "value": "<image>" * n},
                                                           {"from": "gpt", "value": "ok"}])
    assert parse_record(json.loads(json.dumps(sample.to_record())), "f", 0) == sample


def test_json_lines_are_read_lazily(tmp_path, seed):
    """Only the line of the sample asked for is parsed: a bad line fails when read, not before,
    and names its line number."""
    rng = random.Random(seed)
    n = rng.randint(5, 30)
    bad = rng.randrange(n)
    lines = [json.dumps({**LLAVA[0], "id": f"s{i}"}) for i in range(n)]
    lines[bad] = '{"id": "broken", "conversations": ['
    (tmp_path / "d.jsonl").write_text("\n\n".join(lines) + "\n")  # blank lines are skipped
    samples = read_samples(tmp_path / "d.jsonl")
    assert isinstance(samples, JSONLinesSamples) and len(samples) == n
    for i in rng.sample([i for i in range(n) if i != bad], min(4, n - 1)):
        assert samples[i].id == f"s{i}"
    with pytest.raises(ValueError, match=rf"d\.jsonl:{2 * bad + 1}: .*malformed JSON line"):
        samples[bad]
    with pytest.raises(ValueError, match="broken|malformed"):
        samples.validate()


def test_json_list_validates_each_record_when_read(tmp_path):
    records = [LLAVA[0], {"id": "late", "conversations": [{"from": "robot", "value": "x"}]}]
    samples = read_samples(write_json(tmp_path / "d.json", records))
    assert len(samples) == 2 and samples[0].id == "single"
    with pytest.raises(ValueError, match="'late'.*unknown role 'robot'"):
        samples[1]


def _conv(*turns):
    return [{"from": f, "value": v} for f, v in turns]


# (name, file text or records, reason the error must give)
BAD = [
    ("not an object", ["just a string"], r"'#1'.*expected a JSON object"),
    ("no conversations", [{"id": "a"}], r"'a'.*exactly one of 'conversations' or 'messages'"),
    ("both forms", [{"id": "a", "conversations": [], "messages": []}], r"'a'.*exactly one of"),
    ("empty", [{"id": "a", "conversations": []}], r"'a'.*non-empty list"),
    ("unknown role", [{"id": "a", "conversations": _conv(("human", "q"), ("bot", "x"))}],
     r"'a'.*turn 1: unknown role 'bot'"),
    ("unknown messages role", [{"id": "a", "messages": [{"role": "tool", "content": "x"}]}],
     r"'a'.*unknown role 'tool'"),
    ("not alternating", [{"id": "a", "conversations": _conv(("human", "q"), ("human", "q"), ("gpt", "x"))}],
     r"'a'.*turn 1: turns not alternating: expected 'gpt', got 'human'"),
    ("starts with gpt", [{"id": "a", "conversations": _conv(("gpt", "x"), ("human", "q"))}],
     r"'a'.*turn 0: turns not alternating: expected 'human'"),
    ("ends with human", [{"id": "a", "conversations": _conv(("human", "q"), ("gpt", "x"), ("human", "q"))}],
     r"'a'.*must end with a gpt turn"),
    ("late system", [{"id": "a", "conversations": _conv(("human", "q"), ("system", "s"), ("gpt", "x"))}],
     r"'a'.*system turn is allowed only first"),
    ("value not text", [{"id": "a", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]}],
     r"'a'.*'value' must be a string"),
    ("bad part", [{"id": "a", "messages": [{"role": "user", "content": [{"type": "audio"}]},
                                           {"role": "assistant", "content": "x"}]}], r"'a'.*content part"),
    ("too few tags", [{"id": "a", "images": ["1.png", "2.png"], "conversations": _conv(("human", "<image> q"),
                                                                                      ("gpt", "x"))}],
     r"'a'.*1 <image> tag\(s\) but 2 image\(s\)"),
    ("tag without image", [{"id": "a", "conversations": _conv(("human", "<image> q"), ("gpt", "x"))}],
     r"'a'.*1 <image> tag\(s\) but 0 image\(s\)"),
    ("image without tag", [{"id": "a", "image": "1.png", "conversations": _conv(("human", "q"), ("gpt", "x"))}],
     r"'a'.*0 <image> tag\(s\) but 1 image\(s\)"),
    ("tag in answer", [{"id": "a", "image": "1.png", "conversations": _conv(("human", "q"), ("gpt", "<image>"))}],
     r"'a'.*<image> in a gpt turn"),
    ("dotdot escape", [{"id": "a", "image": "imgs/../../etc/passwd", "conversations": _conv(("human", "<image>"),
                                                                                            ("gpt", "x"))}],
     r"'a'.*escapes the image folder"),
    ("absolute path", [{"id": "a", "image": "/etc/passwd", "conversations": _conv(("human", "<image>"),
                                                                                ("gpt", "x"))}],
     r"'a'.*escapes the image folder"),
    ("windows drive", [{"id": "a", "image": "C:\\x.png", "conversations": _conv(("human", "<image>"),
                                                                              ("gpt", "x"))}],
     r"'a'.*escapes the image folder"),
    ("image and images", [{"id": "a", "image": "1.png", "images": ["1.png"],
                           "conversations": _conv(("human", "<image>"), ("gpt", "x"))}],
     r"'a'.*both 'image' and 'images'"),
    ("empty path", [{"id": "a", "image": "", "conversations": _conv(("human", "<image>"), ("gpt", "x"))}],
     r"'a'.*non-empty string"),
]


@pytest.mark.parametrize("name,content,reason", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_bad_input_names_file_sample_and_reason(tmp_path, name, content, reason, fmt):
    (write_json if fmt == "json" else write_jsonl)(tmp_path / f"bad.{fmt}", [LLAVA[0], *content])
    with pytest.raises(ValueError, match=rf"bad\.{fmt}.*{reason}"):
        samples = read_samples(tmp_path / f"bad.{fmt}")
        samples.validate()


@pytest.mark.parametrize("text,reason", [('[{"id": "a", ', "malformed JSON"), ('{"id": "a"}', "expected a JSON list"),
                                         ('"samples"', "expected a JSON list"), ("[1, 2", "malformed JSON")])
def test_bad_json_file(tmp_path, text, reason):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(ValueError, match=rf"bad\.json: {reason}"):
        read_samples(tmp_path / "bad.json")


def test_json_lines_under_a_json_name(tmp_path):
    write_jsonl(tmp_path / "lines.json", LLAVA)
    assert [s.id for s in read_samples(tmp_path / "lines.json")] == ["single", "7", "text"]


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="no conversation file"):
        read_samples(tmp_path / "nope.json")


def test_estimate_length(seed):
    rng = random.Random(seed)
    n, text = rng.randint(1, 4), "word " * rng.randint(1, 200)
    sample = Sample("s", ["i.png"] * n, [{"from": "human", "value": "<image>" * n + text},
                                         {"from": "gpt", "value": text}])
    image_tokens = rng.randint(1, 1000)
    assert estimate_length(sample, image_tokens) - estimate_length(sample, 0) == n * image_tokens
    assert estimate_length(sample, image_tokens, overhead=35) == estimate_length(sample, image_tokens) + 35
    longer = Sample("s", sample.images, [sample.conversations[0], {"from": "gpt", "value": text * 2}])
    assert estimate_length(longer, image_tokens) > estimate_length(sample, image_tokens)
    # The tags themselves count as images, not as text.
    bare = Sample("s", [], [{"from": "human", "value": text}, {"from": "gpt", "value": text}])
    assert estimate_length(sample, 0) == estimate_length(bare, 0)
    with pytest.raises(ValueError, match="image_tokens"):
        estimate_length(sample, -1)
