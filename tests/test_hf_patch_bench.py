"""bench_hf --smoke: the unpatched, patched and patched-packed transformers LLaVA (LoRA and
QLoRA) train on the same samples and agree on the loss (packing must not change the math)."""
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_bench_hf_smoke(tmp_path):
    out = tmp_path / "bench_hf.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_hf.py"), "--smoke", "--qlora",
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"hf", "hf+patch", "hf+patch packed", "hf qlora", "hf+patch qlora", "hf+patch packed qlora"}
    for name, row in rows.items():
        assert row["tokens"] == rows["hf"]["tokens"] and row["supervised_tokens"] == rows["hf"]["supervised_tokens"]
        # fp32, 2 layers: summation order only, a few hundred ulps; samples that saw each other
        # in a packed row would move the loss by > 1e-2
        assert row["loss_gap"] < 2**10 * torch.finfo(torch.float32).eps, (name, row["loss"])
        assert row["tokens_per_s"] > 0 and "speedup" in row and "memory_ratio" in row
    assert rows["hf+patch packed"]["row_tokens"] % 256 == 0
    assert out.with_suffix(".md").exists()
