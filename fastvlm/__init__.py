"""fastvlm: efficient kernels and a training stack for vision-language models.

Importing never fails for want of an optional piece (GPU, compiled extension,
flash-attn, xformers): each op falls back to its reference implementation, and
`fastvlm info` says what is in use.
"""
__version__ = "0.1.0"

from fastvlm.utils import quiet  # noqa: E402

quiet.install()  # before anything imports bitsandbytes

from fastvlm import ops  # noqa: E402,F401
from fastvlm.models.vlm import VLM, VLMConfig  # noqa: E402

__all__ = ["VLM", "VLMConfig", "ops"]
