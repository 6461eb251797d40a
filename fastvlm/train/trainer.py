"""The training loop: every stage of a recipe, resumable exactly. Read top to bottom.

``train(recipe, run_dir)`` starts the run (``start_run``: the process group under
torchrun, the run's data and tokenizer, the starting model), then for each stage:

1. ``setup_stage``: shape the model for the stage (freeze, adapters, heads:
   fastvlm.train.build), its data (``StageBatches``: fastvlm.data's DataLoader over
   this rank's share of each optimizer step), its loss module (fastvlm.train.losses,
   the one seam to the model; DDP / FSDP wrap it; a preference stage's precomputed
   reference: fastvlm.train.reference), optimizer and schedule, and, when resuming,
   every state from the newest checkpoint;
2. per optimizer step, ``train_step``: the weighted backward of the step's
   micro-batches, clipping, an update skipped when the loss or gradient is not finite
   (fastvlm.train.optim.optimizer_step), then the schedule, counters and the step's
   record (metrics.jsonl, with the loss module's own metrics; the progress bar);
3. evaluations and checkpoints on their schedules, then ``end_stage``: the last
   checkpoint, the stage's summary, its evaluation, its adapters merged.

Checkpoints hold model, optimizer, scheduler, loss scaler, sampler and RNG states;
``resume=True`` replays the finished stages' shaping, loads the newest complete
checkpoint and continues with exactly the batches and random numbers an
uninterrupted run would use, so the per-step losses match bit for bit on CPU.
``max_bad_steps`` skipped steps in a row stop the run. SIGINT (Ctrl-C) finishes the
current step, writes a checkpoint and raises ``Interrupted``. Under torchrun every
rank runs this loop on its share of each step (rank 0 alone writes).
"""
from __future__ import annotations

import json
import re
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastvlm.train import build, distributed
from fastvlm.train import checkpoint as ckpt
from fastvlm.train.evaluation import evaluate_stage
from fastvlm.train.losses import stage_loss
from fastvlm.train.metrics import MetricsLog, NoLog, peak_memory_mb, progress_bar, stage_line, step_postfix
from fastvlm.train.optim import bad_steps_message, optimizer_step, stage_optimizer
from fastvlm.train.recipe import Recipe, Stage
from fastvlm.train.reference import stage_reference
from fastvlm.train.stage_data import (
    RunData,
    StageBatches,
    fill_feature_cache,
    open_feature_cache,
    prepare_data,
)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. losses keep coming out non-finite)."""


class Interrupted(Exception):
    """SIGINT arrived; a checkpoint was written (``path``)."""

    def __init__(self, path):
        super().__init__(f"interrupted: checkpoint written to {path}")
        self.path = path


def train(recipe: Recipe, run_dir, *, resume: bool = False, progress: bool = True, echo=print) -> dict:
    """Run every stage of `recipe` into `run_dir`; returns {"stages": [...], "final": path, ...}.
    Under torchrun (run.distributed = 'ddp' | 'fsdp') every rank calls it; rank 0 alone
    writes logs, plots, evaluations and the final model."""
    run = start_run(recipe, Path(run_dir), resume, progress, echo)
    results = []
    with _SigintFlag() as sigint:
        for index, stage in enumerate(recipe.stages):
            if run.resume_from and index < run.resume_from["stage_index"]:  # done before: replay its shaping
                build.prepare_stage(run.model, stage, recipe, run.device)
                build.finish_stage(run.model, stage)
                continue
            s = setup_stage(run, index, stage)
            while s.step < s.total:
                if run.dist.all_reduce([sigint.set], "max")[0]:
                    s.bar.close()
                    raise Interrupted(s.save())
                train_step(run, s, next(s.stream))
                if stage.eval_every and s.step % stage.eval_every == 0 and s.step < s.total:
                    evaluate_stage(run.model, stage, index, s.step, run.global_step, recipe, run.data, run.dir,
                                   run.log, s.mp, run.dist)
                if stage.checkpoint_every and s.step % stage.checkpoint_every == 0 and s.step < s.total:
                    s.save()
            results.append(end_stage(run, s))
    return finish_run(run, results)


# ---- the run ---------------------------------------------------------------------------------
@dataclass
class Run:
    """What every stage shares: where the run writes, this process's place in the job, the
    run's data, the model (each stage reshapes it) and the checkpoint being resumed."""
    recipe: Recipe
    dir: Path
    dist: distributed.Distributed
    device: torch.device
    data: RunData
    model: torch.nn.Module
    log: MetricsLog | NoLog
    echo: object
    progress: bool
    checkpoint: Path | None = None  # the checkpoint to resume from, and its meta.json
    resume_from: dict | None = None
    global_step: int = 0


def start_run(recipe: Recipe, run_dir: Path, resume: bool, progress: bool, echo) -> Run:
    """Join the job, check the run directory, prepare the data (rank 0 first: it writes
    the synthetic data and the tokenizer), build the starting model; once both exist the
    directory is this recipe's run."""
    dist, device = distributed.init(recipe.run.distributed, recipe.run.device)
    ckpt.prepare_run_dir(recipe, run_dir, resume, write=False)
    dist.barrier()  # every rank checked the directory before rank 0 writes to it
    data = prepare_data(recipe, run_dir) if dist.is_main else None
    dist.barrier()
    if not dist.is_main:  # reads what rank 0 wrote; writes nothing (another node may see other mtimes)
        data = prepare_data(recipe, run_dir, write=False)
    torch.manual_seed(recipe.run.seed)
    model = build.build_model(recipe, data.tokenizer, recipe.run.seed).to(device)
    if dist.is_main:
        ckpt.prepare_run_dir(recipe, run_dir, resume)
        for split, dropped in data.dropped.items():
            if dropped.total and not (split == "data.captions" and dropped is data.dropped["data.train"]):
                echo(f"{split}: {dropped.total} samples skipped before training: {dropped.report()}")
    run = Run(recipe, run_dir, dist, device, data, model, MetricsLog(run_dir) if dist.is_main else NoLog(),
              echo if dist.is_main else _silent, progress and dist.is_main)
    found = ckpt.complete_checkpoints(run_dir / "checkpoints")
    if resume and found:
        run.checkpoint = found[-1]
        run.resume_from = json.loads((found[-1] / "meta.json").read_text())
        run.echo(f"resuming from {found[-1].name}")
    # Records past the checkpoint (or all, starting over) are about to be written again.
    run.log.truncate_after(*((run.resume_from["stage_index"], run.resume_from["step"]) if run.resume_from
                             else (-1, 0)))
    return run


def finish_run(run: Run, results: list[dict]) -> dict:
    final = None
    if run.dist.is_main:
        final = run.dir / "final"
        run.model.save_pretrained(final)
        run.data.tokenizer.save(final / "tokenizer")
        run.log.plot()
        run.log.close()
    run.dist.barrier()
    return {"stages": results, "final": final or run.dir / "final", "plots": run.dir / "plots", "model": run.model,
            "distributed": run.dist}


# ---- one stage -------------------------------------------------------------------------------
@dataclass
class StageState:
    """A stage in progress: its data, the wrapped loss, optimizer and schedule, counters."""
    index: int
    stage: Stage
    batches: StageBatches
    step_loss: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    mp: object
    saver: ckpt.StageSaver
    cache: object
    total: int
    stream: object = None
    bar: object = None
    step: int = 0
    global_step: int = 0  # the run's, at this stage's newest step
    bad: int = 0  # skipped steps in a row
    skipped: int = 0  # skipped steps in all
    started: float = field(default_factory=time.perf_counter)
    last: dict = field(default_factory=dict)  # the newest step record

    def save(self) -> Path:
        return self.saver.save(self.step, self.global_step, self.bad, self.skipped)


def setup_stage(run: Run, index: int, stage: Stage) -> StageState:
    """Shape the model, build the stage's data, loss module, optimizer and schedule; resume
    from the checkpoint when it is this stage's."""
    dist, model, recipe = run.dist, run.model, run.recipe
    dist.check_stage(stage)
    resuming = bool(run.resume_from) and index == run.resume_from["stage_index"]
    if resuming:  # the base this QLoRA stage quantized, as it found it (if an earlier stage trained it)
        build.load_nf4_source(model, recipe, index, run.dir)
    elif dist.is_main:
        build.save_nf4_source(model, recipe, index, run.dir)
    dist.barrier()
    mp = build.prepare_stage(model, stage, recipe, run.device)["precision"]
    batches = StageBatches(stage, recipe, run.data, model, recipe.run.seed + index, rank=dist.rank,
                           world=dist.world, gather=dist.all_gather)
    frozen_tower = stage.type in ("align", "instruct", "preference") and getattr(model.vision_tower, "frozen", False)
    cache = open_feature_cache(model, run.dir, dist) if frozen_tower and stage.feature_cache else None
    if cache is not None and dist.active:
        fill_feature_cache(cache, batches, dist)
    # A precomputed reference (preference stages) is made before wrapping, from the whole model.
    reference = stage_reference(model, stage, index, recipe, batches, mp, run.device, run.dir, dist, resuming,
                                run.data)
    # The optimizer right after wrapping: FSDP2 has swapped in the sharded parameters.
    step_loss = dist.wrap(model, stage_loss(model, stage, run.device, cache, reference))
    total = batches.total_steps()
    optimizer, scheduler = stage_optimizer(model, stage, total)
    saver = ckpt.StageSaver(run.dir, recipe, index, stage, model, optimizer, scheduler, mp, batches, dist)
    s = StageState(index, stage, batches, step_loss, optimizer, scheduler, mp, saver, cache, total)
    if resuming:
        counters = saver.restore(run.checkpoint, run.device)
        s.step, s.bad, s.skipped, run.global_step = (counters[k] for k in ("step", "bad", "skipped", "global_step"))
    s.global_step = run.global_step
    model.train()
    s.stream = batches.steps()
    s.bar = progress_bar(stage, index, total, s.step, run.progress)
    s.last = next((r for r in reversed(run.log.records()) if r["event"] == "step" and r["stage_index"] == index),
                  {})
    return s


def train_step(run: Run, s: StageState, micro: list[dict]) -> None:
    """One optimizer step of this rank's micro-batches, then the schedule, the counters
    and the step's record."""
    t0 = time.perf_counter()
    metrics = {}  # the loss module's own (a preference stage's rewards), averaged over the step
    loss, grad_norm, stepped = optimizer_step(s.step_loss, micro, s.optimizer, s.mp, s.stage, run.device.type,
                                              run.dist, metrics)
    lr = s.optimizer.param_groups[0]["lr"]
    lrs = {f"lr_{g['name']}": g["lr"] for g in s.optimizer.param_groups}  # this step's, not the next
    with warnings.catch_warnings():  # a skipped step still advances the schedule, on purpose
        warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"))
        s.scheduler.step()
    s.step, run.global_step = s.step + 1, run.global_step + 1
    s.global_step = run.global_step
    s.bad, s.skipped = (0, s.skipped) if stepped else (s.bad + 1, s.skipped + 1)
    if s.bad >= s.stage.max_bad_steps:
        s.bar.close()
        raise TrainingError(bad_steps_message(s.stage, s.step, s.bad, s.mp, lr, loss is not None))
    dt = time.perf_counter() - t0
    real, samples = run.dist.all_reduce([sum(b["real_tokens"] for b in micro), sum(b["num_samples"] for b in micro)])
    s.last = {"event": "step", "stage": s.stage.name, "stage_index": s.index, "step": s.step,
              "global_step": run.global_step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped": s.skipped,
              "loss_scale": s.mp.loss_scale, "tokens_per_s": real / dt, "samples_per_s": samples / dt,
              "peak_mem_mb": run.dist.all_reduce([peak_memory_mb(run.device)], "max")[0],
              "skipped_samples": s.batches.skipped.total, **lrs, **metrics}
    if s.step % run.recipe.run.log_every == 0 or s.step == s.total:
        run.log.write(s.last)
    s.bar.set_postfix_str(step_postfix(s.last))
    s.bar.update(1)


def end_stage(run: Run, s: StageState) -> dict:
    """The stage's last checkpoint, its summary line and record, its evaluation; then what
    must not outlive it (contrastive heads, unmerged adapters) goes."""
    s.bar.close()
    s.stream.close()
    s.batches.close()  # the DataLoader's worker processes end here
    s.save()
    if run.dist.mode == "fsdp" and run.dist.active:
        run.model = build.unsharded(run.model, run.recipe, run.data.tokenizer, s.index, run.device, run.dir)
    b = s.batches
    summary = {"stage": s.stage.name, "type": s.stage.type, "steps": s.total, "skipped": s.skipped,
               "loss": s.last.get("loss"), "seconds": time.perf_counter() - s.started,
               "trainable": sum(p.numel() for p in run.model.parameters() if p.requires_grad),
               "samples": {"stage_samples": len(b.samples), "skipped": b.skipped.as_dict(),
                           "filtered": b.filtered.as_dict()}}
    run.log.write({"event": "samples", "stage": s.stage.name, "stage_index": s.index, "step": s.step,
                   "global_step": run.global_step, **summary["samples"]})
    summary["eval"] = evaluate_stage(run.model, s.stage, s.index, s.step, run.global_step, run.recipe, run.data,
                                     run.dir, run.log, s.mp, run.dist)
    if s.cache is not None:
        summary["cache"] = run.dist.all_reduce([s.cache.hits, s.cache.misses])
    run.echo(stage_line(summary))
    build.finish_stage(run.model, s.stage)
    return summary


class _SigintFlag:
    """Turns the first Ctrl-C into a flag the loop checks between steps; a second one aborts."""

    def __init__(self):
        self.set = False

    def __enter__(self):
        self.previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def _silent(*args, **kwargs):
    pass
