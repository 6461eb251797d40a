"""Test configuration: GPU tests are marked `gpu` and skipped without CUDA.

Without a GPU, Triton kernels run under the interpreter, which must be switched
on before any kernel module is imported, hence here, at collection start.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed():
    """A fresh seed per test, printed on failure, so cases differ run to run but reproduce."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    print(f"seed={s}")  # shown with the failure report
    return s
