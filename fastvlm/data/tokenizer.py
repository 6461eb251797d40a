"""Tokenizers: any Hugging Face tokenizer from a local directory (``tokenizer.json``, read
with the `tokenizers` library) or a transformers tokenizer object, and a byte-level BPE
trained on the dataset's text for the built-in model.

Everything goes through one `Tokenizer` wrapper around a ``tokenizers.Tokenizer``, because
label masks are computed from character offsets, which only the Rust tokenizers report.
The image placeholder is added as a special token when the vocabulary lacks it, so that
``<image>`` in text always becomes exactly one id (expanded later to the encoder's count).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as RustTokenizer

from fastvlm.utils.io import atomic_write_text

CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# Special tokens of the built-in BPE, in id order (ids 0..3).
BUILTIN_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def _token_str(value) -> str | None:
    """A special token as saved by transformers: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """The tokenizer interface the data pipeline uses.

    ``encode(text)`` returns ``(ids, offsets)`` with no special tokens added (offsets are
    ``(start, end)`` character ranges of ``text``); special tokens written in the text
    (``<image>``, ``</s>``, ...) are recognised as single tokens.
    """

    def __init__(self, backend: RustTokenizer, *, image_token: str = "<image>", bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None, chat_template: str | None = None):
        if not isinstance(image_token, str) or not image_token:
            raise ValueError(f"image_token: expected a non-empty string, got {image_token!r}")
        self._tok = backend
        self.image_token = image_token
        # Also when the vocabulary has it as an ordinary entry: only an added token is matched
        # whole in text (the pre-tokenizer would split "<image>" into "<", "image", ">").
        if image_token not in {t.content for t in backend.get_added_tokens_decoder().values()}:
            backend.add_special_tokens([AddedToken(image_token, special=True, normalized=False)])
        self.image_token_id = backend.token_to_id(image_token)
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_token_id = self._id_of(bos_token, "bos_token")
        self.eos_token_id = self._id_of(eos_token, "eos_token")
        self.pad_token_id = self._id_of(pad_token, "pad_token")
        self.chat_template = chat_template

    def _id_of(self, token: str | None, what: str) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{what}: {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @property
    def backend(self) -> RustTokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Embedding rows needed: the vocabulary including added tokens."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def special_tokens(self) -> dict[str, str]:
        """The named special tokens (for chat templates: ``bos_token``, ``eos_token``, ...)."""
        named = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                 "image_token": self.image_token}
        return {k: v for k, v in named.items() if v is not None}

    def save(self, directory) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (transformers' layout, so
        ``AutoTokenizer.from_pretrained`` and `load_tokenizer` both read it back)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / TOKENIZER_FILE, self._tok.to_str())
        config = {**self.special_tokens(), "chat_template": self.chat_template,
                  "tokenizer_class": "PreTrainedTokenizerFast"}
        atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=1) + "\n")
        return directory

    def __repr__(self):
        return (f"Tokenizer(vocab_size={self.vocab_size}, image_token={self.image_token!r}:{self.image_token_id}, "
                f"bos={self.bos_token!r}, eos={self.eos_token!r}, pad={self.pad_token!r}, "
                f"chat_template={'yes' if self.chat_template else 'no'})")


def _from_directory(directory: Path, image_token: str) -> Tokenizer:
    if not directory.is_dir():
        raise ValueError(f"tokenizer: {directory} is not a directory")
    if not (directory / TOKENIZER_FILE).is_file():
        raise ValueError(f"tokenizer: {directory} has no {TOKENIZER_FILE} (a fast Hugging Face tokenizer is needed; "
                         "slow sentencepiece/vocab-only directories are not supported)")
    try:
        backend = RustTokenizer.from_file(str(directory / TOKENIZER_FILE))
    except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception on a bad file
        raise ValueError(f"tokenizer: cannot read {directory / TOKENIZER_FILE}: {e}") from None
    config: dict = {}
    for name in ("special_tokens_map.json", CONFIG_FILE):  # the config wins where both say
        if (directory / name).is_file():
            try:
                config.update(json.loads((directory / name).read_text()))
            except json.JSONDecodeError as e:
                raise ValueError(f"tokenizer: malformed {directory / name}: {e}") from None
    template = config.get("chat_template")
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        template = (directory / CHAT_TEMPLATE_FILE).read_text()
    if isinstance(template, list):  # transformers' named-template list: use the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return Tokenizer(backend, image_token=image_token, bos_token=_token_str(config.get("bos_token")),
                     eos_token=_token_str(config.get("eos_token")), pad_token=_token_str(config.get("pad_token")),
                     chat_template=template if isinstance(template, str) else None)


def _from_transformers(obj, image_token: str) -> Tokenizer:
    backend = getattr(obj, "backend_tokenizer", None)
    if not isinstance(backend, RustTokenizer):
        raise ValueError(  # noqa: TRY004 - bad input is a ValueError in this project
            f"tokenizer: {type(obj).__name__} has no Rust backend (a fast tokenizer is needed for character offsets)")
    # A copy: adding the image token must not change the caller's tokenizer.
    backend = RustTokenizer.from_str(backend.to_str())
    template = getattr(obj, "chat_template", None)
    return Tokenizer(backend, image_token=image_token, bos_token=getattr(obj, "bos_token", None),
                     eos_token=getattr(obj, "eos_token", None), pad_token=getattr(obj, "pad_token", None),
                     chat_template=template if isinstance(template, str) else None)


def load_tokenizer(path_or_obj, image_token: str = "<image>") -> Tokenizer:
    """A `Tokenizer` from a local directory with ``tokenizer.json``, a ``tokenizers.Tokenizer``,
    a transformers fast tokenizer object, or an existing `Tokenizer` (returned as is)."""
    if isinstance(path_or_obj, Tokenizer):
        if path_or_obj.image_token != image_token:
            raise ValueError(f"image_token: {image_token!r} differs from the tokenizer's {path_or_obj.image_token!r}")
        return path_or_obj
    if isinstance(path_or_obj, (str, Path)):
        return _from_directory(Path(path_or_obj), image_token)
    if isinstance(path_or_obj, RustTokenizer):
        return Tokenizer(RustTokenizer.from_str(path_or_obj.to_str()), image_token=image_token)
    return _from_transformers(path_or_obj, image_token)


def train_bpe_tokenizer(texts, vocab_size: int = 4096, seed: int = 0, image_token: str = "<image>",
                        min_frequency: int = 2, max_texts: int | None = None) -> Tokenizer:
    """A byte-level BPE trained on ``texts`` (any byte sequence stays encodable), with
    ``<s>``, ``</s>``, ``<pad>`` and the image token as special ids 0..3.

    Deterministic: the same texts, seed and sizes give the same ``tokenizer.json`` bytes
    (``seed`` picks the ``max_texts`` subset, when given, and the training order).
    """
    if vocab_size < 256 + 4:
        raise ValueError(f"vocab_size: expected >= 260 (256 bytes + 4 specials), got {vocab_size}")
    texts = [t for t in texts if isinstance(t, str) and t]
    if not texts:
        raise ValueError("texts: expected at least one non-empty string to train on")
    rng = random.Random(seed)
    rng.shuffle(texts)
    if max_texts is not None:
        texts = texts[:max_texts]
    backend = RustTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = [*BUILTIN_SPECIALS.values(), image_token]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # The image tag is a special token: its characters must not shape the merges.
    backend.train_from_iterator((t.replace(image_token, " ") for t in texts), trainer=trainer)
    return Tokenizer(backend, image_token=image_token, **BUILTIN_SPECIALS)
