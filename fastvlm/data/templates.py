"""Prompt templates: a conversation rendered to one string plus the character spans of what
is supervised.

A template never tokenizes. It returns a `Rendered` string with the character spans of
every answer and the character end of every human+gpt turn pair; `encode_conversation`
tokenizes the whole string once and maps those character spans to tokens through the
tokenizer's offsets. That is what makes the masks exact for any tokenizer (LLaVA instead
re-tokenizes pieces and subtracts lengths, which silently breaks when a tokenizer merges
across a piece boundary).

Turns reach a template with their ``<image>`` tags already replaced by the tokenizer's image
token string. Templates:

- ``plain``: LLaVA stage 1 (``conv_llava_plain``): the human turn reduced to its image tags,
  then the caption and ``"\\n"``; caption and newline supervised.
- ``llava_v1``: LLaVA's ``conv_llava_v1`` as its ``preprocess_v1`` renders it:
  ``"{system} USER: {q} ASSISTANT: {a}</s>"`` per round (``</s>`` is the tokenizer's EOS
  token; Vicuna's is ``</s>``), each ``<image>`` moved to the start of its turn followed by
  ``"\\n"``; the answer (with the space before it) and the end token supervised. Its system
  prompt speaks of a "curious human".
- ``vicuna_v1`` (alias ``v1``): LLaVA's ``conv_vicuna_v1``, the same rounds with the system
  prompt of a "curious user": what LLaVA-1.5's scripts train with (``--version v1``).
- ``literal`` (role words as plain text): ``"Question: {q}\\nAnswer: {a}\\n"`` per round, the
  answer (with its leading space) and the newline supervised; no markup tokens, so a model
  generating with it stops at the newline. (A tokenizer that glues that newline to the next
  word, as SentencePiece models not split on newlines can, cannot carry it exactly: an error.)
- ``chat_template``: the tokenizer's own Jinja chat template, rendered as transformers does
  (sandboxed, ``trim_blocks``, ``lstrip_blocks``); answer spans are its ``{% generation %}``
  blocks when it has them, else found by rendering each prefix of the conversation, which
  must be a prefix of the full rendering. Content is passed as strings with the image token
  inline (``{"role": "user", "content": "<image>\\nWhat is it?"}``).
All but ``chat_template`` start with the tokenizer's BOS token when it has one (as Llama's
tokenizers add it); a chat template writes its own.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from fastvlm.data.formats import IMAGE_TAG

# LLaVA's conversation.py: conv_llava_v1 ("llava_v1") and conv_vicuna_v1 ("v1", "vicuna_v1"),
# word for word; they differ only in these texts.
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass
class Rendered:
    """``text``: the whole conversation; ``answers``: (start, end) character spans supervised by
    default, one per gpt turn; ``pair_ends``: character end of each human+gpt pair (pair 0 also
    holds the preamble: BOS, system prompt); ``never``: character end of a preamble that is
    never supervised (the BOS token), even with ``train_on_prompt``."""

    text: str
    answers: list[tuple[int, int]] = field(default_factory=list)
    pair_ends: list[int] = field(default_factory=list)
    never: int = 0


class _Builder:
    """Appends pieces to a string while recording answer spans and pair ends."""

    def __init__(self):
        self.parts: list[str] = []
        self.length = 0
        self.answers: list[tuple[int, int]] = []
        self.pair_ends: list[int] = []
        self.never = 0

    def add(self, text: str, answer: bool = False) -> None:
        if answer:
            self.answers.append((self.length, self.length + len(text)))
        self.parts.append(text)
        self.length += len(text)

    def end_pair(self) -> None:
        self.pair_ends.append(self.length)

    def result(self) -> Rendered:
        return Rendered("".join(self.parts), self.answers, self.pair_ends, self.never)


def _split(turns: list[dict], system: str | None) -> tuple[str | None, list[tuple[str, str]]]:
    """(system text, [(question, answer), ...]) of a validated, alternating conversation;
    an explicit ``system`` argument replaces the conversation's own system turn."""
    if turns and turns[0]["from"] == "system":
        system = turns[0]["value"] if system is None else system
        turns = turns[1:]
    return system, [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns), 2)]


class Template:
    """A prompt format. Subclasses implement `render` for a conversation ending with a gpt turn."""

    name = "template"

    def render(self, turns: list[dict], tokenizer, system: str | None = None) -> Rendered:
        raise NotImplementedError

    def prompt(self, turns: list[dict], tokenizer, system: str | None = None) -> str:
        """The text a model continues to answer the last human turn (for generation): the
        training rendering of the conversation with an empty last answer, cut where that
        answer starts, so prompt tokens are exactly the training sequence's."""
        if turns and turns[-1]["from"] == "gpt":
            turns = turns[:-1]
        rendered = self.render([*turns, {"from": "gpt", "value": ""}], tokenizer, system)
        return rendered.text[:rendered.answers[-1][0]]

    def _rounds(self, tokenizer, preamble: str, pairs, prompt, answer) -> Rendered:
        """BOS, ``preamble``, then per pair ``prompt(question)`` and the supervised ``answer(answer)``."""
        b = self._start(tokenizer)
        b.add(preamble)
        for question, reply in pairs:
            b.add(prompt(question))
            b.add(answer(reply), answer=True)
            b.end_pair()
        return b.result()

    def _start(self, tokenizer) -> _Builder:
        b = _Builder()
        if tokenizer.bos_token is not None:
            b.add(tokenizer.bos_token)
            b.never = b.length
        return b

    def __repr__(self):
        return f"{type(self).__name__}()"


class PlainTemplate(Template):
    name = "plain"

    def render(self, turns, tokenizer, system=None):
        system, pairs = _split(turns, system)
        if system is not None or len(pairs) != 1:
            raise ValueError("template 'plain' (stage-1 captions): expected exactly one human turn and one gpt "
                             f"turn and no system prompt, got {len(pairs)} pair(s)"
                             f"{' and a system prompt' if system is not None else ''}")
        (question, caption), = pairs
        b = self._start(tokenizer)
        tag = tokenizer.image_token
        b.add(tag * question.count(tag))  # LLaVA drops the human text, keeps the image
        b.add(caption + "\n", answer=True)
        b.end_pair()
        return b.result()


def move_images_first(text: str, tag: str = IMAGE_TAG) -> str:
    """LLaVA's ``preprocess_multimodal``: the turn's image tags removed, the text stripped, and
    the tags put first, each followed by a newline."""
    n = text.count(tag)
    if not n:
        return text
    return (tag + "\n") * n + text.replace(tag, "").strip()


class LlavaV1Template(Template):
    """LLaVA's SeparatorStyle.TWO rounds; ``system`` is the default system prompt."""

    roles = ("USER", "ASSISTANT")

    def __init__(self, name: str = "llava_v1", system: str = VICUNA_SYSTEM):
        self.name, self.system = name, system

    def render(self, turns, tokenizer, system=None):
        if tokenizer.eos_token is None:
            raise ValueError(f"template {self.name!r}: the tokenizer has no eos_token to end answers with")
        system, pairs = _split(turns, system)
        user, assistant = self.roles
        return self._rounds(tokenizer, (self.system if system is None else system) + " ", pairs,
                            lambda q: f"{user}: {move_images_first(q, tokenizer.image_token)} {assistant}:",
                            lambda a: f" {a}{tokenizer.eos_token}")

    def __repr__(self):
        return f"LlavaV1Template(name={self.name!r})"


class LiteralTemplate(Template):
    """Role words typed as plain text; ``user``/``assistant`` may be any words ("USER:", ...)."""

    name = "literal"

    def __init__(self, user: str = "Question:", assistant: str = "Answer:", sep: str = "\n"):
        self.user, self.assistant, self.sep = user, assistant, sep

    def render(self, turns, tokenizer, system=None):
        system, pairs = _split(turns, system)
        return self._rounds(tokenizer, "" if system is None else system + self.sep, pairs,
                            lambda q: f"{self.user} {q}{self.sep}{self.assistant}", lambda a: f" {a}{self.sep}")

    def __repr__(self):
        return f"LiteralTemplate(user={self.user!r}, assistant={self.assistant!r}, sep={self.sep!r})"


# Sentinels a {% generation %} block is wrapped in while rendering (Unicode private use).
_GEN_OPEN, _GEN_CLOSE = "\ue000", "\ue001"


def _jinja_env():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTags(Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask tags): the
        block renders unchanged between sentinels, which `ChatTemplate` turns into spans."""

        tags = frozenset({"generation"})

        def parse(self, parser):
            next(parser.stream)
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return [nodes.Output([nodes.TemplateData(_GEN_OPEN)]), *body,
                    nodes.Output([nodes.TemplateData(_GEN_CLOSE)])]

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime
        return datetime.now().strftime(fmt)

    # The settings transformers' apply_chat_template compiles templates with.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, GenerationTags])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def _generation_spans(text: str) -> tuple[str, list[tuple[int, int]]]:
    """``text`` without generation sentinels, and the spans they enclosed."""
    out, spans, start = [], [], None
    length = 0
    for piece in re.split(f"([{_GEN_OPEN}{_GEN_CLOSE}])", text):
        if piece == _GEN_OPEN:
            if start is not None:
                raise ValueError("template 'chat_template': nested {% generation %} blocks")
            start = length
        elif piece == _GEN_CLOSE:
            spans.append((start, length))
            start = None
        else:
            out.append(piece)
            length += len(piece)
    return "".join(out), spans


class ChatTemplate(Template):
    """The tokenizer's Jinja chat template (or ``source``, when given).

    Answer spans: a template with ``{% generation %}`` blocks marks them itself (one block per
    assistant turn); otherwise turn i's span is what rendering the first i+1 messages adds to
    rendering the first i with the generation prompt, less trailing whitespace (formatting
    after the end-of-turn token, never generated). Each such prefix must be a prefix of the
    whole rendering, or the span is undefined and the sample an error.
    """

    name = "chat_template"

    def __init__(self, source: str | None = None):
        self.source = source
        self._compiled: dict[str, object] = {}

    def __getstate__(self):  # compiled Jinja templates do not pickle (DataLoader workers)
        return {"source": self.source, "_compiled": {}}

    def _template(self, tokenizer):
        source = self.source if self.source is not None else tokenizer.chat_template
        if not source:
            raise ValueError("template 'chat_template': the tokenizer has no chat_template")
        if source not in self._compiled:
            import jinja2
            try:
                self._compiled[source] = _jinja_env().from_string(source)
            except jinja2.TemplateError as e:
                raise ValueError(f"template 'chat_template': cannot compile the chat template: {e}") from None
        return self._compiled[source]

    def _render(self, template, messages, add_generation_prompt, tokenizer) -> str:
        import jinja2
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                   documents=None, **tokenizer.special_tokens())
        except jinja2.TemplateError as e:
            raise ValueError(f"template 'chat_template': rendering failed: {e}") from None

    @staticmethod
    def _messages(turns, system):
        system, pairs = _split(turns, system)
        messages = [] if system is None else [{"role": "system", "content": system}]
        for question, answer in pairs:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return messages

    def render(self, turns, tokenizer, system=None):
        template = self._template(tokenizer)
        messages = self._messages(turns, system)
        if any(_GEN_OPEN in m["content"] or _GEN_CLOSE in m["content"] for m in messages):
            raise ValueError("template 'chat_template': the conversation contains U+E000/U+E001 (reserved)")
        full, tagged = _generation_spans(self._render(template, messages, False, tokenizer))
        n_answers = sum(m["role"] == "assistant" for m in messages)
        if tagged:
            if len(tagged) != n_answers:
                raise ValueError(f"template 'chat_template': {len(tagged)} {{% generation %}} block(s) for "
                                 f"{n_answers} assistant turn(s)")
            ends = [e + len(full[e:]) - len(full[e:].lstrip()) for _, e in tagged]  # + whitespace after
            return Rendered(full, tagged, [*ends[:-1], len(full)], 0)
        answers, pair_ends = [], []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(template, messages[:i], True, tokenizer)
            through = self._render(template, messages[:i + 1], False, tokenizer)
            if not (through.startswith(before) and full.startswith(through)):
                raise ValueError(f"template 'chat_template': turn {i} does not render as a prefix of the whole "
                                 "conversation (the template rewrites earlier turns), so its label span is not "
                                 "defined")
            end = len(through.rstrip())
            answers.append((len(before), max(end, len(before))))
            pair_ends.append(len(through))
        pair_ends[-1] = len(full)
        return Rendered(full, answers, pair_ends, 0)

    def prompt(self, turns, tokenizer, system=None):
        """The template's own generation prompt (``add_generation_prompt=True``)."""
        if turns and turns[-1]["from"] == "gpt":
            turns = turns[:-1]
        messages = self._messages([*turns, {"from": "gpt", "value": ""}], system)[:-1]
        return _generation_spans(self._render(self._template(tokenizer), messages, True, tokenizer))[0]


TEMPLATES = {"plain": PlainTemplate(), "llava_v1": LlavaV1Template(),
             "vicuna_v1": LlavaV1Template("vicuna_v1", VICUNA_V1_SYSTEM), "literal": LiteralTemplate(),
             "chat_template": ChatTemplate()}
TEMPLATES["v1"] = TEMPLATES["vicuna_v1"]  # LLaVA's conv_templates name both


def get_template(template) -> Template:
    """A `Template` by name (``plain``, ``llava_v1``, ``vicuna_v1`` / ``v1``, ``literal``,
    ``chat_template``) or as given."""
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"template: unknown {template!r}; expected one of {sorted(TEMPLATES)} or a Template")
    return TEMPLATES[template]
