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
QWEN_TOKENS = dict(image_token_id=IMAGE, vision_start_token_id=VOCAB - 3, vision_end_token_id=VOCAB - 2,
                   video_token_id=VOCAB - 4)


def _qwen2_vl(attn):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
    cfg = Qwen2VLConfig(text_config=QWEN_TEXT, vision_config=vision, attn_implementation=attn, **QWEN_TOKENS)
    return Qwen2VLForConditionalGeneration(cfg)


def _qwen2_5_vl(attn):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=28,
                  fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig(text_config=QWEN_TEXT, vision_config=vision, attn_implementation=attn, **QWEN_TOKENS)
    return Qwen2_5_VLForConditionalGeneration(cfg)


def _qwen3_vl(attn):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    # head_dim 8: rope over 4 frequencies, mrope_section [1, 1, 2] (interleaved T/H/W);
    # 16 learned position embeddings (a 4x4 grid), resampled to each image's grid
    text = dict(QWEN_TEXT, head_dim=8, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2],
                                                        "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, attn_implementation=attn, **QWEN_TOKENS)
    return Qwen3VLForConditionalGeneration(cfg)


IDEFICS_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=56, patch_size=14)  # 4x4 patches per tile, pixel-shuffled to 2x2 tokens


def _idefics3(attn):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    cfg = Idefics3Config(text_config=LLAMA, vision_config=IDEFICS_VISION, scale_factor=2, image_token_id=IMAGE,
                         attn_implementation=attn)
    return Idefics3ForConditionalGeneration(cfg)


def _smolvlm(attn):
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    cfg = SmolVLMConfig(text_config=LLAMA, vision_config=IDEFICS_VISION, scale_factor=2, image_token_id=IMAGE,
                        attn_implementation=attn)
    return SmolVLMForConditionalGeneration(cfg)


ONEVISION_PINPOINTS = [[28, 28], [28, 56], [56, 28]]


def _llava_onevision(attn):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    # anyres: a 28x28 base tile plus a grid of 28x28 tiles (1x1, 1x2 or 2x1) chosen from each
    # image's size, unpadded back to its aspect ratio, a newline embedding after each row
    cfg = LlavaOnevisionConfig(text_config=LLAMA, vision_config=dict(SIGLIP, patch_size=7), image_token_index=IMAGE,
                               video_token_index=VOCAB - 4, image_grid_pinpoints=ONEVISION_PINPOINTS,
                               attn_implementation=attn)
    return LlavaOnevisionForConditionalGeneration(cfg)


@dataclass(frozen=True)
class Spec:
    name: str
    build: object
    image_tokens: int
    kind: str  # "llava", "llava_next", "gemma3", "paligemma", "qwen", "idefics3", "llava_onevision"


FAMILIES = {
    "llava": Spec("llava", _llava, 4, "llava"),
    "llava_next": Spec("llava_next", _llava_next, 0, "llava_next"),  # counted from the model
    "gemma3": Spec("gemma3", _gemma3, 4, "gemma3"),
    "paligemma": Spec("paligemma", _paligemma, 4, "paligemma"),
    "qwen2_vl": Spec("qwen2_vl", _qwen2_vl, 4, "qwen"),
    "qwen2_5_vl": Spec("qwen2_5_vl", _qwen2_5_vl, 4, "qwen"),
    "qwen3_vl": Spec("qwen3_vl", _qwen3_vl, 0, "qwen"),  # counted from the grid
    "idefics3": Spec("idefics3", _idefics3, 0, "idefics3"),  # counted from the tiles
    "smolvlm": Spec("smolvlm", _smolvlm, 0, "idefics3"),
    "llava_onevision": Spec("llava_onevision", _llava_onevision, 0, "llava_onevision"),  # counted from the model
}


def build(name: str, seed: int, dtype=torch.float32, attn: str = "eager", width: int = 32):
    """`width` (LLaVA only): hidden size of both towers, for bitsandbytes' CPU kernels."""
    torch.manual_seed(seed)
    model = _llava(attn, width) if name == "llava" else FAMILIES[name].build(attn)
    return model.to(dtype)


# Images of different sizes / patch grids, by sample index (a packed row holds several); the
# first two give equal token counts, so that two prompts need no padding (generation tests):
QWEN3_GRIDS = ([1, 4, 8], [1, 8, 4], [1, 4, 4])  # Qwen3-VL: 8, 8, 4 merged tokens
IDEFICS_TILES = (1, 1, 2)  # Idefics3 / SmolVLM image splitting: tiles of 4 tokens each; the
IDEFICS_LIVE_ROWS = (56, 35, 56)  # second image is 35 pixel rows high (its tile padded, pixel mask)
# LLaVA-OneVision anyres: [28, 28] and [28, 21] a 1x1 grid (4x4 features); [28, 42] a 1x2 grid
# (4x8 features) unpadded to 4x6
ONEVISION_SIZES = ([28, 28], [28, 21], [28, 42])


def qwen_grid(name: str, index: int) -> list[int]:
    return QWEN3_GRIDS[index % len(QWEN3_GRIDS)] if name == "qwen3_vl" else [1, 4, 4]


def image_token_count(name: str, model, index: int = 0) -> int:
    kind = FAMILIES[name].kind
    if kind == "qwen":
        t, h, w = qwen_grid(name, index)
        return t * h * w // 4
    if kind == "idefics3":
        return 4 * IDEFICS_TILES[index % len(IDEFICS_TILES)]
    if kind not in ("llava_next", "llava_onevision"):
        return FAMILIES[name].image_tokens
    size = ONEVISION_SIZES[index % len(ONEVISION_SIZES)] if kind == "llava_onevision" else [28, 28]
    px = _anyres_pixels(name, model, size, torch.Generator().manual_seed(0))
    feats = model.model.get_image_features(px, image_sizes=torch.tensor([size]))
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    return sum(f.shape[0] for f in feats)


def _anyres_pixels(name: str, model, size, gen) -> torch.Tensor:
    """[1, tiles, 3, 28, 28]: the base tile and the anyres grid's tiles of an image of `size`."""
    tiles = 2
    if FAMILIES[name].kind == "llava_onevision":
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        tiles = image_size_to_num_patches(size, model.config.image_grid_pinpoints, 28)
    return torch.randn(1, tiles, 3, 28, 28, generator=gen).to(next(model.parameters()).dtype)


def make_sample(name: str, model, gen: torch.Generator, prompt: int, answer: int, index: int = 0) -> dict:
    """One sample: `prompt` text tokens, an image, `prompt` more, then `answer` tokens.
    token_type_ids (Gemma 3: 1 on image tokens; PaliGemma: 0 on the prefix). `index`: the
    sample's place in its group, which picks its image's size where the family varies it."""
    kind, n_img = FAMILIES[name].kind, image_token_count(name, model, index)
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
        grid = qwen_grid(name, index)
        s["pixel_values"] = torch.randn(grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14, generator=gen).to(dtype)
        s["image_grid_thw"] = torch.tensor([grid])
        s["mm_token_type_ids"] = (ids == IMAGE).int()
    elif kind in ("llava_next", "llava_onevision"):
        size = ONEVISION_SIZES[index % len(ONEVISION_SIZES)] if kind == "llava_onevision" else [28, 28]
        s["pixel_values"] = _anyres_pixels(name, model, size, gen)
        s["image_sizes"] = torch.tensor([size])
    elif kind == "idefics3":
        tiles = IDEFICS_TILES[index % len(IDEFICS_TILES)]
        s["pixel_values"] = torch.randn(1, tiles, 3, 56, 56, generator=gen).to(dtype)
        mask = torch.zeros(1, tiles, 56, 56, dtype=torch.bool)
        mask[..., : IDEFICS_LIVE_ROWS[index % len(IDEFICS_LIVE_ROWS)], :] = True
        s["pixel_values"] = s["pixel_values"] * mask[:, :, None]  # padding pixels are 0, as the processor's
        s["pixel_attention_mask"] = mask
    else:
        size = 28
        s["pixel_values"] = torch.randn(1, 3, size, size, generator=gen).to(dtype)
    return s


def qwen3_video_sample(model, gen: torch.Generator, prompt: int, answer: int, grid=(2, 4, 4)) -> dict:
    """A Qwen3-VL video sample as its processor lays one out: `prompt` text tokens, then per
    temporal slice of the grid a timestamp (text) and the slice's tokens between vision
    start / end tokens, `prompt` more, then `answer` tokens. get_rope_index then takes each
    slice as its own [1, h, w] grid, positioned after its timestamp."""
    t, h, w = grid
    text = lambda k: torch.randint(0, TEXT_MAX, (k,), generator=gen)  # noqa: E731
    frames = [torch.cat([text(1), torch.tensor([QWEN_TOKENS["vision_start_token_id"]]),
                         torch.full((h * w // 4,), QWEN_TOKENS["video_token_id"]),
                         torch.tensor([QWEN_TOKENS["vision_end_token_id"]])]) for _ in range(t)]
    ids = torch.cat([text(prompt), *frames, text(prompt), text(answer)])
    dtype = next(model.parameters()).dtype
    return {"input_ids": ids, "answer": answer, "mm_token_type_ids": 2 * (ids == QWEN_TOKENS["video_token_id"]).int(),
            "pixel_values_videos": torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=gen).to(dtype),
            "video_grid_thw": torch.tensor([list(grid)])}


def onevision_multi_image_sample(model, gen: torch.Generator, prompt: int, answer: int,
                                 sizes=([28, 28], [28, 42])) -> dict:
    """A LLaVA-OneVision sample with several images, which the model reads as base tiles only
    (no anyres grid; `batch_num_images` says which sample has several): `prompt` text tokens,
    the images with a text token between them, `prompt` more, then `answer` tokens."""
    text = lambda k: torch.randint(0, TEXT_MAX, (k,), generator=gen)  # noqa: E731
    pixels = [_anyres_pixels("llava_onevision", model, size, gen) for size in sizes]
    pixels = torch.cat([_pad_dim1(p, max(q.shape[1] for q in pixels)) for p in pixels])
    per_image = model.model.get_image_features(pixels, image_sizes=torch.tensor(sizes),
                                               batch_num_images=torch.tensor([len(sizes)])).pooler_output
    parts = [text(prompt)]
    for feats in per_image:
        parts += [torch.full((feats.shape[0],), IMAGE), text(1)]
    ids = torch.cat(parts + [text(prompt - 1), text(answer)])
    return {"input_ids": ids, "answer": answer, "pixel_values": pixels, "image_sizes": torch.tensor(sizes),
            "batch_num_images": torch.tensor([len(sizes)])}


def samples(name: str, model, seed: int, lengths=((2, 3), (3, 2))) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [make_sample(name, model, gen, p, a, i) for i, (p, a) in enumerate(lengths)]


def _pad_dim1(x: torch.Tensor, size: int) -> torch.Tensor:
    """x padded with zeros along dim 1 (tiles of an image / images of a sample) to `size`."""
    return torch.cat([x, x.new_zeros(x.shape[0], size - x.shape[1], *x.shape[2:])], 1)


def _images(group: list[dict], packed: bool = False) -> dict:
    """The group's vision inputs: Qwen's patches and grids concatenated; anyres tiles
    [images, max tiles, ...] (padding tiles beyond each image's count, which the model
    drops); Idefics3 tiles [rows, max tiles, ...] (all-zero padding tiles, which the
    model drops), one row's worth when packed."""
    out = {}
    for key in ("pixel_values", "pixel_attention_mask", "image_grid_thw", "image_sizes", "pixel_values_videos",
                "video_grid_thw", "batch_num_images"):
        xs = [s[key] for s in group if key in s]  # a Qwen video sample has no image, and the reverse
        if not xs:
            continue
        if "pixel_attention_mask" in group[0]:  # Idefics3: images of a row along dim 1
            out[key] = torch.cat(xs, 1) if packed else torch.cat([_pad_dim1(x, max(y.shape[1] for y in xs))
                                                                  for x in xs])
        elif key == "pixel_values" and xs[0].dim() == 5:  # anyres: tiles of an image along dim 1
            out[key] = torch.cat([_pad_dim1(x, max(y.shape[1] for y in xs)) for x in xs])
        else:
            out[key] = torch.cat(xs)
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
    out = _images(group, packed=layout == "packed")
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
