"""The attention benchmark's CPU smoke mode runs end to end and says it is no speed test."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("window", [None, 7])
def test_bench_attention_smoke(window, tmp_path):
    """--window W puts a sliding window on every layout and writes its own results file (the
    window-free table stays the README's headline)."""
    extra = [] if window is None else ["--window", str(window)]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attention.py"), "--smoke",
                           "--kinds", "mmca_split", "--out", str(tmp_path), *extra],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NOT a speed test" in proc.stdout
    tag = "smoke" if window is None else f"window{window}_smoke"
    (result,) = tmp_path.glob(f"bench_attention_{tag}_*.json")
    data = json.loads(result.read_text())
    assert {r["window"] for r in data["rows"]} == {window}
    methods = {r["method"] for r in data["rows"]}
    assert {"fastvlm", "reference"} <= methods
    assert all("fwd_bwd_ms" in r for r in data["rows"]), [r for r in data["rows"] if "error" in r]
    assert [r["method"] for r in data["training_loop"]] == ["fastvlm", "sdpa_dense"]
    assert list(tmp_path.glob(f"bench_attention_{tag}_*.png"))
