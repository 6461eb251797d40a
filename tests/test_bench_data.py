"""benchmarks/bench_data.py --smoke runs end to end and reports every case."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_data_smoke(tmp_path):
    out = tmp_path / "data.json"
    res = subprocess.run([sys.executable, "benchmarks/bench_data.py", "--smoke", "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    assert "SMOKE" in res.stdout
    result = json.loads(out.read_text())
    assert result["benchmark"] == "bench_data" and result["env"]["commit"]
    assert "| llava_mix | packed bfd |" in out.with_suffix(".md").read_text()
    assert [r["workers"] for r in result["loader"]] == [0, 2]
    for row in result["loader"]:
        assert row["samples"] == 12 and row["skipped"] == 0
        assert row["samples_per_s"] > 0 and row["real_tokens_per_s"] > 0
        assert 0 < row["packing_efficiency"] <= 1
    cases = {(r["distribution"], r["strategy"]) for r in result["packing"]}
    assert len(cases) == 15 and all(0 < r["packing_efficiency"] <= 1 for r in result["packing"])
    packed = {r["distribution"]: r["packing_efficiency"] for r in result["packing"] if r["strategy"] == "packed bfd"}
    # bfd rows: any two overflow the budget, so the plan is over half full whatever the lengths
    assert all(e > 0.5 for e in packed.values())
