"""Prompt templates and label masks, token by token, against renderings written by hand.

Each case gives a conversation and the exact string its template must render, with the
supervised parts marked ``[[...]]``. The expected tokens come from the test's own word-level
tokenizer, whose pieces (whitespace runs, words, punctuation, special tokens) are predictable
from the string; a byte-level BPE then checks that the supervised tokens decode to exactly the
marked text.
"""
import itertools
import random
import re

import pytest

from fastvlm.data import (
    IGNORE_INDEX,
    ChatTemplate,
    LiteralTemplate,
    SampleTooLong,
    Tokenizer,
    encode_conversation,
    encode_prompt,
    train_bpe_tokenizer,
)
from tests.test_data_tokenizer import PIECE, word_backend, word_tokenizer

VICUNA = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions.")
CHATML = ("{{ bos_token }}{% for m in messages %}"
          "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIALS = ("<s>", "</s>", "<image>", "<|im_start|>", "<|im_end|>")


def H(text):
    return {"from": "human", "value": text}


def G(text):
    return {"from": "gpt", "value": text}


ONE_IMAGE = [H("What is this?\n<image>"), G("A red circle.")]
TWO_IMAGES_MULTI_TURN = [H("Image 1: <image> and Image 2: <image> Which has more circles?"), G("Image 2"),
                         H("And squares?"), G("Image 1")]
TEXT_ONLY = [{"from": "system", "value": "Be brief."}, H("Hi there"), G("Hello"), H("Bye?"), G("Bye.")]

# (template, conversation, hand-written rendering with [[supervised]] parts)
CASES = {
    "literal-image": ("literal", ONE_IMAGE, "<s>Question: What is this?\n<image>\nAnswer:[[ A red circle.\n]]"),
    "literal-multi": ("literal", TWO_IMAGES_MULTI_TURN,
                      ("<s>Question: Image 1: <image> and Image 2: <image> Which has more circles?\nAnswer:"
                      "[[ Image 2\n]]Question: And squares?\nAnswer:[[ Image 1\n]]")),
    "literal-text": ("literal", TEXT_ONLY,
                     "<s>Be brief.\nQuestion: Hi there\nAnswer:[[ Hello\n]]Question: Bye?\nAnswer:[[ Bye.\n]]"),
    # LLaVA's preprocess_v1: the image moves to the start of its turn, followed by "\n".
    "llava_v1-image": ("llava_v1", ONE_IMAGE,
                       f"<s>{VICUNA} USER: <image>\nWhat is this? ASSISTANT:[[ A red circle.</s>]]"),
    # Tags removed in place, only the ends stripped: the double space stays (as in LLaVA).
    "llava_v1-multi": ("llava_v1", TWO_IMAGES_MULTI_TURN,
                       (f"<s>{VICUNA} USER: <image>\n<image>\nImage 1:  and Image 2:  Which has more circles? "
                       "ASSISTANT:[[ Image 2</s>]]USER: And squares? ASSISTANT:[[ Image 1</s>]]")),
    "llava_v1-text": ("llava_v1", TEXT_ONLY,
                      "<s>Be brief. USER: Hi there ASSISTANT:[[ Hello</s>]]USER: Bye? ASSISTANT:[[ Bye.</s>]]"),
    # LLaVA's stage 1: only the image of the human turn, then the caption and "\n".
    "plain-image": ("plain", ONE_IMAGE, "<s><image>[[A red circle.\n]]"),
    "plain-multi": ("plain", [H("<image> <image> two"), G("Two pictures.")], "<s><image><image>[[Two pictures.\n]]"),
    "plain-text": ("plain", [H("ignored"), G("Just text.")], "<s>[[Just text.\n]]"),
    "chat-image": (ChatTemplate(CHATML), ONE_IMAGE,
                   ("<s><|im_start|>user\nWhat is this?\n<image><|im_end|>\n<|im_start|>assistant\n"
                   "[[A red circle.<|im_end|>]]\n")),
    "chat-multi": (ChatTemplate(CHATML), TWO_IMAGES_MULTI_TURN,
                   ("<s><|im_start|>user\nImage 1: <image> and Image 2: <image> Which has more circles?<|im_end|>\n"
                   "<|im_start|>assistant\n[[Image 2<|im_end|>]]\n<|im_start|>user\nAnd squares?<|im_end|>\n"
                   "<|im_start|>assistant\n[[Image 1<|im_end|>]]\n")),
    "chat-text": (ChatTemplate(CHATML), TEXT_ONLY,
                  ("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                  "<|im_start|>assistant\n[[Hello<|im_end|>]]\n<|im_start|>user\nBye?<|im_end|>\n"
                  "<|im_start|>assistant\n[[Bye.<|im_end|>]]\n")),
}


def unmark(marked: str):
    """(text, supervised character spans) of a ``[[...]]``-marked string."""
    text, spans, pos = "", [], 0
    for m in re.finditer(r"\[\[(.*?)\]\]", marked, flags=re.DOTALL):
        text += marked[pos:m.start()]
        spans.append((len(text), len(text) + len(m.group(1))))
        text += m.group(1)
        pos = m.end()
    return text + marked[pos:], spans


def expected_encoding(tok: Tokenizer, text: str, spans, image_tokens: int):
    """Ids and labels by the word tokenizer's own rule: special tokens, then PIECE pieces."""
    vocab = tok.backend.get_vocab()
    split = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")
    ids, labels, pos = [], [], 0
    for chunk in split.split(text):
        pieces = [chunk] if chunk in SPECIALS else [m.group() for m in re.finditer(PIECE, chunk)]
        for piece in pieces:
            start = text.index(piece, pos)
            pos = start + len(piece)
            supervised = any(s <= start and pos <= e for s, e in spans)
            n = image_tokens if piece == "<image>" else 1
            ids += [vocab[piece]] * n
            labels += [vocab[piece] if supervised and piece != "<image>" else IGNORE_INDEX] * n
    return ids, labels


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer([unmark(m)[0] for _, _, m in CASES.values()], specials=SPECIALS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_label_mask_token_by_token(case, tok, seed):
    template, conv, marked = CASES[case]
    image_tokens = random.Random(seed).randint(1, 5)
    text, spans = unmark(marked)
    ids, labels = expected_encoding(tok, text, spans, image_tokens)
    enc = encode_conversation(conv, tok, template, image_tokens=image_tokens)
    assert enc.input_ids == ids
    assert enc.labels == labels
    assert enc.num_images == text.count("<image>")
    assert enc.prefix_len == next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    spans_tok = enc.turn_spans
    assert spans_tok[0][0] == 0 and spans_tok[-1][1] == len(ids)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans_tok))
    assert len(spans_tok) == sum(t["from"] == "gpt" for t in conv)


@pytest.mark.parametrize("case", sorted(CASES))
def test_label_mask_with_byte_level_bpe(case, seed):
    """Merges cross word boundaries here; supervised tokens must still decode to exactly the
    marked text, and the whole sequence to the rendering."""
    template, conv, marked = CASES[case]
    text, spans = unmark(marked)
    rng = random.Random(seed)
    corpus = [text] * 3 + ["".join(rng.choice("abc ASSISTANT:.\n") for _ in range(40)) for _ in range(20)]
    bpe = train_bpe_tokenizer(corpus, vocab_size=rng.randint(300, 420), seed=seed)
    if not isinstance(template, str):
        bpe.backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
        bpe.bos_token, bpe.bos_token_id = "<s>", bpe.backend.token_to_id("<s>")
    bpe_text = text.replace("</s>", bpe.eos_token)
    enc = encode_conversation(conv, bpe, template, image_tokens=3)
    collapsed = [t for i, t in enumerate(enc.input_ids)
                 if t != bpe.image_token_id or _run_start(enc.input_ids, i, t, 3)]
    assert bpe.decode(collapsed) == bpe_text
    runs, current = [], []
    for token, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(bpe.decode(current))
            current = []
    runs += [bpe.decode(current)] if current else []
    assert runs == [text[s:e] for s, e in spans]


def _run_start(ids, i, t, n):
    """Position i starts a new image run of length n (runs of adjacent images touch)."""
    j = i
    while j > 0 and ids[j - 1] == t:
        j -= 1
    return (i - j) % n == 0


def test_chat_template_renders_as_transformers_does(tok):
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend, bos_token="<s>", eos_token="</s>",
                                 chat_template=CHATML)
    messages = [{"role": {"human": "user", "gpt": "assistant", "system": "system"}[t["from"]], "content": t["value"]}
                for t in TEXT_ONLY]
    rendered = ChatTemplate(CHATML).render(TEXT_ONLY, tok).text
    assert rendered == hf.apply_chat_template(messages, tokenize=False)
    # The template's block tags on their own lines: trim_blocks / lstrip_blocks as transformers.
    spaced = "{{ bos_token }}\n{% for m in messages %}\n    {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}\n"
    hf.chat_template = spaced
    assert ChatTemplate(spaced).render(TEXT_ONLY, tok).text == hf.apply_chat_template(messages, tokenize=False)


GENERATION = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
              "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
              "{{ '\\n' }}{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_chat_template_generation_tags_match_transformers_assistant_mask(tok):
    """transformers' ``return_assistant_tokens_mask`` reads the same {% generation %} blocks."""
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend, bos_token="<s>", eos_token="</s>",
                                 chat_template=GENERATION)
    messages = [{"role": {"human": "user", "gpt": "assistant", "system": "system"}[t["from"]], "content": t["value"]}
                for t in TEXT_ONLY]
    ref = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    enc = encode_conversation(TEXT_ONLY, tok, ChatTemplate(GENERATION))
    assert enc.input_ids == list(ref["input_ids"])
    assert [int(label != IGNORE_INDEX) for label in enc.labels] == list(ref["assistant_masks"])
    # Same spans as the prefix rule on this template (trailing newline outside the block).
    plain = encode_conversation(TEXT_ONLY, tok, ChatTemplate(CHATML))
    assert (enc.input_ids, enc.labels, enc.turn_spans) == (plain.input_ids, plain.labels, plain.turn_spans)
    one_block = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    with pytest.raises(ValueError, match=r"5 \{% generation %\} block\(s\) for 2 assistant turn"):
        encode_conversation(TEXT_ONLY, tok, ChatTemplate(one_block))


def test_templates_and_tokenizers_pickle(tok):
    """DataLoader workers may receive them pickled (spawn)."""
    import pickle
    template = ChatTemplate(CHATML)
    first = encode_conversation(TWO_IMAGES_MULTI_TURN, tok, template, image_tokens=2)
    template2, tok2 = pickle.loads(pickle.dumps((template, tok)))
    again = encode_conversation(TWO_IMAGES_MULTI_TURN, tok2, template2, image_tokens=2)
    assert (again.input_ids, again.labels) == (first.input_ids, first.labels)


def test_chat_template_from_tokenizer_and_messages_form(tok):
    with_template = Tokenizer(tok.backend, bos_token="<s>", eos_token="</s>", chat_template=CHATML)
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?\n"}, {"type": "image"}]},
                {"role": "assistant", "content": "A red circle."}]
    a = encode_conversation(messages, with_template, "chat_template", image_tokens=2)
    b = encode_conversation(ONE_IMAGE, tok, ChatTemplate(CHATML), image_tokens=2)
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
    with pytest.raises(ValueError, match="no chat_template"):
        encode_conversation(ONE_IMAGE, tok, "chat_template")


def test_chat_template_that_rewrites_earlier_turns_is_an_error(tok):
    counting = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="does not render as a prefix"):
        encode_conversation(TEXT_ONLY, tok, ChatTemplate(counting))
    with pytest.raises(ValueError, match="rendering failed: no system"):
        encode_conversation(TEXT_ONLY, tok, ChatTemplate(
            "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"))
    with pytest.raises(ValueError, match="cannot compile"):
        encode_conversation(TEXT_ONLY, tok, ChatTemplate("{% for %}"))
    dropping = "{% for m in messages %}{% if m['role'] != 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match="rendered 0 image tag"):
        encode_conversation(ONE_IMAGE, tok, ChatTemplate(dropping))


def _join(tok, ids):
    """The word tokenizer's pieces concatenated (its decode would put spaces between words)."""
    return "".join(tok.backend.id_to_token(i) for i in ids)


def test_train_on_prompt_and_last_turn_only(tok):
    conv = TWO_IMAGES_MULTI_TURN
    enc = encode_conversation(conv, tok, "literal", image_tokens=2, train_on_prompt=True)
    bos = tok.bos_token_id
    assert enc.labels == [IGNORE_INDEX if t in (bos, tok.image_token_id) else t for t in enc.input_ids]
    last = encode_conversation(conv, tok, "literal", image_tokens=2, last_turn_only=True)
    full = encode_conversation(conv, tok, "literal", image_tokens=2)
    start = last.turn_spans[-1][0]
    assert last.labels[:start] == [IGNORE_INDEX] * start and last.labels[start:] == full.labels[start:]
    assert last.prefix_len > full.prefix_len
    both = encode_conversation(conv, tok, "literal", image_tokens=2, train_on_prompt=True, last_turn_only=True)
    assert both.labels[:start] == [IGNORE_INDEX] * start and both.labels[start:] == enc.labels[start:]


def test_max_length_keeps_whole_turns(tok):
    conv = TWO_IMAGES_MULTI_TURN
    full = encode_conversation(conv, tok, "llava_v1", image_tokens=4)
    first_end = full.turn_spans[0][1]
    cut = encode_conversation(conv, tok, "llava_v1", image_tokens=4, max_length=len(full) - 1)
    assert cut.input_ids == full.input_ids[:first_end] and cut.labels == full.labels[:first_end]
    assert cut.turn_spans == full.turn_spans[:1] and cut.num_images == 2
    same = encode_conversation(conv, tok, "llava_v1", image_tokens=4, max_length=len(full))
    assert same.input_ids == full.input_ids
    with pytest.raises(SampleTooLong, match="max_length"):
        encode_conversation(conv, tok, "llava_v1", image_tokens=4, max_length=first_end - 1)
    with pytest.raises(SampleTooLong):  # the only supervised turn would be cut off
        encode_conversation(conv, tok, "llava_v1", image_tokens=4, max_length=first_end, last_turn_only=True)


@pytest.mark.parametrize("template", ["literal", "llava_v1", "plain", "chat"])
def test_prompt_is_the_training_prefix(template, tok):
    template = ChatTemplate(CHATML) if template == "chat" else template
    conv = ONE_IMAGE if template == "plain" else TWO_IMAGES_MULTI_TURN
    enc = encode_conversation(conv, tok, template, image_tokens=3)
    start = max(i for i, label in enumerate(enc.labels) if label == IGNORE_INDEX and
                i + 1 < len(enc.labels) and enc.labels[i + 1] != IGNORE_INDEX) + 1
    assert encode_prompt(conv, tok, template, image_tokens=3) == enc.input_ids[:start]
    assert encode_prompt(conv[:-1], tok, template, image_tokens=3) == enc.input_ids[:start]


def test_literal_role_words_are_configurable(tok):
    enc = encode_conversation(TEXT_ONLY[1:3], tok, LiteralTemplate(user="USER:", assistant="ASSISTANT:"))
    assert _join(tok, enc.input_ids) == "<s>USER: Hi there\nASSISTANT: Hello\n"
    assert _join(tok, [t for t in enc.labels if t != IGNORE_INDEX]) == " Hello\n"


@pytest.mark.parametrize("case", sorted(c for c in CASES if c.startswith(("llava_v1", "plain"))))
def test_label_mask_with_sentencepiece_style_bpe(case):
    """A Metaspace ("▁word") BPE as SentencePiece models use: the space before an answer is
    inside its first token ("▁A"), yet the supervised tokens are exactly the answers."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers, trainers
    template, conv, marked = CASES[case]
    text, spans = unmark(marked)
    backend = RustTokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>", "<image>"]
    corpus = [unmark(m)[0] for _, _, m in CASES.values()] * 3
    backend.train_from_iterator(corpus, trainer=trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                                                    show_progress=False))
    sp = Tokenizer(backend, bos_token="<s>", eos_token="</s>")
    enc = encode_conversation(conv, sp, template, image_tokens=2)
    pieces = [backend.id_to_token(t) for t in enc.labels if t != IGNORE_INDEX]
    answers = "".join(text[s:e] for s, e in spans)
    assert "".join(pieces).replace("\u2581", " ").strip() == answers.strip()
    assert all(t in backend.get_vocab() for t in pieces)


def test_answer_end_merged_into_the_next_prompt_is_an_error():
    backend = word_backend(["Question: Hi\nAnswer: red\nQuestion: Bye\nAnswer: ok\n"])
    backend.add_tokens(["\nQuestion"])  # the answer's closing newline glued to the next role word
    with pytest.raises(ValueError, match="holds the end of a supervised span"):
        encode_conversation([H("Hi"), G("red"), H("Bye"), G("ok")], Tokenizer(backend), "literal")
    assert encode_conversation([H("Hi"), G("red")], Tokenizer(backend), "literal").labels  # one turn: no merge


def test_mask_that_cannot_be_exact_is_an_error():
    backend = word_backend(["Question: Hi\nAnswer: red\n"])
    backend.add_tokens([": red"])  # one token across the prompt/answer boundary
    tok = Tokenizer(backend, bos_token="<s>")
    with pytest.raises(ValueError, match="straddles a label boundary"):
        encode_conversation([H("Hi"), G("red")], tok, "literal")
    from tokenizers import normalizers
    dropping = word_backend(["Question: Hi\nAnswer: red\n"])
    dropping.normalizer = normalizers.Replace("?", "")
    with pytest.raises(ValueError, match="drops 1 character"):
        encode_conversation([H("Hi?"), G("red")], Tokenizer(dropping), "literal")


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="template: unknown 'vicuna'"):
        encode_conversation(ONE_IMAGE, tok, "vicuna")
    with pytest.raises(ValueError, match="image_tokens"):
        encode_conversation(ONE_IMAGE, tok, "literal", image_tokens=0)
    with pytest.raises(ValueError, match="no eos_token"):
        encode_conversation(ONE_IMAGE, Tokenizer(tok.backend), "llava_v1")
    with pytest.raises(ValueError, match="template 'plain'"):
        encode_conversation(TWO_IMAGES_MULTI_TURN, tok, "plain")
    with pytest.raises(ValueError, match="turns not alternating"):
        encode_conversation([H("a"), H("b"), G("c")], tok, "literal")
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        encode_conversation([H("a"), {"from": "bot", "value": "c"}], tok, "literal")


def test_tokenizer_given_as_directory_or_transformers_object(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast
    want = encode_conversation(ONE_IMAGE, tok, "llava_v1", image_tokens=2)
    tok.save(tmp_path / "tok")
    assert encode_conversation(ONE_IMAGE, tmp_path / "tok", "llava_v1", image_tokens=2) == want
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend, bos_token="<s>", eos_token="</s>")
    assert encode_conversation(ONE_IMAGE, hf, "llava_v1", image_tokens=2) == want
    assert encode_conversation(ONE_IMAGE, tok.backend, "literal", image_tokens=2).labels  # raw tokenizers object
    with pytest.raises(ValueError, match="no tokenizer.json"):
        encode_conversation(ONE_IMAGE, tmp_path, "literal")


@pytest.mark.parametrize("template", ["literal", "llava_v1", "chat"])
def test_system_argument_replaces_the_system_turn(template, tok):
    template = ChatTemplate(CHATML) if template == "chat" else template
    given = encode_conversation(TEXT_ONLY, tok, template, system="Be brief.")
    without = encode_conversation(TEXT_ONLY[1:], tok, template, system="Be brief.")
    assert given == without == encode_conversation(TEXT_ONLY, tok, template)
    other = encode_conversation(TEXT_ONLY, tok, template, system="Hi")
    assert _join(tok, other.input_ids).count("Be brief.") == 0 and other.labels.count(IGNORE_INDEX) < len(other)
    with pytest.raises(ValueError, match="no system prompt"):
        encode_conversation(ONE_IMAGE, tok, "plain", system="Hi")
