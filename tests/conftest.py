"""Test configuration: GPU tests are marked `gpu` and skipped without CUDA.

Without a GPU, Triton kernels run under the interpreter, which must be switched
on before any kernel module is imported, hence here, at collection start.
"""
import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (make test: one worker per core) each worker takes its share of the
# cores, so workers do not oversubscribe them; subprocess runs set their own counts.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))


def pytest_collection_modifyitems(config, items):
    # `seeded`: the tests whose inputs FASTVLM_TEST_SEED changes (the stress run's subset).
    for item in items:
        if "seed" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.seeded)
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _base_seed():
    """FASTVLM_TEST_SEED=N replays a run (the seed is printed with every failure)."""
    fixed = os.environ.get("FASTVLM_TEST_SEED")
    if fixed is None:
        return None
    try:
        return int(fixed)
    except ValueError:
        raise pytest.UsageError(f"FASTVLM_TEST_SEED: expected an integer, got {fixed!r}") from None


BASE_SEED = _base_seed()


def pytest_report_header(config):
    return f"fastvlm test seed: {'fresh per test' if BASE_SEED is None else BASE_SEED} (FASTVLM_TEST_SEED)"


@pytest.fixture(autouse=True)
def _fixed_seed_unless_seeded(request):
    """A test without the `seed` fixture starts from a seed of its own id: the same inputs
    whatever FASTVLM_TEST_SEED is and whichever tests ran before it (it never saw a fresh
    seed; this keeps the earlier tests' seeds from reaching it)."""
    if "seed" not in request.fixturenames:
        torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def seed(request):
    """A fresh seed per test, printed on failure, so cases differ run to run but reproduce.

    With FASTVLM_TEST_SEED set, each test's seed derives from it and the test's id, so a
    whole run replays exactly and different tests still get different inputs.
    """
    if BASE_SEED is None:
        s = int.from_bytes(os.urandom(4), "little")
    else:
        s = zlib.crc32(f"{BASE_SEED}:{request.node.nodeid}".encode())
    torch.manual_seed(s)
    print(f"seed={s} (FASTVLM_TEST_SEED={BASE_SEED})")  # shown with the failure report
    return s
