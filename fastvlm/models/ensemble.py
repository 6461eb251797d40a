"""EncoderEnsemble: several vision encoders (e.g. SigLIP-384 + DINOv2-224) in one module.

Each member has its own resolution, preprocessing and selected layers; the
output is, per encoder, the list of its selected [B, T, C] hidden states, the
input a multi-level connector takes.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastvlm.models.preprocess import ImagePreprocessor
from fastvlm.models.vision import VisionEncoder


class EncoderEnsemble(nn.Module):
    def __init__(self, encoders: Sequence[VisionEncoder], select_layers: Sequence[Sequence[int]],
                 preprocessors: Sequence[ImagePreprocessor] | None = None):
        super().__init__()
        if not encoders:
            raise ValueError("encoders: expected at least one VisionEncoder")
        if len(select_layers) != len(encoders):
            raise ValueError(f"select_layers: expected one list per encoder ({len(encoders)}), "
                             f"got {len(select_layers)}")
        if preprocessors is None:
            preprocessors = [ImagePreprocessor.for_family(e.config.family, e.config.image_size) for e in encoders]
        if len(preprocessors) != len(encoders):
            raise ValueError(f"preprocessors: expected one per encoder ({len(encoders)}), got {len(preprocessors)}")
        for encoder, layers in zip(encoders, select_layers):
            encoder.resolve_layers(layers)  # validate now rather than at the first batch
        self.encoders = nn.ModuleList(encoders)
        self.select_layers = [list(layers) for layers in select_layers]
        self.preprocessors = list(preprocessors)

    def preprocess(self, images) -> list[torch.Tensor]:
        """Pixel values for each encoder, from one list of images."""
        return [preprocess(images) for preprocess in self.preprocessors]

    def forward(self, pixel_values: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        if isinstance(pixel_values, torch.Tensor) or len(pixel_values) != len(self.encoders):
            raise ValueError(f"pixel_values: expected a list of {len(self.encoders)} tensors, one per encoder")
        batch_sizes = {p.shape[0] for p in pixel_values}
        if len(batch_sizes) != 1:
            raise ValueError(f"pixel_values: all encoders need the same batch size, got {sorted(batch_sizes)}")
        return [encoder(pixels, select_layers=layers)
                for encoder, pixels, layers in zip(self.encoders, pixel_values, self.select_layers)]
