"""run_all writes one dated folder with every benchmark's results, a summary table and
plot; report.py keeps the README's Performance section equal to the results files."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import report  # noqa: E402


def test_run_all_smoke_subset(tmp_path):
    # each benchmark's smoke run has its own test; a cheap one exercises the runner here, started
    # as `fastvlm bench all` starts it (the CLI's options: test_build_and_cli, without a run)
    proc = subprocess.run([sys.executable, "-m", "fastvlm", "bench", "all", "--smoke", "--only", "memory",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "| memory | passed |" in summary
    assert "| bench_memory | tiny lora (adamw" in summary  # a headline extracted from the results file
    assert (tmp_path / "summary.png").stat().st_size > 0
    assert (tmp_path / "bench_memory.log").exists()


def test_readme_performance_section_is_generated_from_results():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_every_row_names_an_existing_results_file():
    rows = report.collect([report.RESULTS])
    assert rows
    for r in rows:
        assert (ROOT / r.file).exists() and r.device and r.date, r
