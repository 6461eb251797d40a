"""The trainer: one loop for every stage of a recipe, resumable exactly.

``train(recipe, run_dir)`` builds the starting model, then for each stage:
shapes the model for it (fastvlm.train.build.prepare_stage), builds its batches,
optimizer (per-group learning rates, no decay on norms and biases) and warmup +
cosine / constant schedule, and runs optimizer steps of ``grad_accum``
micro-batches each, logging every step to metrics.jsonl and a tqdm bar.
Checkpoints (every ``checkpoint_every`` steps and at the stage's end) hold model,
optimizer, scheduler, loss scaler, sampler and RNG states; ``resume=True`` replays
the finished stages' shaping, loads the newest complete checkpoint, and continues
with exactly the batches and random numbers an uninterrupted run would use, so
the per-step losses match bit for bit on CPU. A non-finite loss or gradient skips
the step; ``max_bad_steps`` in a row stop the run. SIGINT (Ctrl-C) finishes the
current step, writes a checkpoint and raises ``Interrupted``.
"""
from __future__ import annotations

import json
import math
import re
import signal
import sys
import time
import warnings
from pathlib import Path

import torch

from fastvlm.train import checkpoint as ckpt
from fastvlm.train.build import GROUP_PATTERNS, build_model, finish_stage, prepare_stage
from fastvlm.train.metrics import MetricsLog
from fastvlm.train.optim import build_optimizer, param_groups
from fastvlm.train.recipe import Recipe, Stage, to_toml
from fastvlm.train.schedule import lr_lambda
from fastvlm.utils.io import atomic_write_text


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. losses keep coming out non-finite)."""


class Interrupted(Exception):
    """SIGINT arrived; a checkpoint was written (``path``)."""

    def __init__(self, path):
        super().__init__(f"interrupted: checkpoint written to {path}")
        self.path = path


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device: 'cuda' requested but CUDA is not available")
    return torch.device(name)


def prepare_run_dir(recipe: Recipe, run_dir: Path, resume: bool) -> None:
    """Write the resolved recipe; refuse a directory that holds another recipe's run."""
    info = run_dir / "recipe.json"
    if info.is_file():
        found = json.loads(info.read_text())["digest"]
        if found != recipe.digest():
            raise ValueError(f"--out: {run_dir} holds a run of another recipe (hash {found}, this one "
                             f"{recipe.digest()}); use another directory")
        if not resume and ckpt.complete_checkpoints(run_dir / "checkpoints"):
            raise ValueError(f"--out: {run_dir} already holds checkpoints of this recipe; pass --resume to "
                             "continue it, or use another directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "recipe.toml", to_toml(recipe))
    atomic_write_text(info, json.dumps({"digest": recipe.digest(), "recipe": recipe.to_dict()}, indent=2))


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


def micro_loss(model, stage: Stage, batch: dict, device, cache=None) -> torch.Tensor:
    """The mean loss of one micro-batch for the stage's objective."""
    if stage.type == "contrastive":
        return contrastive_micro_loss(model, stage, batch, device)
    inputs = {k: batch[k].to(device) for k in ("input_ids", "labels", "segment_ids") if batch.get(k) is not None}
    if stage.type == "lm":
        return model.language_model(inputs["input_ids"], segment_ids=inputs["segment_ids"], labels=inputs["labels"])
    prefix = batch.get("prefix_mask")
    kwargs = dict(inputs, prefix_mask=prefix.to(device) if prefix is not None else None)
    if cache is not None and batch["image_files"]:
        # The cache asks for its misses' pixels by file bytes; the batch has them decoded already.
        blobs = [p.read_bytes() for p in batch["image_files"]]
        first = {blob: i for i, blob in reversed(list(enumerate(blobs)))}
        features = cache.features(blobs, lambda missing: batch["images"][[first[b] for b in missing]])
        return model(**kwargs, image_features=features)
    images = batch.get("images")
    return model(**kwargs, images=images.to(device) if images is not None else None)


def contrastive_micro_loss(model, stage: Stage, batch: dict, device) -> torch.Tensor:
    """The towers under the caller's autocast; pooling, projections and the B x B loss in
    fp32 (in bf16 the loss itself would be rounded to 3 significant digits)."""
    from fastvlm.train.contrastive import text_states

    heads, tower, mask = model.contrastive_heads, model.vision_tower, batch["text_mask"].to(device)
    (vision_hidden,) = tower(batch["images"].to(device), select_layers=[-1])
    text = text_states(model.language_model, batch["input_ids"].to(device), mask, stage.contrastive.text_source)
    with torch.autocast(device.type, enabled=False):
        image_emb = heads.image_embedding(vision_hidden.float(), tower.config.num_prefix_tokens)
        text_emb = heads.text_embedding(text.float(), mask)
        return heads.loss(image_emb, text_emb, stage.contrastive.chunk)


def step_weights(batches: list[dict]) -> list[float]:
    """Each micro-batch's share of the step's loss: its supervised tokens (samples for
    contrastive) over the step's, so k micro-batches give the gradient of one k-times batch."""
    counts = [b["supervised_tokens"] for b in batches]
    total = sum(counts)
    return [c / total if total else 0.0 for c in counts]


def stage_optimizer(model, stage: Stage, total_steps: int):
    """(optimizer, scheduler): one parameter group per trained group (its own LR; biases and
    norms without weight decay), warmup then cosine / constant over the stage's steps."""
    groups = param_groups(model, stage.lr, GROUP_PATTERNS, stage.weight_decay)
    optimizer = build_optimizer(groups, stage.optimizer, tuple(stage.betas))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage, total_steps))


def accumulate_gradients(model, stage: Stage, micro: list[dict], mp, device, cache=None) -> float | None:
    """Backward of every micro-batch, each weighted by its share of the step's targets;
    returns the step's loss, or None (and stops) at the first non-finite one."""
    loss_value = 0.0
    for batch, weight in zip(micro, step_weights(micro)):
        with mp.autocast(device.type):
            loss = micro_loss(model, stage, batch, device, cache)
        if not torch.isfinite(loss):
            return None
        mp.backward(loss * weight)
        loss_value += float(loss.detach()) * weight
    return loss_value


def optimizer_step(model, stage: Stage, micro: list[dict], optimizer, mp, device, cache=None):
    """One optimizer step: (loss or None when non-finite, gradient norm, whether it stepped).
    A non-finite loss or gradient skips the update (fp16: the loss scale backs off)."""
    optimizer.zero_grad(set_to_none=True)
    loss_value = accumulate_gradients(model, stage, micro, mp, device, cache)
    grad_norm = float("nan")
    if loss_value is not None:
        mp.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, stage.grad_clip or float("inf")))
    # With fp16 the scaler sees inf gradients itself (skips, backs off); otherwise skip here.
    stepped = loss_value is not None and (mp.scaler is not None or math.isfinite(grad_norm)) and mp.step(optimizer)
    if loss_value is None and mp.scaler is not None:
        mp.scaler.update(mp.scaler.get_scale() / 2)  # back off as GradScaler does on an overflow
    if not stepped:
        optimizer.zero_grad(set_to_none=True)
    return loss_value, grad_norm, stepped


def train(recipe: Recipe, run_dir, *, resume: bool = False, progress: bool = True, echo=print) -> dict:
    """Run every stage of `recipe` into `run_dir`; returns {"stages": [...], "final": path}."""
    from fastvlm.train.stage_data import StageBatches, prepare_data

    run_dir = Path(run_dir)
    prepare_run_dir(recipe, run_dir, resume)
    device = pick_device(recipe.run.device)
    torch.manual_seed(recipe.run.seed)
    data = prepare_data(recipe, run_dir)
    model = build_model(recipe, data.tokenizer, recipe.run.seed).to(device)
    log = MetricsLog(run_dir)
    ckpt_root = run_dir / "checkpoints"
    found = ckpt.complete_checkpoints(ckpt_root)
    start = json.loads((found[-1] / "meta.json").read_text()) if resume and found else None
    # Records past the checkpoint (or all, starting over) are about to be written again.
    log.truncate_after(*((start["stage_index"], start["step"]) if start else (-1, 0)))
    if start:
        echo(f"resuming from {found[-1].name}")
    results, global_step = [], 0
    with _SigintFlag() as sigint:
        for index, stage in enumerate(recipe.stages):
            if start and index < start["stage_index"]:  # done before: replay its shape changes only
                prepare_stage(model, stage, recipe, device)
                finish_stage(model, stage)
                continue
            settings = prepare_stage(model, stage, recipe, device)
            mp = settings["precision"]
            batches = StageBatches(stage, recipe, data, model, seed=recipe.run.seed + index)
            total = stage.max_steps or max(1, math.ceil(stage.epochs * batches.steps_per_epoch(stage.grad_accum)))
            optimizer, scheduler = stage_optimizer(model, stage, total)
            frozen_tower = stage.type in ("align", "instruct") and model.vision_tower.frozen
            cache = _feature_cache(model, run_dir) if frozen_tower and stage.feature_cache else None
            step, bad, skipped = 0, 0, 0
            if start and index == start["stage_index"]:
                state, _ = ckpt.load_checkpoint(found[-1], model)
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                if state.get("scaler") is not None:
                    mp.scaler = torch.amp.GradScaler(device.type)
                    mp.scaler.load_state_dict(state["scaler"])
                batches.load_state_dict(state["sampler"])
                ckpt.set_rng_state(state["rng"])
                step, bad, skipped, global_step = state["step"], state["bad"], state["skipped"], state["global_step"]
            saver = _Saver(run_dir, recipe, index, stage, model, optimizer, scheduler, mp, batches)
            model.train()
            stream = iter(batches)
            bar = _progress(stage, index, total, step, progress)
            stage_t0 = time.perf_counter()
            last = next((r for r in reversed(log.records()) if r["event"] == "step" and r["stage_index"] == index), {})
            while step < total:
                if sigint.set:
                    path = saver.save(step, global_step, bad, skipped)
                    bar.close()
                    raise Interrupted(path)
                t0 = time.perf_counter()
                micro = [next(stream) for _ in range(stage.grad_accum)]
                loss_value, grad_norm, stepped = optimizer_step(model, stage, micro, optimizer, mp, device, cache)
                finite = loss_value is not None
                lr = optimizer.param_groups[0]["lr"]
                with warnings.catch_warnings():  # a skipped step still advances the schedule, on purpose
                    warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"))
                    scheduler.step()
                step, global_step = step + 1, global_step + 1
                bad = 0 if stepped else bad + 1
                skipped += 0 if stepped else 1
                if bad >= stage.max_bad_steps:
                    bar.close()
                    raise TrainingError(_bad_steps_message(stage, step, bad, mp, lr, finite))
                dt = time.perf_counter() - t0
                last = {"event": "step", "stage": stage.name, "stage_index": index, "step": step,
                        "global_step": global_step, "loss": loss_value, "lr": lr,
                        "grad_norm": grad_norm, "skipped": skipped, "loss_scale": mp.loss_scale,
                        "tokens_per_s": sum(b["real_tokens"] for b in micro) / dt,
                        "samples_per_s": sum(b["num_samples"] for b in micro) / dt,
                        "peak_mem_mb": _peak_mem_mb(device)}
                last.update({f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups})
                if step % recipe.run.log_every == 0 or step == total:
                    log.write(last)
                bar.set_postfix_str(_postfix(last))
                bar.update(1)
                if stage.eval_every and step % stage.eval_every == 0 and step < total:
                    _evaluate(model, stage, index, step, global_step, recipe, data, run_dir, log, mp)
                if stage.checkpoint_every and step % stage.checkpoint_every == 0 and step < total:
                    saver.save(step, global_step, bad, skipped)
            bar.close()
            saver.save(step, global_step, bad, skipped)
            summary = {"stage": stage.name, "type": stage.type, "steps": total, "skipped": skipped,
                       "loss": last.get("loss"), "seconds": time.perf_counter() - stage_t0,
                       "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
            summary["eval"] = _evaluate(model, stage, index, step, global_step, recipe, data, run_dir, log, mp)
            echo(_stage_line(summary, cache))
            results.append(summary)
            finish_stage(model, stage)
    final = _save_final(model, data.tokenizer, run_dir, recipe)
    log.plot()
    log.close()
    return {"stages": results, "final": final, "plots": run_dir / "plots"}


class _Saver:
    """Writes the stage's checkpoints (model + every state needed to continue) and prunes old ones."""

    def __init__(self, run_dir, recipe, index, stage, model, optimizer, scheduler, mp, batches):
        self.__dict__.update(locals())
        del self.__dict__["self"]

    def save(self, step, global_step, bad, skipped) -> Path:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.mp.scaler.state_dict() if self.mp.scaler is not None else None,
                 "sampler": self.batches.state_dict(), "rng": ckpt.rng_state(), "step": step,
                 "global_step": global_step, "bad": bad, "skipped": skipped}
        meta = {"stage": self.stage.name, "stage_index": self.index, "step": step, "global_step": global_step,
                "digest": self.recipe.digest(), "time": time.time()}
        extra = {"config.json": json.dumps({"model_type": "fastvlm_vlm", "config": self.model.config.to_dict()}),
                 "lora.json": json.dumps(_lora_info(self.model))}
        root = Path(self.run_dir) / "checkpoints"
        path = ckpt.save_checkpoint(root, ckpt.checkpoint_name(self.index, self.stage.name, step), self.model,
                                    state, meta, extra)
        ckpt.prune(root, self.recipe.run.keep_checkpoints)
        return path


def _lora_info(model) -> dict:
    from dataclasses import asdict

    return {part: asdict(cfg) if (cfg := getattr(getattr(model, attr), "lora_config", None)) is not None else None
            for part, attr in (("llm", "language_model"), ("vision", "vision_tower"))}


def _feature_cache(model, run_dir: Path):
    """One cache per run: a later stage with the same frozen tower reads the earlier one's
    features (the cache's fingerprint covers the weights; other weights reset it)."""
    from fastvlm.models.feature_cache import FeatureCache

    return FeatureCache(run_dir / "feature_cache", model.vision_tower, model.feature_layers, on_stale="reset")


def _evaluate(model, stage, index, step, global_step, recipe, data, run_dir, log, mp) -> dict | None:
    """VQA accuracy per question type + validation loss (stages that produce answers)."""
    if stage.type not in ("align", "instruct") or not recipe.run.evaluate:
        return None
    from fastvlm.train.evaluation import evaluate, write_results
    from fastvlm.train.stage_data import eval_inputs

    device = next(model.parameters()).device
    # Under the stage's autocast: frozen weights may be stored in bf16. And forking the RNG
    # keeps evaluation from shifting the training run's random stream.
    with torch.random.fork_rng(), mp.autocast(device.type):
        model.eval()
        result = evaluate(model, data.tokenizer, max_new_tokens=recipe.run.eval_max_new_tokens,
                          **eval_inputs(recipe, run_dir, model))
        model.train()
        if getattr(model.vision_tower, "frozen", False):
            model.vision_tower.eval()
    write_results(result, run_dir, f"{stage.name}-step{step}")
    log.write({"event": "eval", "stage": stage.name, "stage_index": index, "step": step, "global_step": global_step,
               "accuracy": result["overall"], "val_loss": result.get("val_loss")})
    log.plot()
    return result


def _save_final(model, tokenizer, run_dir: Path, recipe: Recipe) -> Path:
    final = run_dir / "final"
    model.save_pretrained(final)
    tokenizer.save(final / "tokenizer")
    return final


def _bad_steps_message(stage: Stage, step: int, bad: int, mp, lr: float, finite: bool) -> str:
    what = "loss" if not finite else "gradient norm"
    if mp.precision == "fp16":
        cause = (f"fp16 overflow (loss scale now {mp.loss_scale:g}); use precision = 'bf16' or 'fp32', "
                 "or lower the learning rate")
    else:
        cause = (f"the learning rate (lr {lr:.3g} now; max {max(stage.lr.values()):.3g}) is too high for this stage, "
                 "or a batch holds broken data")
    return f"stage {stage.name!r}, step {step}: non-finite {what} in {bad} steps in a row; likely cause: {cause}"


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _progress(stage: Stage, index: int, total: int, step: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=step, desc=f"[{index + 1}] {stage.name} ({stage.type})", disable=not enabled,
                file=sys.stderr, dynamic_ncols=True, leave=False)


def _postfix(m: dict) -> str:
    loss = "nan" if m["loss"] is None else f"{m['loss']:.4f}"
    return (f"loss {loss} lr {m['lr']:.2e} tok/s {m['tokens_per_s']:.0f} samples/s {m['samples_per_s']:.1f} "
            f"peak {m['peak_mem_mb']:.0f}MB")


def _stage_line(s: dict, cache) -> str:
    loss = "nan" if s["loss"] is None else f"{s['loss']:.4f}"
    line = (f"stage {s['stage']} ({s['type']}): {s['steps']} steps in {s['seconds']:.1f}s, final loss {loss}, "
            f"{s['trainable']:,} trainable parameters")
    if s["skipped"]:
        line += f", {s['skipped']} steps skipped (non-finite)"
    if cache is not None:
        line += f", feature cache {cache.hits} hits / {cache.misses} misses"
    if s.get("eval"):
        line += f", val accuracy {s['eval']['overall']:.1%}"
    return line
