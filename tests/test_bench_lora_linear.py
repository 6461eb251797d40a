"""benchmarks/bench_lora_linear.py --smoke: runs, checks the fused layer against PEFT's, writes its tables."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_lora_linear  # noqa: E402


def test_smoke_mode(tmp_path):
    out = tmp_path / "lora.json"
    rows = bench_lora_linear.main(["--smoke", "--reps", "1", "--out", str(out)])
    assert {r["impl"] for r in rows} == {"linear (floor)", "fastvlm triton", "fastvlm reference", "peft"}
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in rows)
    assert json.loads(out.read_text())["rows"] == rows
    assert "fastvlm triton" in out.with_suffix(".md").read_text()
