"""bench_preference --smoke: fastvlm's shared-prompt DPO step and TRL's DPOTrainer train the
same tiny LLaVA on the same pairs and, at equal (non-trivial) adapter weights, agree on the
DPO loss and on the policy's log-probs of every answer; report.py reads the results."""
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import report  # noqa: E402


def test_bench_preference_smoke(tmp_path):
    out = tmp_path / "bench_preference.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_preference.py"), "--smoke", "--out",
                           str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    rows = {r["variant"]: r for r in d["rows"]}
    assert set(rows) == {"trl", "fastvlm"}
    trl, ours = rows["trl"], rows["fastvlm"]
    # the seeded adapters make the policy differ from the reference: not the first-step ln 2
    assert abs(trl["loss"] - math.log(2)) > 1e-3
    # fp32, a 2-layer model: the two stacks differ by summation order (padding, packing, the
    # fused log-prob's chunks) only, a few hundred ulps; a token misaligned or an answer that
    # saw the other answer moves the log-probs by whole nats
    for key in ("loss", "chosen_logp", "rejected_logp"):
        assert abs(ours[key] - trl[key]) <= 2**10 * torch.finfo(torch.float32).eps * abs(trl[key]), key
    assert ours["row_tokens"] % 512 == 0  # shared-prompt rows of the budget
    assert out.with_suffix(".md").exists()
    headline = report.EXTRACTORS[report.benchmark_of(out, d)](d)
    assert headline[0][0] == "DPO step vs TRL DPOTrainer: pairs/s" and headline[0][2] == ours["speedup"]
