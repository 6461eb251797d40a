"""Test configuration: GPU tests are marked `gpu` and skipped without CUDA.

Without a GPU, Triton kernels run under the interpreter, which must be switched
on before any kernel module is imported, hence here, at collection start.

The test files run longest first, by tests/file_seconds.json (a completed
`pytest --file-seconds tests/file_seconds.json ...` run updates the entries of the
files it ran): under pytest-xdist's loadfile a file is one unit of work, handed out
in collection order (make test passes --no-loadscope-reorder), so the run ends on
short files instead of one worker finishing a long file while the others wait.
"""
import json
import os
import zlib
from collections import defaultdict
from pathlib import Path

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


FILE_SECONDS_PATH = Path(__file__).with_name("file_seconds.json")


def pytest_addoption(parser):
    parser.addoption("--file-seconds", metavar="PATH", default=None,
                     help="write each test file's seconds (setup, call, teardown summed) to PATH as JSON")


def _file_seconds(path: Path = FILE_SECONDS_PATH) -> dict[str, float]:
    try:
        seconds = json.loads(path.read_text())
    except (OSError, ValueError):  # missing or damaged: the files keep their collection order
        return {}
    return seconds if isinstance(seconds, dict) else {}


def pytest_collection_modifyitems(config, items):
    # Longest files first (stable: a file's tests keep their order); a file not yet timed
    # goes after the timed ones.
    seconds = _file_seconds()
    items.sort(key=lambda item: -seconds.get(item.path.name, 0.0))
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


_SPENT = defaultdict(float)


def pytest_runtest_logreport(report):
    # Under xdist the controller receives every worker's reports, so it sums the whole run.
    _SPENT[report.nodeid.split("::")[0].rsplit("/", 1)[-1]] += report.duration


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--file-seconds")
    if not path or hasattr(session.config, "workerinput") or not _SPENT:  # the controller (or the only process)
        return
    if exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        return  # interrupted: partial sums would misorder the next run
    # the files that ran replace their entries; the others keep theirs (a run of a few files)
    merged = _file_seconds(Path(path)) | {f: round(t, 1) for f, t in _SPENT.items()}
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(dict(sorted(merged.items())), indent=0) + "\n")
    tmp.replace(path)


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
