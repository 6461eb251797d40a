"""Launching fastvlm training on several CPU processes (torchrun, gloo) for the distributed
tests: one place for the command lines, the environment and how a run is judged."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fastvlm.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker.py")
# gloo's threads may abort at interpreter exit after destroy_process_group (trap 3 of issue 16).
EXIT_ABORT = "terminate called without an active exception"


def env() -> dict:
    # One thread per rank: 2 ranks share 2 cores; a fixed count keeps CPU kernels deterministic.
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def command(recipe: Path, out: Path, nproc: int, *extra, worker: bool = False) -> list[str]:
    """`fastvlm train` (or the test worker) on `nproc` processes; one process runs without torchrun."""
    target = [str(WORKER)] if worker else ["-m", "fastvlm", "train"]
    args = [*target, str(recipe), "--out", str(out), "--no-progress", *extra]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def run(recipe: Path, out: Path, nproc: int, *extra, worker: bool = False, timeout: float = 600):
    """Run to the end; the run must have finished (its final model written)."""
    res = subprocess.run(command(recipe, out, nproc, *extra, worker=worker), env=env(), capture_output=True,
                         text=True, timeout=timeout)
    finished = (out / "final" / "config.json").is_file()
    # A non-zero status is accepted only as gloo's abort at exit, after every result was written.
    assert res.returncode == 0 or (finished and EXIT_ABORT in res.stderr), res.stderr[-4000:]
    assert finished, res.stderr[-4000:]
    return res


def run_until_checkpoints(recipe: Path, out: Path, nproc: int, count: int, timeout: float = 600) -> None:
    """Start a run and SIGKILL all its processes once `count` complete checkpoints exist."""
    proc = subprocess.Popen(command(recipe, out, nproc), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while len(ckpt.complete_checkpoints(out / "checkpoints")) < count:
            assert proc.poll() is None, f"the run ended before {count} checkpoints: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "training made no progress"
            time.sleep(0.05)
    finally:
        kill_tree(proc.pid)
        proc.wait()
    alive = [pid for pid in running() if str(out) in cmdline(pid)]
    assert not alive, f"processes of the killed run still alive: {alive}"


def kill_tree(root: int) -> None:
    """SIGKILL `root` and every process below it. torchrun (torch >= 2.14) starts each rank in a
    session of its own, so killing torchrun's process group leaves the ranks training: find
    them as descendants in /proc, stop each as it is found (a stopped process forks no new
    one), then kill them all and wait until none runs."""
    stopped: set[int] = set()
    while found := {root, *descendants(root)} - stopped:
        for pid in found:
            _signal(pid, signal.SIGSTOP)
        stopped |= found
    for pid in stopped:
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while alive := stopped & running():
        assert time.monotonic() < deadline, f"processes {sorted(alive)} survived SIGKILL"
        time.sleep(0.05)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # ended meanwhile
        pass


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process that runs (zombies, dead and waiting for their
    parent to collect them, excluded), from /proc/<pid>/stat (state and ppid follow the name)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):  # not a process, or gone meanwhile
            continue
        if state not in ("Z", "X"):
            parents[int(entry.name)] = int(ppid)
    return parents


def running() -> set[int]:
    return set(_parents())


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def losses(out: Path) -> dict:
    """{(stage index, step): loss} of metrics.jsonl; each step logged exactly once."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [(r["stage_index"], r["step"]) for r in records if r["event"] == "step"]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {(r["stage_index"], r["step"]): r["loss"] for r in records if r["event"] == "step"}


def rank_reports(out: Path) -> list[dict]:
    """What each rank of a worker run wrote (dist_worker.py), by rank."""
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]
    return sorted(reports, key=lambda r: r["rank"])
