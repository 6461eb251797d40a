"""What a run records: metrics.jsonl, TensorBoard events (if installed) and PNG plots.

metrics.jsonl holds one JSON object per logged step (``stage``, ``stage_index``,
``step``, ``global_step``, ``loss``, ``lr``, ``tokens_per_s``, ``samples_per_s``,
``grad_norm``, ``skipped``, ...) and one per evaluation (``"event": "eval"``).
On resume, lines past the checkpoint's step are dropped, so the file reads as one
uninterrupted run. The progress bar's text and each stage's closing line are made here.
"""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from fastvlm.train.preference_eval import preference_table
from fastvlm.utils.io import atomic_write_text


class MetricsLog:
    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.jsonl"
        self.plots = run_dir / "plots"
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            SummaryWriter = None
        if SummaryWriter is not None:
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def truncate_after(self, stage_index: int, step: int) -> None:
        """Forget records written after (stage_index, step): they are about to be replayed."""
        kept = [r for r in self.records() if (r["stage_index"], r["step"]) <= (stage_index, step)]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            prefix = f"{record['stage']}/" + ("eval/" if record.get("event") == "eval" else "")
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "global_step":
                    self.tb.add_scalar(prefix + key, value, record["global_step"])
            self.tb.flush()

    def plot(self) -> Path:
        """Rewrite plots/{loss,lr,throughput,eval_accuracy}.png, one line per stage."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plots.mkdir(parents=True, exist_ok=True)
        records = self.records()
        panels = (("loss", "loss", "train loss"), ("lr", "lr", "learning rate"),
                  ("throughput", "tokens_per_s", "tokens / s"), ("eval_accuracy", "accuracy", "val accuracy"))
        for filename, key, label in panels:
            fig, ax = plt.subplots(figsize=(7, 4))
            stages = dict.fromkeys(r["stage"] for r in records)
            for stage in stages:
                pts = [(r["global_step"], r[key]) for r in records if r["stage"] == stage and r.get(key) is not None
                       and (r.get("event") == "eval") == (key == "accuracy")]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o" if key == "accuracy" else None, label=stage)
            ax.set_xlabel("global step")
            ax.set_ylabel(label)
            if key == "lr":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
            if ax.lines:
                ax.legend()
            fig.tight_layout()
            fig.savefig(self.plots / f"{filename}.png", dpi=80)
            plt.close(fig)
        return self.plots

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class NoLog:
    """What ranks other than 0 log: nothing."""

    def truncate_after(self, *args):
        pass

    def records(self):
        return []

    write = plot = close = truncate_after


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def progress_bar(stage, index: int, total: int, step: int, enabled: bool):
    return tqdm(total=total, initial=step, desc=f"[{index + 1}] {stage.name} ({stage.type})", disable=not enabled,
                file=sys.stderr, dynamic_ncols=True, leave=False)


def step_postfix(m: dict) -> str:
    """The progress bar's text of a step record."""
    loss = "nan" if m["loss"] is None else f"{m['loss']:.4f}"
    text = (f"loss {loss} lr {m['lr']:.2e} tok/s {m['tokens_per_s']:.0f} samples/s {m['samples_per_s']:.1f} "
            f"peak {m['peak_mem_mb']:.0f}MB")
    return text + (f" skipped {m['skipped_samples']}" if m["skipped_samples"] else "")


def stage_line(s: dict) -> str:
    """The line printed at a stage's end, from its summary."""
    loss = "nan" if s["loss"] is None else f"{s['loss']:.4f}"
    line = (f"stage {s['stage']} ({s['type']}): {s['steps']} steps in {s['seconds']:.1f}s, final loss {loss}, "
            f"{s['trainable']:,} trainable parameters")
    if s["skipped"]:
        line += f", {s['skipped']} steps skipped (non-finite)"
    if s.get("cache"):
        line += f", feature cache {s['cache'][0]:.0f} hits / {s['cache'][1]:.0f} misses"
    for what, why in (("skipped", "could not be used"), ("filtered", f"not used by a {s['type']} stage")):
        counts = s["samples"][what]
        if counts["total"]:
            examples = ", ".join(e for names in counts["examples"].values() for e in names[:2])
            reasons = ", ".join(f"{r} {n}" for r, n in counts["counts"].items())
            line += f", {counts['total']} samples {what} ({why}: {reasons}; e.g. {examples})"
    if s.get("eval"):
        line += f", val accuracy {s['eval']['overall']:.1%}"
        if s["eval"].get("preference"):
            line += "\n" + preference_table(s["eval"])
    return line

