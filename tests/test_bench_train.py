"""bench_train --smoke: both stacks train the same tiny LLaVA on the same samples and
agree on the loss (same weights, same tokens: packing must not change the math)."""
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_smoke(tmp_path):
    out = tmp_path / "bench_train.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"hf+peft", "fastvlm"}
    base, ours = rows["hf+peft"], rows["fastvlm"]
    assert base["tokens"] == ours["tokens"] and base["supervised_tokens"] == ours["supervised_tokens"]
    # fp32 on both sides, a 2-layer model: the losses differ by summation order only, a few
    # hundred ulps at most; a mask that let packed samples interact moves it by > 1e-2.
    assert ours["loss_gap"] < 2**10 * torch.finfo(torch.float32).eps, (base["loss"], ours["loss"])
    assert ours["row_tokens"] % 256 == 0  # packed rows of the budget
    assert out.with_suffix(".md").exists()
