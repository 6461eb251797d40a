"""benchmarks/bench_encoder.py --smoke runs end to end and reports every policy."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_encoder_smoke(tmp_path):
    out = tmp_path / "encoder.json"
    res = subprocess.run([sys.executable, "benchmarks/bench_encoder.py", "--smoke", "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # also without `pip install -e .`
    assert res.returncode == 0, res.stderr
    assert "SMOKE" in res.stdout
    result = json.loads(out.read_text())
    # Written by common.save_results, like every benchmark: the JSON and its markdown twin.
    assert result["benchmark"] == "bench_encoder" and result["env"]["commit"]
    assert "| selective |" in out.with_suffix(".md").read_text()
    policies = {(r["model"], r["policy"]): r for r in result["policies"]}
    assert {p for _, p in policies} == {"none", "full", "selective", "every_k:2", "offload", "full+offload"}
    for (model, policy), row in policies.items():
        assert row["activation_bytes"] > 0 and row["step_s"] > 0
        if policy in ("full", "selective", "every_k:2", "full+offload"):  # memory is measured, not timed: deterministic
            assert row["memory_ratio"] < 0.8, (model, policy)
    assert all(r["cached_epoch_s"] > 0 and r["speedup_vs_reencode"] > 0 for r in result["cache"])
