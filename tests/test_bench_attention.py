"""The attention benchmark's CPU smoke mode runs end to end and says it is no speed test."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_attention_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attention.py"), "--smoke",
                           "--kinds", "mmca_split", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NOT a speed test" in proc.stdout
    (result,) = tmp_path.glob("bench_attention_smoke_*.json")
    data = json.loads(result.read_text())
    methods = {r["method"] for r in data["rows"]}
    assert {"fastvlm", "reference"} <= methods
    assert all("fwd_bwd_ms" in r for r in data["rows"]), [r for r in data["rows"] if "error" in r]
    assert [r["method"] for r in data["training_loop"]] == ["fastvlm", "sdpa_dense"]
    assert list(tmp_path.glob("bench_attention_smoke_*.png"))
