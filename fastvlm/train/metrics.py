"""What a run records: metrics.jsonl, TensorBoard events (if installed) and PNG plots.

metrics.jsonl holds one JSON object per logged step (``stage``, ``stage_index``,
``step``, ``global_step``, ``loss``, ``lr``, ``tokens_per_s``, ``samples_per_s``,
``grad_norm``, ``skipped``, ...) and one per evaluation (``"event": "eval"``).
On resume, lines past the checkpoint's step are dropped, so the file reads as one
uninterrupted run.
"""
from __future__ import annotations

import json
from pathlib import Path

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
