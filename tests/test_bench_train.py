"""bench_train --smoke: both stacks train the same tiny LLaVA on the same samples and
agree on the loss (same weights, same tokens: packing must not change the math)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
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


# One family in the suite (its time is near its limit): gemma3's path differs only in the
# tiny builder, and its --quick result is committed (benchmarks/results/bench_train_hf_gemma3_*).
@pytest.mark.parametrize("family", ["qwen2.5-vl"])
def test_bench_train_hf_smoke(tmp_path, family):
    """--hf: fastvlm (patched, packed), TRL's SFTTrainer and a plain PEFT loop train the same
    tiny VLM on the same samples: the same supervised targets and, at equal weights, the same
    loss per supervised token (the script fails loudly otherwise; checked here again)."""
    out = tmp_path / "bench_train_hf.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--hf", family, "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"trl", "hf+peft", "fastvlm"}
    assert len({r["supervised_tokens"] for r in rows.values()}) == 1
    assert rows["fastvlm"]["tokens"] == rows["hf+peft"]["tokens"]
    # fp32, a 2-layer model: padding, packing and TRL's fused head change summation order only
    # (a few hundred ulps of the mean); a label shifted by one token or samples attending
    # across a packed row move the loss by > 1e-2
    for r in rows.values():
        assert r["loss_gap"] < 2**10 * torch.finfo(torch.float32).eps, (family, r["variant"], r["loss"])
    assert rows["fastvlm"]["row_tokens"] % 256 == 0  # packed rows of the budget
    assert out.with_suffix(".md").exists()
