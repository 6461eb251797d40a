"""VisionConfig: the switches that make one ViT a CLIP, SigLIP or DINOv2 encoder.

Its own module so that both the encoder (fastvlm/models/vision.py) and the Hugging
Face checkpoint reader (fastvlm/models/hf_vision.py) import it, one way.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fastvlm.ops.activations import activation
from fastvlm.utils.config import check_known_keys, check_required_keys

FAMILIES = ("clip", "siglip", "dinov2")


@dataclass(frozen=True)
class VisionConfig:
    family: str
    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_channels: int = 3
    act: str = "gelu"
    layer_norm_eps: float = 1e-5
    qkv_bias: bool = True
    patch_bias: bool = True
    class_token: bool = False
    pre_norm: bool = False
    layer_scale: bool = False
    num_register_tokens: int = 0
    # Accept other resolutions by resampling the position grid (bicubic).
    interpolate_pos: bool = False
    # DINOv2-with-registers resamples with antialiasing, plain DINOv2 without.
    interpolate_antialias: bool = False
    # A checkpoint's dropout / drop-path probability: not implemented, so training with it
    # > 0 is refused (eval and frozen towers are unaffected).
    dropout: float = 0.0

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family: expected one of {FAMILIES}, got {self.family!r}")
        activation(self.act, "act")  # a name of fastvlm.ops.activations' table
        for name in ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads",
                     "intermediate_size", "num_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_heads ({self.num_heads})")
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be at least patch_size ({self.patch_size})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout}")
        if self.num_register_tokens < 0:
            raise ValueError(f"num_register_tokens: expected >= 0, got {self.num_register_tokens}")
        if self.num_register_tokens and not self.class_token:
            raise ValueError("num_register_tokens: registers follow the class token; set class_token=True")

    @classmethod
    def from_dict(cls, values: dict) -> VisionConfig:
        check_known_keys(cls, values, 'VisionConfig')
        check_required_keys(cls, values, 'VisionConfig')
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> VisionConfig:
        return VisionConfig.from_dict({**self.to_dict(), **changes})

    @property
    def grid_size(self) -> int:
        # Pixels past the last whole patch are dropped (SigLIP-so400m: 384 px, 14 px patches).
        return self.image_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens: class token, then registers."""
        return int(self.class_token) + self.num_register_tokens

    # Family presets: the switches of the table above; keyword arguments override them.
    @classmethod
    def clip(cls, **fields) -> VisionConfig:
        return cls(**{"family": "clip", "act": "quick_gelu", "patch_bias": False, "class_token": True,
                      "pre_norm": True, **fields})

    @classmethod
    def siglip(cls, **fields) -> VisionConfig:
        return cls(**{"family": "siglip", "act": "gelu_tanh", "layer_norm_eps": 1e-6, **fields})

    @classmethod
    def dinov2(cls, **fields) -> VisionConfig:
        return cls(**{"family": "dinov2", "act": "gelu", "layer_norm_eps": 1e-6, "class_token": True,
                      "layer_scale": True, "interpolate_pos": True, **fields})


# Shapes of the encoders LLaVA-style VLMs use most (for benchmarks and random init).
CLIP_L14_336 = dict(image_size=336, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                    intermediate_size=4096)
SIGLIP_SO400M_384 = dict(image_size=384, patch_size=14, hidden_size=1152, num_layers=27,
                         num_heads=16, intermediate_size=4304)
