"""Tokens a Hugging Face processor puts in place of a sample's images, from the images'
sizes and the processor's own configuration (no pixel processed): what the packing
length estimates (``HFProcessorDataset.lengths``) add to a sample's text.

Where the processor's own per-image count (``_get_num_multimodal_tokens``) is not the
count of a whole sample, the family's rule from its processor:

- LLaVA-OneVision: a sample of several images gives each its base tile only
  (``num_image_tokens`` features and one image newline), not the anyres tiles of its
  size that the per-image count assumes (a sample of one image);
- SmolVLM: no count of its own; an image becomes the processor's own prompt string
  (tile tags, newlines, the global image, ``image_seq_len`` ``<image>`` per tile) for the
  rows x columns of tiles its image processor makes of that size, tokenized. The string
  starts and ends with a special token, so its tokens are those it has inside a render:
  exact.
"""
from __future__ import annotations

from transformers import LlavaOnevisionProcessor, SmolVLMProcessor


def sample_image_tokens(processor, sizes: list[tuple[int, int]], memo: dict) -> int | None:
    """Tokens in place of the images of one sample of image `sizes` ((height, width) each);
    None where the processor cannot say without an image. `memo`: a dict the caller keeps
    (SmolVLM's count per tile grid)."""
    if isinstance(processor, LlavaOnevisionProcessor) and len(sizes) > 1:
        return len(sizes) * onevision_base_tile_tokens(processor)
    if isinstance(processor, SmolVLMProcessor):
        return sum(smolvlm_image_tokens(processor, size, memo) for size in sizes)
    if hasattr(processor, "_get_num_multimodal_tokens"):
        return int(sum(processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]))
    return None


def onevision_base_tile_tokens(processor) -> int:
    """An image of a multi-image sample: its base tile's features and the image newline
    (the class token dropped under the 'default' feature selection), as the processor's
    replace_image_token counts it."""
    return processor.num_image_tokens + 1 - (processor.vision_feature_select_strategy == "default")


def smolvlm_image_tokens(processor, size: tuple[int, int], memo: dict) -> int:
    """Tokens of the processor's prompt string for one image of `size`."""
    _, rows, cols = processor.image_processor.get_number_of_image_patches(*size, {})
    if (rows, cols) not in memo:
        text = processor.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, 0)
        memo[rows, cols] = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    return memo[rows, cols]


def estimator_code() -> tuple:
    """The functions whose code the estimates depend on (for a length cache's key)."""
    return sample_image_tokens, onevision_base_tile_tokens, smolvlm_image_tokens
