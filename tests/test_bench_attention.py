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


def test_kernels_compile_for_sm90_without_gpu():
    """The kernels lower through Triton's real CUDA backend and ptxas (not only the
    interpreter), at the tile config the launcher picks on an H100, within its shared memory."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention_resources.py"),
                           "--cap", "90", "--head-dim", "128"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sm90")]
    assert len(lines) == 6
    for line in lines:
        shared = int(line.split("shared")[1].split("B")[0])
        assert 0 < shared <= 227 * 1024, line
