"""The GPU check's CPU rehearsal: the plan puts the attention headline first and fits its
budget, a step over its cap is stopped (and told first, so it keeps what it measured)
without stopping the rest, every result is on disk as soon as it is measured, and --out
never holds more than a GPU session can bring back."""
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import attention_targets  # noqa: E402
import bench_attention_headline as headline  # noqa: E402
import gpu_check  # noqa: E402
from bench_attention import build_layout  # noqa: E402

MAX_FILES_BACK = 8  # what the device tool brings back from $OUT


def _gpu_plan(tmp_path, monkeypatch, wheels=True):
    folder = tmp_path / "whl"
    folder.mkdir(parents=True)
    if wheels:
        (folder / "flash_attn-2.8.3-cp312-cp312-linux_x86_64.whl").write_bytes(b"")
    monkeypatch.setattr(gpu_check, "WHEELS", folder)
    monkeypatch.setattr(gpu_check, "gpu_arch", lambda: "9.0")
    monkeypatch.setattr(gpu_check, "_has_pytest_timeout", lambda python: True)
    return gpu_check.steps(False, tmp_path / "results", sys.executable, out=tmp_path)


def test_gpu_plan_puts_the_headline_first_and_fits_the_budget(tmp_path, monkeypatch):
    """On the GPU: carried wheels, then the attention headline before anything else; every
    step capped, the caps (with carried wheels) leaving the runner its margin of the 8-minute
    budget; the headline told a budget inside its cap, so it skips what it cannot start."""
    plan = _gpu_plan(tmp_path, monkeypatch)
    assert [s.key for s in plan[:2]] == ["wheels", "attention"]
    assert sum(s.cap_s for s in plan) <= gpu_check.BUDGET_S - gpu_check.MARGIN_S
    assert gpu_check.MARGIN_S >= 30 and gpu_check.BUDGET_S == 480
    headline = plan[1].cmd
    assert headline[1].endswith("bench_attention_headline.py")
    assert headline[headline.index("--out") + 1] == str(tmp_path)
    assert float(headline[headline.index("--budget-s") + 1]) < plan[1].cap_s
    assert [s.key for s in _gpu_plan(tmp_path / "bare", monkeypatch, wheels=False)][0] == "attention"


def test_gpu_plan_runs_every_gpu_test_reporting_each(tmp_path, monkeypatch):
    """pytest without -x (a first hardware run reports every failure), a file that fails to
    import does not end the run, 60 s per test, a junit report in --out, and only the
    files that hold GPU tests collected (all of them)."""
    cmd = next(s.cmd for s in _gpu_plan(tmp_path, monkeypatch) if s.key == "pytest")
    assert "-x" not in cmd and "--timeout=60" in cmd and "--continue-on-collection-errors" in cmd
    assert ["-m", "gpu"] == cmd[cmd.index("-m", cmd.index("pytest")):][:2]
    assert f"--junitxml={tmp_path / 'pytest_gpu.xml'}" in cmd
    files = [a for a in cmd if a.startswith("tests/")]
    with_gpu_tests = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")
                      if gpu_check.GPU_MARK in p.read_text()}
    assert set(files) == with_gpu_tests and "tests/test_gpu_check.py" not in files
    assert {"tests/test_attention_triton.py", "tests/test_fused_mlp.py", "tests/test_qlora.py"} <= set(files)


def test_gpu_plan_builds_for_the_machines_arch_only_without_network(tmp_path, monkeypatch):
    plan = {s.key: s for s in _gpu_plan(tmp_path, monkeypatch)}
    build = plan["build"]
    assert build.env["TORCH_CUDA_ARCH_LIST"] == "9.0" and build.env["FASTVLM_CUDA"] == "1"
    assert {"--no-build-isolation", "--no-index", "-e"} <= set(build.cmd)
    assert {"info", "pytest", "attention", "connector", "encoder", "lora", "train"} <= set(plan)


def test_a_step_over_its_cap_is_told_then_stopped_and_the_next_runs(tmp_path):
    """SIGINT first (pytest writes its report, the headline keeps its rows), then the next
    step; a failure is recorded with its return code."""
    slow = gpu_check.Step("slow", "slow", [sys.executable, "-c", (
        "import time\ntry:\n    time.sleep(30)\nexcept KeyboardInterrupt:\n    print('kept what it measured')\n"
        "    raise")], cap_s=3)
    fast = gpu_check.Step("fast", "fast", [sys.executable, "-c", "print('ok')"], cap_s=30)
    broken = gpu_check.Step("broken", "broken", [sys.executable, "-c", "raise SystemExit(3)"], cap_s=30)
    deadline = time.monotonic() + 60
    outcomes = [gpu_check.run_step(s, tmp_path, deadline) for s in (slow, fast, broken)]
    assert [o.status for o in outcomes] == ["timeout", "passed", "failed"]
    assert outcomes[0].seconds < 3 + gpu_check.STOP_GRACE_S + 2 and "kept what it measured" in outcomes[0].tail
    assert outcomes[2].returncode == 3 and "ok" in outcomes[1].tail
    assert gpu_check.run_step(fast, tmp_path, time.monotonic()).status == "skipped"  # no budget left


def test_a_step_that_ignores_the_stop_is_killed_within_the_overall_budget(tmp_path):
    stubborn = gpu_check.Step("stubborn", "stubborn", [sys.executable, "-c", (
        "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)")], cap_s=60)
    t0 = time.monotonic()
    outcome = gpu_check.run_step(stubborn, tmp_path, time.monotonic() + 10.5)  # 10.5 s of budget left, cap 60 s
    assert outcome.status == "timeout" and time.monotonic() - t0 < 10.5 + gpu_check.STOP_GRACE_S + 3


def test_steps_import_this_checkout(tmp_path, monkeypatch):
    """The GPU machine has no install of fastvlm before the build step: a benchmark script
    (its own folder first on sys.path) finds the checkout through PYTHONPATH, ahead of any
    fastvlm installed elsewhere."""
    monkeypatch.delenv("PYTHONPATH", raising=False)  # as on the GPU machine
    script = tmp_path / "where.py"
    script.write_text("import fastvlm\nprint('fastvlm at', fastvlm.__file__)\n")
    outcome = gpu_check.run_step(gpu_check.Step("where", "where", [sys.executable, str(script)], 60),
                                 tmp_path, time.monotonic() + 60)
    assert outcome.status == "passed", outcome.tail
    assert f"fastvlm at {ROOT / 'fastvlm' / '__init__.py'}" in outcome.tail


def test_unknown_step_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out",
                           str(tmp_path), "--only", "bogus"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--only: unknown steps ['bogus']" in proc.stderr


def _row(layout, kind, method, ms):
    return {"layout": layout, "kind": kind, "method": method, "fwd_ms": ms / 3, "fwd_bwd_ms": ms}


def test_targets_are_read_with_their_ratio_and_gap():
    """auto's time is fastvlm's (the table's only where auto was not measured); the fastest
    of a baseline family is the baseline; a missed target says how much time must go."""
    rows = [_row("plain", "causal", "fastvlm_table", 12.0), _row("plain", "causal", "fastvlm_auto", 10.0),
            _row("plain", "causal", "sdpa_flash", 9.5), _row("plain", "causal", "sdpa_flash_kv_expanded", 9.0),
            _row("packed", "causal", "fastvlm_table", 8.0), _row("packed", "causal", "sdpa_flash_varlen", 8.4),
            _row("packed", "image_bidirectional", "fastvlm_auto", 10.0),
            {"layout": "packed", "kind": "image_bidirectional", "method": "flex", "skipped": "budget"},
            _row("packed", "mmca_split", "fastvlm_auto", 10.0), _row("packed", "mmca_split", "flex", 12.0)]
    plain, packed, image, mmca = attention_targets.target_results(rows)
    assert plain["fastvlm"] == "fastvlm_auto" and plain["baseline"] == "sdpa_flash_kv_expanded"
    assert plain["ratio"] == 0.9 and plain["met"]  # 9.0 / 10.0 against >= 0.9
    assert packed["fastvlm"] == "fastvlm_table" and packed["ratio"] == 8.4 / 8.0 and packed["met"]
    assert image["status"] == "not measured: flex"
    assert mmca["status"] == "MISSED" and abs(mmca["ratio"] - 1.2) < 1e-12
    # 1.3x needs fastvlm at 12 / 1.3 ms: 10 - 12 / 1.3 ms to lose, that share of its 10 ms
    assert abs(mmca["gap_ms"] - (10 - 12 / 1.3)) < 1e-12 and abs(mmca["gap_pct"] - 10 * (10 - 12 / 1.3)) < 1e-9
    text = attention_targets.targets_markdown(rows)
    assert "| packed mmca_split |" in text and "MISSED" in text and "fastvlm must lose 0.769 ms (8%" in text


def _out_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_headline_killed_mid_way_keeps_what_it_measured(tmp_path):
    """A kill (the device tool's limit) loses only the measurement under way: every row
    measured before it is in the JSON lines and the markdown, whole."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "bench_attention_headline.py"), "--smoke",
                             "--out", str(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    sink = tmp_path / "attention_headline.jsonl"
    try:
        t0 = time.monotonic()
        while (not sink.exists() or len(sink.read_text().splitlines()) < 2) and proc.poll() is None:
            assert time.monotonic() - t0 < 300, "no two rows in 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        stderr = proc.stderr.read().decode()
    rows = [json.loads(line) for line in sink.read_text().splitlines()]
    assert len(rows) >= 2, stderr[-3000:]
    # the first round: fastvlm at the table's tiles, on the first case, before any other method
    assert (rows[0]["layout"], rows[0]["kind"], rows[0]["method"]) == ("plain", "causal", "fastvlm_table")
    table = (tmp_path / "attention_headline.md").read_text()
    for r in rows:
        assert "fwd_bwd_ms" in r and f"| {r['layout']} | {r['kind']} | {r['method']} | {r['fwd_ms']:.3f} |" in table


def test_dry_run_headline_first_every_row_and_the_summary(tmp_path):
    """The runner's rehearsal of the headline (interpreter, tiny): a row per case and method,
    the table's and auto's configs recorded, written under --out as it goes; the summary holds
    the environment, every step with its cap and the targets table; nothing else under --out."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out",
                           str(tmp_path), "--only", "attention"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _out_files(tmp_path) == ["attention_headline.jsonl", "attention_headline.md", "logs.tar.gz",
                                    "summary.json", "summary.md"]
    rows = [json.loads(line) for line in (tmp_path / "attention_headline.jsonl").read_text().splitlines()]
    cases = [(r["layout"], r["kind"]) for r in rows]
    assert set(cases) == {("plain", "causal"), ("packed", "causal"), ("packed", "image_bidirectional"),
                          ("packed", "mmca_split")}
    assert [r["round"] for r in rows] == sorted(r["round"] for r in rows)  # what the targets need first
    for case in set(cases):
        methods = {r["method"]: r for r in rows if (r["layout"], r["kind"]) == case}
        assert {"fastvlm_table", "fastvlm_auto", "fastvlm_table_deterministic", "reference"} <= set(methods)
        assert all("fwd_bwd_ms" in r for r in methods.values()), methods
        assert methods["fastvlm_table"]["config"] and methods["fastvlm_auto"]["config"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["env"]["commit"] and summary["env"]["torch"] and summary["env"]["triton"]
    assert set(summary["env"]["sources"]) == set(gpu_check.SOURCES)
    assert [t["status"] for t in summary["targets"]] == ["not measured: " + t for t in (
        "sdpa_flash / sdpa_flash_kv_expanded / flash_attn_varlen",
        "flash_attn_varlen / sdpa_flash_varlen / sdpa_flash_varlen_kv_expanded", "flex", "flex")]  # CUDA only
    text = (tmp_path / "summary.md").read_text()
    cap = gpu_check.HEADLINE_CAP_S * gpu_check.DRY_RUN_SCALE
    assert f"| headline: attention fwd+bwd at 8k | {cap} | passed |" in text and "## Issue 28's targets" in text
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        assert len(tar.getnames()) == 1
    assert len(_out_files(tmp_path)) < MAX_FILES_BACK


def test_dry_run_pytest_step_reports_in_junit(tmp_path):
    """The pytest step collects the GPU test files (they skip without a GPU) and leaves its
    junit report under --out; the summary counts it."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out",
                           str(tmp_path), "--only", "pytest"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _out_files(tmp_path) == ["logs.tar.gz", "pytest_gpu.xml", "summary.json", "summary.md"]
    counts = gpu_check.pytest_counts(tmp_path / "pytest_gpu.xml")
    tests = int(counts.split(",")[0].split()[1])
    assert tests > 50 and f"pytest -m gpu: {counts}" in (tmp_path / "summary.md").read_text()


def test_headline_plan_on_cuda_names_every_targets_baseline():
    """The CUDA plan (built on CPU: nothing runs) gives each case the methods its target reads,
    under the names attention_targets looks for, in the rounds the budget keeps first: a
    renamed method would leave a target 'not measured' on the GPU."""
    flex = object()  # a stand-in: the plan only closes over it
    planned = {}
    for name, kind in headline.CASES:
        layout = build_layout(name, kind, 256, 1, 0, "cpu")
        planned[name, kind] = {m: r for r, m, _ in headline.methods(layout, name, kind, "cuda", 0.1, 64, flex)}
    for layout, kind, _, baselines, _ in attention_targets.TARGETS:
        methods = planned[layout, kind]
        assert methods["fastvlm_table"] == 0 and methods["fastvlm_auto"] == 2
        # every target has a baseline that needs no carried wheel, in round 0 or, for Flex, round 1
        available = [m for m in baselines if m in methods]
        assert available and min(methods[m] for m in available) <= 1, (layout, kind, methods)
    assert planned["plain", "causal"]["sdpa_cudnn"] == 0 and planned["plain", "causal"]["flex"] == 3
    assert "sdpa_flash_varlen" not in planned["packed", "image_bidirectional"]  # not a causal mask
