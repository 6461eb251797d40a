"""A blank image through a Hugging Face VLM's image path, weighted 0: what a training
micro-batch without images adds to its input embeddings when the vision tower is FSDP-sharded.

Under FSDP each rank gathers a sharded block's weights as it runs it, and reduces every
unit's gradients by parameter: a rank whose micro-batch holds no image would skip the
tower's gathers (and leave the connector without gradients) while another rank's
micro-batch runs them, and the job would hang. ``blank_image_term(hf)`` runs the model's
own ``get_image_features`` (the tower and the projector, Qwen's mergers and deepstack
mergers included) on one minimal image of the family's input shape, and returns 0 times
the sum of what a batch's embeddings would receive: exactly 0 (the features are finite),
whose gradients are zeros on exactly the parameters an image gives gradients to, so the
loss and the gradient are those of the micro-batch alone. ``blank_image_in_embeddings``
adds it to the input embeddings (not to the loss): the tower then runs where a batch's
images run it, before the decoder, and the decoder's first layer gets an input that needs
a gradient, as image features give it; otherwise FSDP would reduce that layer's gradients
at the end of backward on this rank and during it on the others (a collective mismatch).
``fastvlm.VLM.blank_image_term`` does the same for the native VLM.

The blank image per family (``blank_image_inputs``):

- Qwen2-VL / Qwen2.5-VL / Qwen3-VL: one merge group of patches (``image_grid_thw``
  ``[1, m, m]``, m the spatial merge size);
- LLaVA, Gemma 3, PaliGemma: one image at the tower's size;
- LLaVA-NeXT / LLaVA-OneVision: one image at the tower's size with its ``image_sizes``
  (its base tile and the anyres tiles of that size);
- Idefics3 / SmolVLM: one tile at the tower's size with its ``pixel_attention_mask``.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from fastvlm.integrations.transformers import family_of

# Not 0: Idefics3 / SmolVLM drop an all-zero tile as batch padding (no tile would be left).
BLANK_PIXEL = 1.0
ANYRES = ("llava_next", "llava_onevision")  # model_types whose images come with image_sizes
TILED = ("idefics3", "smolvlm")  # model_types whose tiles come with a pixel_attention_mask


def blank_image_inputs(hf: nn.Module) -> dict[str, torch.Tensor]:
    """The keyword arguments of ``hf.model.get_image_features`` for one minimal blank image
    of the family `hf` (a patched transformers VLM), on its device; pixels in float32, as
    its processor gives them (each family casts them to its tower's dtype)."""
    family = family_of(hf)
    vision = hf.config.vision_config
    device = hf.device
    if family.qwen_vision:
        merge = vision.spatial_merge_size
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        return {"pixel_values": torch.full((merge * merge, patch), BLANK_PIXEL, device=device),
                "image_grid_thw": torch.tensor([[1, merge, merge]], device=device)}
    size, channels = vision.image_size, vision.num_channels
    if family.model_type in ANYRES:
        tiles = image_size_to_num_patches([size, size], hf.config.image_grid_pinpoints, size)
        return {"pixel_values": torch.full((1, tiles, channels, size, size), BLANK_PIXEL, device=device),
                "image_sizes": torch.tensor([[size, size]], device=device)}
    if family.model_type in TILED:
        return {"pixel_values": torch.full((1, 1, channels, size, size), BLANK_PIXEL, device=device),
                "pixel_attention_mask": torch.ones(1, 1, size, size, dtype=torch.bool, device=device)}
    return {"pixel_values": torch.full((1, channels, size, size), BLANK_PIXEL, device=device)}


def blank_image_term(hf: nn.Module) -> torch.Tensor:
    """Exactly 0, computed from one blank image by `hf`'s image path (tower and projector):
    added to a training forward, it runs the modules a batch with images runs and gives their
    parameters zero gradients, leaving the loss and every other gradient unchanged."""
    out = hf.model.get_image_features(**blank_image_inputs(hf))
    features = tensors([out.pooler_output, getattr(out, "deepstack_features", None)])  # Qwen3-VL's deepstack
    if not features:
        raise ValueError(f"model: {type(hf.model).__name__}.get_image_features gave no image features")
    # 0 times a finite sum is exactly 0, and its gradients (0 times finite Jacobians) are
    # zeros, which leave every sum they join exact.
    return sum(t.sum() for t in features) * 0


def tensors(value) -> list[torch.Tensor]:
    """The tensors in a nest of lists / tuples (None skipped)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors(item)]
    return []


@contextlib.contextmanager
def blank_image_in_embeddings(hf: nn.Module):
    """Within: the next call of `hf`'s input embeddings adds blank_image_term(hf) to its output."""
    def add(module, args, output):
        handle.remove()  # once: the forward's token embeddings
        return output + blank_image_term(hf)

    handle = hf.get_input_embeddings().register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()
