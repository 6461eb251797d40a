"""fastvlm's prompt templates written as Jinja chat templates (transformers' ``apply_chat_template``).

An exported tokenizer / processor carries the template the model was trained with, so
``processor.apply_chat_template(messages)`` renders exactly the text fastvlm's template
renders for the same conversation, and with ``add_generation_prompt=True`` exactly its
generation prompt (`Template.prompt`).

Messages are transformers' (roles ``system``, ``user``, ``assistant``). A content is a
string with the image token inline (as fastvlm's turns are), or a list of parts: an
``image`` part becomes the image token and a newline (LLaVA's ``<image>\\n``), a ``text``
part its text. Each answer is a ``{% generation %}`` block, so
``return_assistant_tokens_mask`` marks what fastvlm supervises (and fastvlm's own
`ChatTemplate` reads the same spans back). The tokenizer's special tokens are written into
the template as literals: what it renders does not depend on the variables a caller passes.
``chat_template`` (the tokenizer's own template) is returned as it is.
"""
from __future__ import annotations

import json

from fastvlm.data.templates import ChatTemplate, LiteralTemplate, LlavaV1Template, PlainTemplate, get_template


def _lit(text: str) -> str:
    """`text` as a Jinja string literal (JSON's escapes are Jinja's too)."""
    return json.dumps(text)


def _content_macro(image_token: str) -> str:
    """``content(message)``: a message's content as one string (see the module docstring)."""
    return ("{%- macro content(message) -%}"
            "{%- if message['content'] is string -%}{{ message['content'] }}"
            "{%- else -%}{%- for part in message['content'] -%}"
            f"{{%- if part['type'] == 'image' -%}}{{{{ {_lit(image_token + chr(10))} }}}}"
            "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
            "{%- else -%}{{ raise_exception('content: only image and text parts, got ' + part['type']) }}"
            "{%- endif -%}{%- endfor -%}{%- endif -%}"
            "{%- endmacro -%}")


def _check_roles(first_system: bool) -> str:
    """Raise unless the roles alternate user, assistant (after an optional first system message)."""
    start = "(1 if messages and messages[0]['role'] == 'system' else 0)" if first_system else "0"
    return ("{%- for message in messages[" + start + ":] -%}"
            "{%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}"
            "{{ raise_exception('messages: expected user and assistant turns alternating, after an optional "
            "first system message') }}"
            "{%- endif -%}{%- endfor -%}")


def _bos(tokenizer) -> str:
    return f"{{{{ {_lit(tokenizer.bos_token)} }}}}" if tokenizer.bos_token is not None else ""


def _system_and_turns(default: str | None) -> str:
    """Sets ``system`` (the first system message's content, else `default`) and ``turns``."""
    fallback = "none" if default is None else _lit(default)
    return ("{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system = content(messages[0]) -%}{%- set turns = messages[1:] -%}"
            f"{{%- else -%}}{{%- set system = {fallback} -%}}{{%- set turns = messages -%}}{{%- endif -%}}")


def _default_system(template, tokenizer) -> str:
    """The system prompt `template` renders when the conversation has none (read from two
    renderings, one with a marker system prompt, so subclasses with their own default work)."""
    probe = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    marker = "\ue002"
    plain = template.render(probe, tokenizer).text
    marked = template.render(probe, tokenizer, system=marker).text
    after = marked[marked.index(marker) + 1:]
    start = len(tokenizer.bos_token or "")
    if not plain.endswith(after) or plain[:start] != marked[:start]:
        raise ValueError(f"template {template.name!r}: its system prompt does not open the rendering")
    return plain[start:len(plain) - len(after)]


def _rounds(tokenizer, default_system: str | None, preamble: str, question: str, answer: str,
            macros: str = "") -> str:
    """A round-based template (Template._rounds): BOS, `preamble` (may read ``system``), then per
    user turn `question` and per assistant turn the supervised `answer`, Jinja expressions of
    ``text`` (the turn's content)."""
    return (_content_macro(tokenizer.image_token) + macros + _check_roles(True) + _system_and_turns(default_system)
            + _bos(tokenizer) + preamble
            + "{%- for message in turns -%}{%- set text = content(message) -%}{%- if message['role'] == 'user' -%}"
            f"{{{{ {question} }}}}{{%- else -%}}{{% generation %}}{{{{ {answer} }}}}{{% endgeneration %}}"
            "{%- endif -%}{%- endfor -%}")


def _llava_v1(template: LlavaV1Template, tokenizer) -> str:
    if tokenizer.eos_token is None:
        raise ValueError(f"template {template.name!r}: the tokenizer has no eos_token to end answers with")
    user, assistant = template.roles
    tag = _lit(tokenizer.image_token)
    # LLaVA's preprocess_multimodal (templates.move_images_first): the turn's image tags first.
    moved = ("{%- macro moved(text) -%}"
             f"{{%- set n = text.count({tag}) -%}}"
             "{%- if n == 0 -%}{{ text }}"
             f"{{%- else -%}}{{{{ ({tag} + '\\n') * n + text.replace({tag}, '').strip() }}}}{{%- endif -%}}"
             "{%- endmacro -%}")
    return _rounds(tokenizer, _default_system(template, tokenizer), "{{ system + ' ' }}",
                   f"{_lit(user + ': ')} + moved(text) + {_lit(' ' + assistant + ':')}",
                   f"' ' + text + {_lit(tokenizer.eos_token)}", macros=moved)


def _literal(template: LiteralTemplate, tokenizer) -> str:
    sep = _lit(template.sep)
    return _rounds(tokenizer, None, f"{{%- if system is not none -%}}{{{{ system + {sep} }}}}{{%- endif -%}}",
                   f"{_lit(template.user + ' ')} + text + {sep} + {_lit(template.assistant)}",
                   f"' ' + text + {sep}")


def _plain(template: PlainTemplate, tokenizer) -> str:
    tag = _lit(tokenizer.image_token)
    return (_content_macro(tokenizer.image_token) + _check_roles(False)
            + "{%- if messages|length > 2 -%}{{ raise_exception(\"template 'plain' (stage-1 captions): expected "
            "one user turn and one assistant turn and no system prompt\") }}{%- endif -%}"
            + _bos(tokenizer) + "{%- for message in messages -%}{%- if message['role'] == 'user' -%}"
            f"{{{{ {tag} * content(message).count({tag}) }}}}"
            "{%- else -%}{% generation %}{{ content(message) + '\\n' }}{% endgeneration %}"
            "{%- endif -%}{%- endfor -%}")


def chat_template_of(template, tokenizer) -> str:
    """The Jinja chat template rendering as `template` (a name or a `Template`) does with
    `tokenizer` (a fastvlm.data Tokenizer: its BOS/EOS and image token strings)."""
    template = get_template(template)
    if isinstance(template, ChatTemplate):
        source = template.source if template.source is not None else tokenizer.chat_template
        if not source:
            raise ValueError("template 'chat_template': the tokenizer has no chat_template to export")
        return source
    for kind, write in ((PlainTemplate, _plain), (LlavaV1Template, _llava_v1), (LiteralTemplate, _literal)):
        if isinstance(template, kind):
            return write(template, tokenizer)
    raise ValueError(f"template: {template!r} has no Jinja chat template writer (fastvlm.data.chat_jinja)")
