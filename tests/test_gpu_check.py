"""The GPU check's CPU rehearsal: its steps run, a slow step is capped without
stopping the rest, and the bundle fits what a GPU session can bring back."""
import json
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_dry_run_collects_and_bundles(tmp_path):
    # the benchmark smoke runs have their own tests (test_bench_*) and `make build` is the build's
    # test: here the info and pytest steps run through the runner, and the plan's build step is checked
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out",
                           str(tmp_path), "--only", "info", "pytest"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["logs.tar.gz", "summary.json", "summary.md"]  # nothing under --out but the bundle
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["name"].split(" ")[0] for s in summary["steps"]] == ["import", "pytest"]
    assert all(s["status"] == "passed" for s in summary["steps"])
    assert summary["env"]["commit"] and summary["dry_run"] is True
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        assert len(tar.getnames()) == 2
    assert "| pytest -m gpu | passed |" in (tmp_path / "summary.md").read_text()


def test_a_step_over_its_cap_is_recorded_and_the_next_runs(tmp_path):
    slow = gpu_check.Step("slow", "slow", [sys.executable, "-c", "import time; time.sleep(30)"], cap_s=1)
    fast = gpu_check.Step("fast", "fast", [sys.executable, "-c", "print('ok')"], cap_s=30)
    broken = gpu_check.Step("broken", "broken", [sys.executable, "-c", "raise SystemExit(3)"], cap_s=30)
    import time
    deadline = time.monotonic() + 60
    outcomes = [gpu_check.run_step(s, tmp_path, deadline) for s in (slow, fast, broken)]
    assert [o.status for o in outcomes] == ["timeout", "passed", "failed"]
    assert outcomes[0].seconds < 10 and outcomes[2].returncode == 3
    assert "ok" in outcomes[1].tail
    spent = gpu_check.run_step(fast, tmp_path, time.monotonic())  # no budget left
    assert spent.status == "skipped"


def test_unknown_step_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out",
                           str(tmp_path), "--only", "bogus"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--only: unknown steps ['bogus']" in proc.stderr


def test_gpu_plan_builds_for_the_machines_arch_only(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "gpu_arch", lambda: "9.0")
    plan = {s.key: s for s in gpu_check.steps(False, tmp_path, sys.executable)}
    assert plan["build"].env["TORCH_CUDA_ARCH_LIST"] == "9.0" and plan["build"].env["FASTVLM_CUDA"] == "1"
    assert {"info", "pytest", "attention", "connector", "encoder", "lora", "train"} <= set(plan)
    assert "-m" in plan["pytest"].cmd and "gpu" in plan["pytest"].cmd


def test_a_step_never_outlasts_the_overall_budget(tmp_path):
    import time
    slow = gpu_check.Step("slow", "slow", [sys.executable, "-c", "import time; time.sleep(30)"], cap_s=30)
    t0 = time.monotonic()
    outcome = gpu_check.run_step(slow, tmp_path, time.monotonic() + 12)  # 12 s of budget left, cap 30 s
    assert outcome.status == "timeout" and time.monotonic() - t0 < 25


def test_gpu_plan_puts_the_headline_first_and_fits_the_budget(tmp_path, monkeypatch):
    """On the GPU: carried wheels, then the attention headline before anything else; every
    step capped, the caps summing to less than the 8-minute budget with a margin for the
    runner; pytest without -x (a first hardware run reports every failure), timed per test."""
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "flash_attn-2.8.3-cp312-cp312-linux_x86_64.whl").write_bytes(b"")
    monkeypatch.setattr(gpu_check, "WHEELS", wheels)
    monkeypatch.setattr(gpu_check, "gpu_arch", lambda: "9.0")
    monkeypatch.setattr(gpu_check, "_has_pytest_timeout", lambda python: True)
    plan = gpu_check.steps(False, tmp_path / "results", sys.executable, out=tmp_path)
    assert [s.key for s in plan[:2]] == ["wheels", "attention"]
    assert sum(s.cap_s for s in plan) <= gpu_check.BUDGET_S - 30
    headline = plan[1].cmd
    assert headline[1].endswith("bench_attention_headline.py") and headline[-2:] == ["--out", str(tmp_path)]
    pytest_cmd = next(s.cmd for s in plan if s.key == "pytest")
    assert "-x" not in pytest_cmd and "--timeout=60" in pytest_cmd


def test_headline_rehearsal_writes_every_row_with_the_configs(tmp_path):
    """The headline's CPU rehearsal (interpreter, tiny): one JSON line per (case, method),
    the static table's and auto's configs recorded."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out",
                           str(tmp_path), "--only", "attention"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "attention_headline.jsonl").read_text().splitlines()]
    cases = {(r["layout"], r["kind"]) for r in rows}
    assert cases == {("plain", "causal"), ("packed", "causal"), ("packed", "image_bidirectional"),
                     ("packed", "mmca_split")}
    for case in cases:
        methods = {r["method"]: r for r in rows if (r["layout"], r["kind"]) == case}
        assert {"fastvlm_table", "fastvlm_auto", "fastvlm_table_deterministic", "reference"} <= set(methods)
        assert all("fwd_bwd_ms" in r for r in methods.values()), methods
        assert methods["fastvlm_table"]["config"] and methods["fastvlm_auto"]["config"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| headline: attention fwd+bwd at 8k | passed |" in summary
    assert "| packed | mmca_split | fastvlm_auto |" in summary
