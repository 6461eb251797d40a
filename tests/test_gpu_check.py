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
