"""benchmarks/bench_memory.py: the analytic model matches what fastvlm.train really allocates."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_memory  # noqa: E402


def test_llava_7b_inventory_matches_published_sizes():
    parts = {}
    for t in bench_memory.inventory(bench_memory.LLAVA_7B):
        parts[t.part] = parts.get(t.part, 0) + t.numel
    assert parts["llm"] == 6_738_415_616  # Vicuna-7B / Llama-2-7B
    assert parts["encoder"] == 303_507_456  # CLIP ViT-L/14-336 vision tower
    assert parts["connector"] == 20_979_712  # LLaVA-1.5 mlp2x_gelu


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_small_mode_measured_equals_analytic(tmp_path):
    out = tmp_path / "memory.json"
    rows = bench_memory.main(["--small", "--rank", "8", "--out", str(out), "--device", "cpu"])
    assert json.loads(out.read_text())["rows"] == rows
    assert out.with_suffix(".md").is_file()
    by = {(r["method"], r["optimizer"], r["source"].split()[0]): r for r in rows}
    for (method, opt, source), row in by.items():
        if source != "measured":
            continue
        want = by[(method, opt, "analytic")]
        for key in ("weights_bytes", "grads_bytes", "optimizer_bytes", "trainable_params"):
            assert row[key] == want[key], (method, opt, key)
        assert row["peak_bytes"] > row["weights_bytes"] + row["optimizer_bytes"]
    measured = {k[:2]: r for k, r in by.items() if k[2] == "measured"}
    assert (measured["qlora", "adamw"]["weights_bytes"] < measured["lora", "adamw"]["weights_bytes"]
            < measured["full", "adamw"]["weights_bytes"])
    assert measured["qlora", "adamw8bit"]["optimizer_bytes"] < measured["qlora", "adamw"]["optimizer_bytes"]
    assert measured["qlora", "adamw"]["peak_bytes"] < measured["full", "adamw"]["peak_bytes"]
