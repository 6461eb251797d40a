"""Issue 23 item 7: the hf-llava export carries the recipe's prompt template as a Jinja chat
template, so transformers' ``processor.apply_chat_template`` (and the tokenizer's) renders
exactly what fastvlm's template renders, for every template fastvlm ships: single- and
multi-turn, image(s), system prompt, string or list content; with
``add_generation_prompt`` exactly the generation prompt; answers as {% generation %} blocks
that fastvlm's own ChatTemplate reads back as the same label spans."""
import copy
import re

import pytest

from fastvlm.data import TEMPLATES, ChatTemplate, get_template, train_bpe_tokenizer
from fastvlm.data.chat_jinja import chat_template_of
from fastvlm.models.llm import LLMConfig
from fastvlm.models.preprocess import ImagePreprocessor
from fastvlm.models.vision import VisionConfig
from fastvlm.models.vlm import VLM, VLMConfig
from fastvlm.train.export import export_model

transformers = pytest.importorskip("transformers")
jinja2 = pytest.importorskip("jinja2")

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CONVERSATIONS = {
    "single": [{"from": "human", "value": "<image>\nWhat is in the picture?"},
               {"from": "gpt", "value": "A red square."}],
    "multi-turn": [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."},
                   {"from": "human", "value": "And its shape?"}, {"from": "gpt", "value": "A square."}],
    "two images": [{"from": "human", "value": "<image>\n<image>\nWhich one is larger?"},
                   {"from": "gpt", "value": "The first."}],
    "images inside text": [{"from": "human", "value": "Compare <image> with <image> please. "},
                           {"from": "gpt", "value": "They match."}],
    "system": [{"from": "system", "value": "You answer in one word."},
               {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red."}],
    "text only": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}],
}
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
LEADING_IMAGES = re.compile(r"^((?:<image>\n)*)([^<]*)$")


def _messages(turns, as_parts: bool):
    """transformers' messages of fastvlm turns: content strings, or typed parts (each leading
    ``<image>\\n`` an image part); None where a turn has no parts form (an image inside text)."""
    messages = []
    for turn in turns:
        content = turn["value"]
        if as_parts:
            match = LEADING_IMAGES.match(content)
            if match is None:
                return None
            images, text = match.group(1).count("<image>"), match.group(2)
            content = [{"type": "image"}] * images + ([{"type": "text", "text": text}] if text else [])
        messages.append({"role": ROLES[turn["from"]], "content": content})
    return messages


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["what colour is the square", "which one is larger", "the red one is left of the blue one"] * 4
    tok = train_bpe_tokenizer(texts, vocab_size=300, min_frequency=1)
    tok.chat_template = CHATML  # the `chat_template` template's source
    return tok


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    """template name -> an hf-llava export of a tiny model trained (notionally) with it."""
    vision = VisionConfig.clip(image_size=28, patch_size=14, hidden_size=32, num_layers=1, num_heads=4,
                               intermediate_size=64)
    llm = LLMConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = VLM(VLMConfig(vision=vision, llm=llm, image_token_id=tokenizer.image_token_id)).eval()
    root = tmp_path_factory.mktemp("chat")
    for name in TEMPLATES:
        export_model(model, root / name, "hf-llava", tokenizer=tokenizer,
                     preprocessor=ImagePreprocessor.for_family("clip", 28), template=name)
    return root


def _renders(template, turns, tokenizer):
    """fastvlm's (text, prompt for the last answer) of `turns`, or the error it raises."""
    try:
        return template.render(turns, tokenizer).text, template.prompt(turns[:-1], tokenizer)
    except ValueError as err:
        return err


# (template, conversation, parts form?): parts only where every turn has one, and not for the
# tokenizer's own template (its source reads string content)
CASES = [(name, conversation, as_parts) for name in sorted(TEMPLATES) for conversation in sorted(CONVERSATIONS)
         for as_parts in (False, True)
         if not as_parts or (name != "chat_template" and _messages(CONVERSATIONS[conversation], True) is not None)]


@pytest.mark.parametrize("name,conversation,as_parts", CASES)
def test_processor_renders_as_fastvlm(exported, tokenizer, name, conversation, as_parts):
    turns = CONVERSATIONS[conversation]
    messages = _messages(turns, as_parts)
    processor = transformers.AutoProcessor.from_pretrained(exported / name)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported / name)
    want = _renders(get_template(name), turns, tokenizer)
    if isinstance(want, ValueError):  # e.g. `plain` with a system prompt or two rounds
        with pytest.raises(jinja2.exceptions.TemplateError):
            processor.apply_chat_template(messages)
        return
    text, prompt = want
    assert processor.apply_chat_template(messages) == text
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False) == text
    assert processor.apply_chat_template(messages[:-1], add_generation_prompt=True) == prompt


@pytest.mark.parametrize("name", sorted(set(TEMPLATES) - {"chat_template"}))
def test_exported_template_marks_the_supervised_spans(exported, tokenizer, name):
    """The {% generation %} blocks are the answers fastvlm supervises: its ChatTemplate reading
    the exported Jinja gives the original template's text and label spans."""
    source = (exported / name / "chat_template.jinja").read_text()
    reader = ChatTemplate(source)
    for conversation, turns in CONVERSATIONS.items():
        want = _renders(get_template(name), turns, tokenizer)
        if isinstance(want, ValueError):
            continue
        original, got = get_template(name).render(turns, tokenizer), reader.render(turns, tokenizer)
        assert (got.text, got.answers) == (original.text, original.answers), conversation


def test_template_writes_the_tokenizers_special_tokens(exported, tokenizer):
    """What the export renders does not depend on the variables a caller passes: the BOS/EOS
    and image token strings are the tokenizer's, written into the template (none for a
    tokenizer without BOS)."""
    processor = transformers.AutoProcessor.from_pretrained(exported / "llava_v1")
    messages = _messages(CONVERSATIONS["single"], as_parts=True)
    text = processor.apply_chat_template(messages, bos_token="<x>", eos_token="<y>")
    assert text == get_template("llava_v1").render(CONVERSATIONS["single"], tokenizer).text
    no_bos = copy.copy(tokenizer)
    no_bos.bos_token = None
    for name in ("literal", "llava_v1"):
        turns = CONVERSATIONS["multi-turn"]
        want = get_template(name).render(turns, no_bos)
        assert not want.text.startswith("<s>")
        assert ChatTemplate(chat_template_of(name, no_bos)).render(turns, no_bos).text == want.text
