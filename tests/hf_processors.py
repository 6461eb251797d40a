"""Tiny tokenizers, processors and chat templates for the families of
tests/hf_patch_models.py, built from code and saved beside the model (nothing
downloaded): ``save_family(name, seed, dir)`` writes a directory that transformers'
Auto classes load, as a real checkpoint directory would be.

The tokenizer is character-level with a few merges (so some tokens span several
characters) over the ids below TEXT_MAX; the family's special tokens take the ids
the tiny model configs use (image = VOCAB - 1, vision start / begin-of-image =
VOCAB - 3, ...). Chat templates follow the shape of each family's own."""
from __future__ import annotations

import importlib.util
import string
from pathlib import Path

from tests import hf_patch_models as H

CHARS = list(string.ascii_letters + string.digits + " \n.,?!:'-")
MERGES = [("t", "h"), ("th", "e"), ("a", "n"), ("i", "n"), ("e", "r"), ("o", "n"), ("e", " "), ("s", " "),
          ("r", "e"), ("a", "t")]
# ids TEXT_MAX .. VOCAB-1, in order, per family
SPECIALS = {
    "llava": ["<pad>", "<s>", "</s>", "<x1>", "<x2>", "<x3>", "<x4>", "<image>"],
    "gemma3": ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
               "<end_of_image>", "<image_soft_token>"],
    "paligemma": ["<pad>", "<bos>", "<eos>", "<x1>", "<x2>", "<x3>", "<x4>", "<image>"],
    "qwen": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<x1>", "<|video_pad|>", "<|vision_start|>",
             "<|vision_end|>", "<|image_pad|>"],
    "idefics3": ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<global-img>",
                 "<video>", "<x1>", "<image>"],
    "llava_onevision": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<x1>", "<video>", "<x2>", "<x3>", "<image>"],
}
# a turn's end where it is not the tokenizer's EOS (Gemma 3's generation config stops at both)
END_OF_TURN = {"gemma3": ["<end_of_turn>"]}
# special tokens placed on the last filler ids below TEXT_MAX (the family needs more than 8):
# Idefics3 / SmolVLM tile tags, a grid of up to 2 x 2 tiles (IDEFICS_PIXELS)
FILLER_SPECIALS = {"idefics3": ["<row_1_col_1>", "<row_1_col_2>", "<row_2_col_1>", "<row_2_col_2>"]}

# Shaped as each family's own template: image parts render the family's placeholder.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }} "
    "{% elif message['role'] == 'user' %}USER: {% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %} {% else %}ASSISTANT: "
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else 'user' }}\n"
    "{{ first_user_prefix if loop.first else '' }}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<start_of_image>{% else %}{{ part['text'] | trim }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
PALIGEMMA_TEMPLATE = (  # images first (the processor adds BOS after them), then prompt, then answer + EOS
    "{% for message in messages %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% endif %}{% endfor %}{% endfor %}{% for message in messages %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] == 'assistant' %}<eos>{% else %}\n{% endif %}{% endfor %}")
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# SmolVLM(2)-Instruct (Idefics3-8B-Llama3's, with SmolVLM's <|im_start|> in place of its
# <|begin_of_text|>): "User:" / "Assistant:" turns ended by <end_of_utterance>, no space
# after the colon before a leading image
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
# llava-onevision-qwen2-*-ov-hf: a message's images first, then each text part after a newline
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ '\n' + content['text'] }}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

QWEN_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}  # 4..16 merged tokens per image
# Idefics3 / SmolVLM: the longest edge resized to 112, split into 56 x 56 tiles (the tower's
# image size; up to 2 x 2) plus the whole image as a global tile; 4 tokens per tile
IDEFICS_PIXELS = {"size": {"longest_edge": 112}, "max_image_size": {"longest_edge": 56}}


# what a family's processor class needs beyond the test requirements' core (SmolVLM2's
# processor refuses to be built without num2words, which it uses for video timestamps)
NEEDS = {"smolvlm": "num2words"}


def missing(name: str) -> str | None:
    """The module family `name`'s processor needs and this environment lacks, or None."""
    module = NEEDS.get(name)
    return module if module is not None and importlib.util.find_spec(module) is None else None


def buildable(name: str) -> bool:
    """A processor for family `name` can be built here (what the per-family tests run on)."""
    return _group(name) in SPECIALS and missing(name) is None


def _group(name: str) -> str:
    kind = H.FAMILIES[name].kind
    return {"llava_next": "llava"}.get(kind, kind)


def build_tokenizer(name: str):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(CHARS)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    group = _group(name)
    extra = FILLER_SPECIALS.get(group, [])
    filler = [f"<unused{i}>" for i in range(H.TEXT_MAX - len(vocab) - len(extra))] + extra
    for tok in filler:
        vocab[tok] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    specials = SPECIALS[group]
    backend.add_special_tokens(extra + specials)  # the filler ones keep their ids
    assert backend.token_to_id(specials[-1]) == H.IMAGE and backend.get_vocab_size() == H.VOCAB
    kwargs = {"pad_token": specials[0], "eos_token": specials[2]}
    if group == "llava" or group == "paligemma":
        kwargs["bos_token"] = specials[1]
        kwargs["extra_special_tokens"] = {"image_token": "<image>"}
    elif group == "gemma3":
        kwargs["bos_token"] = specials[1]
        kwargs["extra_special_tokens"] = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                          "eoi_token": "<end_of_image>"}
    elif group == "idefics3":
        kwargs["bos_token"] = specials[1]
        kwargs["extra_special_tokens"] = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                                          "global_image_token": "<global-img>", "video_token": "<video>",
                                          "end_of_utterance_token": "<end_of_utterance>"}
    elif group == "llava_onevision":
        kwargs["extra_special_tokens"] = {"image_token": "<image>", "video_token": "<video>"}
    else:
        kwargs["extra_special_tokens"] = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                          "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def build_processor(name: str, chat_template: bool = True):
    import transformers as tf

    tok = build_tokenizer(name)
    kind = H.FAMILIES[name].kind
    if kind == "llava":
        image = tf.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        proc = tf.LlavaProcessor(image, tok, patch_size=14, vision_feature_select_strategy="default",
                                 num_additional_image_tokens=1)
        template = LLAVA_TEMPLATE
    elif kind == "llava_next":
        image = tf.LlavaNextImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                           image_grid_pinpoints=[[28, 28]])
        proc = tf.LlavaNextProcessor(image, tok, patch_size=14, vision_feature_select_strategy="default",
                                     num_additional_image_tokens=1)
        template = LLAVA_TEMPLATE
    elif kind == "gemma3":
        image = tf.Gemma3ImageProcessor(size={"height": 28, "width": 28})
        proc = tf.Gemma3Processor(image, tok, image_seq_length=4)
        template = GEMMA3_TEMPLATE
    elif kind == "paligemma":
        image = tf.SiglipImageProcessor(size={"height": 28, "width": 28})
        image.image_seq_length = 4
        proc = tf.PaliGemmaProcessor(image, tok)
        template = PALIGEMMA_TEMPLATE
    elif name == "idefics3":
        proc = tf.Idefics3Processor(tf.Idefics3ImageProcessor(**IDEFICS_PIXELS), tok, image_seq_len=4)
        template = IDEFICS3_TEMPLATE
    elif name == "smolvlm":  # SmolVLM2's processor (it needs num2words, for video timestamps)
        video = tf.SmolVLMVideoProcessor(**IDEFICS_PIXELS)
        proc = tf.SmolVLMProcessor(tf.SmolVLMImageProcessor(**IDEFICS_PIXELS), tok, video, image_seq_len=4)
        template = IDEFICS3_TEMPLATE
    elif kind == "llava_onevision":
        # anyres: a 28 x 28 base tile plus the tiles of the grid pinpoint nearest the image's
        # shape (the tiny model's pinpoints); 4 x 4 features per tile (SigLIP, no CLS token)
        image = tf.LlavaOnevisionImageProcessor(size={"height": 28, "width": 28},
                                                image_grid_pinpoints=H.ONEVISION_PINPOINTS)
        video = tf.LlavaOnevisionVideoProcessor(size={"height": 28, "width": 28})
        proc = tf.LlavaOnevisionProcessor(image, tok, video, num_image_tokens=16,
                                          vision_feature_select_strategy="full")
        template = ONEVISION_TEMPLATE
    else:
        image = tf.Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, **QWEN_PIXELS)
        video = tf.Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
        cls = tf.Qwen2_5_VLProcessor if name == "qwen2_5_vl" else tf.Qwen2VLProcessor
        proc = cls(image, tok, video)
        template = QWEN_TEMPLATE
    if chat_template:
        proc.chat_template = template
    return proc


def save_family(name: str, seed: int, path, chat_template: bool = True) -> Path:
    """A checkpoint directory for family `name`: the tiny float32 model (eager attention),
    its tokenizer and processor (with the chat template)."""
    path = Path(path)
    model = H.build(name, seed)
    processor = build_processor(name, chat_template)
    # generate stops where the family's own generation config says: the tokenizer's EOS and
    # the end of a turn (the tiny configs' defaults name ids of ordinary tokens here)
    tok = processor.tokenizer
    ends = [tok.eos_token_id] + [tok.convert_tokens_to_ids(t) for t in END_OF_TURN.get(_group(name), [])]
    model.generation_config.update(eos_token_id=ends, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def write_images(root, sizes: dict[str, tuple[int, int]], seed: int) -> None:
    """RGB PNGs of random pixels: file name -> (width, height)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for file, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / file)
