"""Triton kernels and their launchers, one module per op (fastvlm.ops.<op> composes them).

Nothing here imports fastvlm.ops; importing this package itself needs no triton.
"""
import os

# triton.jit picks interpreter or compiler when a kernel is defined, i.e. when a kernel
# module is imported: the environment at fastvlm's import decides for the process
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
