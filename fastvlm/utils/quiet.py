"""Third-party log lines that read as failures but are not, kept out of fastvlm's output.

Only the exact messages listed are dropped; everything else those loggers say (real errors
included) still comes through.
"""
from __future__ import annotations

import logging

# bitsandbytes logs this when it is imported (peft imports it) on a CPU with AVX512-BF16 and
# the optional `kernels` package is absent; it then uses its own CPU 4-bit kernel, the one
# fastvlm's QLoRA tests run. A user reads "Failed to load" as a failed run.
BENIGN = {"bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",)}


class DropBenign(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def install() -> None:
    """Attach the filters (idempotent); a logger object exists before its module is imported."""
    for name, prefixes in BENIGN.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropBenign) for f in logger.filters):
            logger.addFilter(DropBenign(prefixes))
