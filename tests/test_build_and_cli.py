"""The compiled extension, `fastvlm info`, the demo and the benchmark scripts run."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from fastvlm import _ext

ROOT = Path(__file__).resolve().parents[1]


def test_extension_built_with_cuda_when_toolkit_present():
    """On our machines (nvcc + CUDA torch) the CUDA part must compile, even without a GPU."""
    assert _ext.available(), _ext.load_error
    if shutil.which("nvcc") and torch.version.cuda and os.environ.get("FASTVLM_CUDA", "auto") != "0":
        assert _ext.cuda_built()
        assert _ext.cuda_archs() == os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    assert hasattr(torch.ops.fastvlm, "block_map")


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_info_tells_the_truth(capsys):
    """In a fresh process (what it reports of the extension is that process's); the text
    form of the same report in this one (a second process would cost its imports again)."""
    from fastvlm import cli

    res = _run("-m", "fastvlm", "info", "--json")
    assert res.returncode == 0, res.stderr
    env = json.loads(res.stdout)
    assert env["packages"]["torch"] == torch.__version__.split("+")[0]
    assert env["extension"]["built"] == _ext.available()
    assert env["extension"]["cuda_kernels"] == _ext.cuda_built()
    assert (env["gpu"] is not None) == torch.cuda.is_available()
    assert env["ops"]["block_map"]["cpu"] == ("cpp" if _ext.available() else "reference")
    assert cli.main(["info"]) == 0 and "backend chosen by backend='auto'" in capsys.readouterr().out


def test_import_without_extension_falls_back():
    """A missing _C never breaks `import fastvlm`: block maps come from the reference."""
    code = ("import sys; sys.modules['fastvlm._C'] = None\n"
            "import torch, fastvlm\n"
            "from fastvlm import _ext\n"
            "from fastvlm.ops import AttentionLayout\n"
            "assert not _ext.available() and _ext.load_error\n"
            "L = AttentionLayout(torch.zeros(1, 9, dtype=torch.int32))\n"
            "assert L.block_map(4).visited_tiles() == 6\n"
            "from fastvlm.cli import environment\n"
            "assert environment()['ops']['block_map']['cpu'] == 'reference'\n")
    res = _run("-c", code)
    assert res.returncode == 0, res.stderr


def test_demo_runs(capsys):
    """In this process: `python -m fastvlm` itself runs in test_info_tells_the_truth."""
    from fastvlm import cli

    assert cli.main(["demo", "--seq-len", "1024"]) == 0
    assert "max |blockwise - dense|" in capsys.readouterr().out


def test_bench_layout_smoke(tmp_path):
    out = tmp_path / "mask.json"
    res = _run("benchmarks/bench_layout.py", "--sizes", "700", "--smoke", "--out", str(out))
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {r["kind"] for r in rows} == {"causal", "prefix_lm", "image_bidirectional", "mmca"}
    assert all(r["flex_s"] > 0 and r["reference_s"] > 0 for r in rows)


def test_bench_all_passes_its_options_to_run_all(monkeypatch):
    """`fastvlm bench all` runs the checkout's benchmarks/run_all.py with this Python and the
    options as run_all spells them (the run itself: test_run_all's smoke run, started by the CLI)."""
    from fastvlm import cli

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 3))
    assert cli.benchmarks_dir() == ROOT / "benchmarks"
    assert cli.main(["bench", "all", "--quick", "--only", "memory", "vlm", "--out", "res", "--timeout", "60"]) == 3
    assert cli.main(["bench", "all"]) == 3
    script = str(ROOT / "benchmarks" / "run_all.py")
    assert calls == [[sys.executable, script, "--quick", "--only", "memory", "vlm", "--out", "res", "--timeout",
                      "60.0"], [sys.executable, script]]
    for bad in (["bench"], ["bench", "some"], ["bench", "all", "--quick", "--smoke"]):
        try:
            cli.main(bad)
        except SystemExit as stop:
            assert stop.code == 2, bad
        else:
            raise AssertionError(f"{bad}: accepted")


def test_bench_without_the_benchmark_scripts_says_where_they_are(monkeypatch, tmp_path, capsys):
    from fastvlm import cli

    monkeypatch.setattr(cli, "benchmarks_dir", lambda: tmp_path / "benchmarks")  # a pip install: no checkout
    assert cli.main(["bench", "all", "--quick"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "benchmarks") in err and "ship with the source" in err and "run_all.py" in err
