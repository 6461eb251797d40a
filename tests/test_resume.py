"""Exact resume: a run SIGKILLed at a random moment (or stopped by Ctrl-C) and resumed
logs the same per-step losses, bit for bit, as one that ran through; a killed
checkpoint write leaves the previous checkpoints intact."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastvlm.train import checkpoint as ckpt

from .train_recipes import write_tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
STEPS, STAGES = 3, 4


def _env():
    # Same thread count in every run: CPU kernels are bitwise deterministic for a fixed one.
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}


def _command(recipe: Path, out: Path, *extra):
    return [sys.executable, "-m", "fastvlm", "train", str(recipe), "--out", str(out), "--no-progress", *extra]


def _losses(out: Path) -> dict:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    steps = [(r["stage_index"], r["step"]) for r in records if r["event"] == "step"]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {(r["stage_index"], r["step"]): r["loss"] for r in records if r["event"] == "step"}


def _logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count('"event": "step"') if path.is_file() else 0


def _run_until(recipe, out, steps: int, timeout: float = 600) -> subprocess.Popen:
    proc = subprocess.Popen(_command(recipe, out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + timeout
    while _logged_steps(out) < steps and proc.poll() is None:
        assert time.monotonic() < deadline, "training made no progress"
        time.sleep(0.02)
    return proc


def _finish(recipe, out, *extra):
    res = subprocess.run(_command(recipe, out, *extra), env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "tiny.toml"
    return write_tiny_recipe(path, ["run.evaluate=false", "run.keep_checkpoints=2"], steps=STEPS,
                             checkpoint_every=1)


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    _finish(recipe, out)
    losses = _losses(out)
    assert len(losses) == STEPS * STAGES and all(v is not None for v in losses.values())
    assert len(ckpt.complete_checkpoints(out / "checkpoints")) == 2  # the last K kept
    return losses


def test_sigkill_anywhere_then_resume_is_bit_exact(recipe, reference, tmp_path, seed):
    out = tmp_path / "run"
    at = random.Random(seed).randint(1, STEPS * STAGES - 1)
    proc = _run_until(recipe, out, at)
    time.sleep(random.Random(seed + 1).random() * 0.5)  # anywhere: mid-step, mid-checkpoint, ...
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    _finish(recipe, out, "--resume")
    assert _losses(out) == reference


def test_ctrl_c_writes_a_checkpoint_and_exits_cleanly(recipe, reference, tmp_path, seed):
    out = tmp_path / "run"
    proc = _run_until(recipe, out, random.Random(seed).randint(1, STEPS * STAGES - 2))
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=600)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGINT arrived")
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted: checkpoint written to" in stderr and "Traceback" not in stderr
    newest = ckpt.complete_checkpoints(out / "checkpoints")[-1]
    meta = json.loads((newest / "meta.json").read_text())
    last_stage, last_step = max(_losses(out))  # the step it stopped after
    # stopped after a stage's last step, the checkpoint may already be the next stage's start
    allowed = [(last_stage, last_step)] + ([(last_stage + 1, 0)] if last_step == STEPS else [])
    assert (meta["stage_index"], meta["step"]) in allowed, meta
    _finish(recipe, out, "--resume")
    assert _losses(out) == reference


def test_a_killed_checkpoint_write_leaves_the_previous_ones(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    first = ckpt.save_checkpoint(tmp_path, ckpt.checkpoint_name(0, "a", 1), model, {"x": 1}, {"step": 1})
    calls = []

    def dies_half_way(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        calls.append(f)
        raise KeyboardInterrupt  # the writer stops here, as a kill would

    monkeypatch.setattr(torch, "save", dies_half_way)
    with torch.no_grad():
        model.weight.add_(1)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, ckpt.checkpoint_name(0, "a", 2), model, {"x": 2}, {"step": 2})
    monkeypatch.undo()
    assert calls and ckpt.complete_checkpoints(tmp_path) == [first]
    state, meta = ckpt.load_checkpoint(first, torch.nn.Linear(3, 2))
    assert state == {"x": 1} and meta == {"step": 1}
