"""Tiny random transformers VLMs of every family fastvlm.integrations.transformers
patches, and samples for them (nothing downloaded). A sample is one sequence with
its images; `batch` lays samples out unpadded, padded, or packed into one row."""
from __future__ import annotations

from dataclasses import dataclass

import torch

VOCAB = 96
IMAGE = VOCAB - 1  # image placeholder token id
TEXT_MAX = VOCAB - 8  # ordinary text tokens are below this

SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, image_size=28, patch_size=14)
CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, image_size=28, patch_size=14, projection_dim=32)
LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, attention_dropout=0.0)


def _llava(attn, width: int = 32):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    sizes = dict(hidden_size=width, intermediate_size=2 * width)
    return LlavaForConditionalGeneration(LlavaConfig(text_config=dict(LLAMA, **sizes),
                                                     vision_config=dict(CLIP, **sizes, projection_dim=width),
                                                     image_token_id=IMAGE, attn_implementation=attn))


def _llava_next(attn):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    cfg = LlavaNextConfig(text_config=LLAMA, vision_config=CLIP, image_token_id=IMAGE,
                          image_grid_pinpoints=[[28, 28]], attn_implementation=attn)
    return LlavaNextForConditionalGeneration(cfg)


def _gemma3(attn):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(model_type="gemma3_text", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, sliding_window=3,
                layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=8)
    vision = dict(SIGLIP, patch_size=7)  # 4x4 patches pooled to 2x2 tokens
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_id=IMAGE,
                       boi_token_id=VOCAB - 3, eoi_token_id=VOCAB - 2, attn_implementation=attn)
    return Gemma3ForConditionalGeneration(cfg)


def _paligemma(attn):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    text = dict(model_type="gemma", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=VOCAB)
    cfg = PaliGemmaConfig(text_config=text, vision_config=dict(SIGLIP, projection_dim=32), image_token_id=IMAGE,
                          projection_dim=32, hidden_size=32, attn_implementation=attn)
    return PaliGemmaForConditionalGeneration(cfg)


QWEN_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=VOCAB, rope_parameters={"rope_type": "default",
                                                                           "mrope_section": [1, 1, 2]})


def _qwen2_vl(attn):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
    cfg = Qwen2VLConfig(text_config=QWEN_TEXT, vision_config=vision, image_token_id=IMAGE,
                        vision_start_token_id=VOCAB - 3, vision_end_token_id=VOCAB - 2,
                        video_token_id=VOCAB - 4, attn_implementation=attn)
    return Qwen2VLForConditionalGeneration(cfg)


def _qwen2_5_vl(attn):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=28,
                  fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig(text_config=QWEN_TEXT, vision_config=vision, image_token_id=IMAGE,
                           vision_start_token_id=VOCAB - 3, vision_end_token_id=VOCAB - 2,
                           video_token_id=VOCAB - 4, attn_implementation=attn)
    return Qwen2_5_VLForConditionalGeneration(cfg)


@dataclass(frozen=True)
class Spec:
    name: str
    build: object
    image_tokens: int
    kind: str  # "llava", "llava_next", "gemma3", "paligemma", "qwen"


FAMILIES = {
    "llava": Spec("llava", _llava, 4, "llava"),
    "llava_next": Spec("llava_next", _llava_next, 0, "llava_next"),  # counted from the model
    "gemma3": Spec("gemma3", _gemma3, 4, "gemma3"),
    "paligemma": Spec("paligemma", _paligemma, 4, "paligemma"),
    "qwen2_vl": Spec("qwen2_vl", _qwen2_vl, 4, "qwen"),
    "qwen2_5_vl": Spec("qwen2_5_vl", _qwen2_5_vl, 4, "qwen"),
}


def build(name: str, seed: int, dtype=torch.float32, attn: str = "eager", width: int = 32):
    """`width` (LLaVA only): hidden size of both towers, for bitsandbytes' CPU kernels."""
    torch.manual_seed(seed)
    model = _llava(attn, width) if name == "llava" else FAMILIES[name].build(attn)
    return model.to(dtype)


def image_token_count(name: str, model) -> int:
    if name != "llava_next":
        return FAMILIES[name].image_tokens
    px = torch.zeros(1, 2, 3, 28, 28)
    feats = model.model.get_image_features(px, image_sizes=torch.tensor([[28, 28]]))
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    return sum(f.shape[0] for f in feats)


def make_sample(name: str, model, gen: torch.Generator, prompt: int, answer: int) -> dict:
    """One sample: `prompt` text tokens, an image, `prompt` more, then `answer` tokens.
    token_type_ids (Gemma 3: 1 on image tokens; PaliGemma: 0 on the prefix)."""
    kind, n_img = FAMILIES[name].kind, image_token_count(name, model)
    text = lambda k: torch.randint(0, TEXT_MAX, (k,), generator=gen)  # noqa: E731
    if kind == "paligemma":  # PaliGemma: image first, then the prompt (prefix), then the answer
        ids = torch.cat([torch.full((n_img,), IMAGE), text(2 * prompt), text(answer)])
    else:
        ids = torch.cat([text(prompt), torch.full((n_img,), IMAGE), text(prompt), text(answer)])
    s = {"input_ids": ids, "answer": answer}
    if kind == "gemma3":
        s["token_type_ids"] = (ids == IMAGE).long()
    if kind == "paligemma":
        s["token_type_ids"] = torch.cat([torch.zeros(len(ids) - answer, dtype=torch.long),
                                         torch.ones(answer, dtype=torch.long)])
    dtype = next(model.parameters()).dtype
    if kind == "qwen":
        s["pixel_values"] = torch.randn(16, 3 * 2 * 14 * 14, generator=gen).to(dtype)
        s["image_grid_thw"] = torch.tensor([[1, 4, 4]])
        s["mm_token_type_ids"] = (ids == IMAGE).int()
    elif kind == "llava_next":
        s["pixel_values"] = torch.randn(1, 2, 3, 28, 28, generator=gen).to(dtype)
        s["image_sizes"] = torch.tensor([[28, 28]])
    else:
        size = 28
        s["pixel_values"] = torch.randn(1, 3, size, size, generator=gen).to(dtype)
    return s


def samples(name: str, model, seed: int, lengths=((2, 3), (3, 2))) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [make_sample(name, model, gen, p, a) for p, a in lengths]


def _images(group: list[dict]) -> dict:
    out = {"pixel_values": torch.cat([s["pixel_values"] for s in group])}
    for key in ("image_grid_thw", "image_sizes"):
        if key in group[0]:
            out[key] = torch.cat([s[key] for s in group])
    return out


def _padded(key, group, length, left):
    rows = []
    for s in group:
        x = s[key]
        pad = torch.zeros(length - len(x), dtype=x.dtype)
        rows.append(torch.cat([pad, x] if left else [x, pad]))
    return torch.stack(rows)


def batch(group: list[dict], layout: str = "padded", left: bool = False) -> dict:
    """Model inputs for samples laid out "padded" (one row each, attention_mask) or
    "packed" (one row, position_ids restarting per sample, no padding)."""
    keys = [k for k in ("input_ids", "token_type_ids", "mm_token_type_ids") if k in group[0]]
    out = _images(group)
    if layout == "packed":
        for k in keys:
            out[k] = torch.cat([s[k] for s in group])[None]
        out["position_ids"] = torch.cat([torch.arange(len(s["input_ids"])) for s in group])[None]
        return out
    length = max(len(s["input_ids"]) for s in group)
    for k in keys:
        out[k] = _padded(k, group, length, left)
    out["attention_mask"] = _padded("input_ids", [{"input_ids": torch.ones_like(s["input_ids"])} for s in group],
                                    length, left)
    return out


def live_positions(group: list[dict], layout: str, left: bool = False) -> list[tuple[int, slice]]:
    """(row, columns) of each sample's tokens in `batch(group, layout)`, in sample order."""
    out, start = [], 0
    length = max(len(s["input_ids"]) for s in group)
    for i, s in enumerate(group):
        n = len(s["input_ids"])
        if layout == "packed":
            out.append((0, slice(start, start + n)))
            start += n
        else:
            out.append((i, slice(length - n, length) if left else slice(0, n)))
    return out


PER_TOKEN = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")  # [B, N] model inputs


def prompt_only(sample: dict) -> dict:
    """The sample without its answer tokens (a generation prompt)."""
    keep = len(sample["input_ids"]) - sample["answer"]
    out = dict(sample, answer=0)
    for key in PER_TOKEN:
        if key in sample:
            out[key] = sample[key][:keep]
    return out


def extend_with_generated(name: str, inputs: dict, sequences: torch.Tensor) -> dict:
    """The per-token inputs of `inputs` (a prompt batch) extended over `sequences` (the
    prompt followed by generated tokens), as generate extends them: attention 1, and the
    token types of answer text (PaliGemma: 1, the suffix; Gemma 3 / Qwen: 0, text)."""
    new = sequences.shape[1] - inputs["input_ids"].shape[1]
    out = {"input_ids": sequences}
    fills = {"attention_mask": 1, "token_type_ids": int(FAMILIES[name].kind == "paligemma"), "mm_token_type_ids": 0}
    for key, fill in fills.items():
        if key in inputs:
            x = inputs[key]
            out[key] = torch.cat([x, torch.full((x.shape[0], new), fill, dtype=x.dtype)], 1)
    return out
