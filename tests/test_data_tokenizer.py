"""Tokenizers: the built-in byte-level BPE, loading from directories / objects, the image token."""
import json
import random
import re

import pytest
from tokenizers import AddedToken, Regex, models, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

from fastvlm.data import Tokenizer, load_tokenizer, train_bpe_tokenizer

# A word-level tokenizer whose pieces a test can predict by hand: runs of whitespace, words,
# single punctuation marks; special tokens first.
PIECE = r"\s+|\w+|[^\w\s]"


def word_backend(texts, specials=("<s>", "</s>", "<image>")) -> RustTokenizer:
    """A WordLevel tokenizer over the pieces of ``texts`` (special tokens excluded)."""
    vocab = {"[UNK]": 0}
    for s in specials:
        vocab.setdefault(s, len(vocab))
    split = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")") if specials else None
    for text in texts:
        for chunk in (split.split(text) if split else [text]):
            if chunk in specials:
                continue
            for m in re.finditer(PIECE, chunk):
                vocab.setdefault(m.group(), len(vocab))
    tok = RustTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE), behavior="isolated")
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def word_tokenizer(texts, specials=("<s>", "</s>", "<image>"), **named) -> Tokenizer:
    named = {"bos_token": "<s>", "eos_token": "</s>", **named}
    return Tokenizer(word_backend(texts, specials), **named)


def random_texts(rng: random.Random, n: int = 60) -> list[str]:
    words = ["red", "circle", "blue", "square", "what", "colour", "is", "the", "how", "many", "left", "right",
             "Question:", "Answer:", "image", "über", "naïve", "日本", "🙂"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice([".", "?", "\n"])
            for _ in range(n)]


def test_builtin_bpe_is_deterministic_and_byte_exact(seed):
    texts = random_texts(random.Random(seed))
    a = train_bpe_tokenizer(texts, vocab_size=400, seed=seed)
    b = train_bpe_tokenizer(list(texts), vocab_size=400, seed=seed)
    assert a.backend.to_str() == b.backend.to_str()
    assert (a.bos_token_id, a.eos_token_id, a.pad_token_id, a.image_token_id) == (0, 1, 2, 3)
    # Byte level: any text round-trips, including characters never seen in training.
    text = "Unseen: Ωμέγα ☃ " + texts[0] + " <image> tail\t\n"
    ids, offsets = a.encode(text)
    assert a.decode(ids) == text
    assert ids.count(a.image_token_id) == 1
    assert all(0 <= s <= e <= len(text) for s, e in offsets)
    assert a.vocab_size == a.backend.get_vocab_size(with_added_tokens=True) <= 400


def test_builtin_bpe_is_the_same_in_another_process(seed, tmp_path):
    """The Rust side hashes with per-process random keys; the trained vocabulary must not depend on them."""
    import hashlib
    import os
    import subprocess
    import sys
    texts = random_texts(random.Random(seed), n=120)
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    code = ("import hashlib, json, sys; from fastvlm.data import train_bpe_tokenizer; "
            "t = train_bpe_tokenizer(json.load(open(sys.argv[1])), vocab_size=500, seed=int(sys.argv[2])); "
            "print(hashlib.sha256(t.backend.to_str().encode()).hexdigest())")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path / "texts.json"), str(seed)], env=env,
                           capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    here = hashlib.sha256(train_bpe_tokenizer(texts, vocab_size=500, seed=seed).backend.to_str().encode()).hexdigest()
    assert other == here


def test_builtin_bpe_rejects_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(["a b c"], vocab_size=100)
    with pytest.raises(ValueError, match="texts"):
        train_bpe_tokenizer(["", None], vocab_size=300)


def test_save_and_reload(tmp_path, seed):
    texts = random_texts(random.Random(seed))
    tok = train_bpe_tokenizer(texts, vocab_size=350, seed=seed)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save(tmp_path / "tok")
    back = load_tokenizer(tmp_path / "tok")
    assert back.encode(texts[1]) == tok.encode(texts[1])
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id, back.image_token_id, back.vocab_size) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.image_token_id, tok.vocab_size)
    assert back.chat_template == tok.chat_template
    # transformers reads the same directory (offline: a local path).
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert hf(texts[1], add_special_tokens=False)["input_ids"] == tok.encode(texts[1])[0]
    assert hf.convert_tokens_to_ids("<image>") == tok.image_token_id


def test_image_token_added_when_absent_without_touching_the_source():
    backend = word_backend(["a b"], specials=("<s>", "</s>"))
    before = backend.get_vocab_size(with_added_tokens=True)
    tok = load_tokenizer(backend, image_token="<img>")
    assert backend.get_vocab_size(with_added_tokens=True) == before  # the caller's tokenizer is unchanged
    assert tok.image_token_id == before and tok.vocab_size == before + 1
    ids, offsets = tok.encode("a <img> b<img>")
    assert ids.count(tok.image_token_id) == 2
    assert [offsets[i] for i, t in enumerate(ids) if t == tok.image_token_id] == [(2, 7), (9, 14)]
    # Already present: kept, not duplicated.
    again = load_tokenizer(tok.backend, image_token="<img>")
    assert again.image_token_id == tok.image_token_id and again.vocab_size == tok.vocab_size


def test_image_token_in_vocab_but_not_added_is_matched_whole():
    backend = RustTokenizer(models.WordLevel({"[UNK]": 0, "<image>": 1, "<": 2, "image": 3, ">": 4, "a": 5},
                                             unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    assert backend.encode("a <image>").ids == [5, 2, 3, 4]
    tok = load_tokenizer(backend)
    assert tok.image_token_id == 1 and tok.vocab_size == 6
    assert tok.encode("a <image>")[0] == [5, 1]


def test_transformers_tokenizer_object():
    from transformers import PreTrainedTokenizerFast
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    hf = PreTrainedTokenizerFast(tokenizer_object=word_backend(["x y z"], specials=("<s>", "</s>")),
                                 bos_token="<s>", eos_token="</s>", chat_template=template)
    n = len(hf)
    tok = load_tokenizer(hf)
    assert len(hf) == n  # not mutated
    assert tok.image_token_id == n and tok.bos_token_id == hf.bos_token_id and tok.eos_token_id == hf.eos_token_id
    assert tok.chat_template == template and tok.pad_token_id is None
    assert tok.encode("x y")[0] == hf("x y", add_special_tokens=False)["input_ids"]


def test_load_tokenizer_bad_input(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"empty has no tokenizer\.json"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read .*corrupt.*tokenizer\.json"):
        load_tokenizer(tmp_path / "corrupt")
    good = tmp_path / "badconfig"
    good.mkdir()
    (good / "tokenizer.json").write_text(word_backend(["a"]).to_str())
    (good / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"malformed .*tokenizer_config\.json"):
        load_tokenizer(good)
    (good / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<bos>"}}))
    with pytest.raises(ValueError, match=r"bos_token: '<bos>' is not in the tokenizer's vocabulary"):
        load_tokenizer(good)
    with pytest.raises(ValueError, match="image_token"):
        load_tokenizer(word_backend(["a"]), image_token="")
    with pytest.raises(ValueError, match="no Rust backend"):
        load_tokenizer(object())
