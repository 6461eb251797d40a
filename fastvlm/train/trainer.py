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
current step, writes a checkpoint and raises ``Interrupted``. Under torchrun
(``run.distributed``), fastvlm.train.distributed wraps each stage's model and every
rank runs this loop on its share of each step (rank 0 alone writes).
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import resource
import signal
import sys
import time
import warnings
from pathlib import Path

import torch

from fastvlm.data.images import load_image
from fastvlm.models.feature_cache import FeatureCache
from fastvlm.nn.lora import LoRALinear
from fastvlm.train import build, distributed
from fastvlm.train import checkpoint as ckpt
from fastvlm.train.build import GROUP_PATTERNS, build_model, finish_stage, prepare_stage
from fastvlm.train.contrastive import text_states
from fastvlm.train.evaluation import eval_inputs, evaluate, write_results
from fastvlm.train.metrics import MetricsLog
from fastvlm.train.optim import build_optimizer, param_groups
from fastvlm.train.quant import quantized_state_keys
from fastvlm.train.recipe import Recipe, Stage, to_toml
from fastvlm.train.schedule import lr_lambda
from fastvlm.train.stage_data import StageBatches, prepare_data
from fastvlm.utils.io import atomic_write_text


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. losses keep coming out non-finite)."""


class Interrupted(Exception):
    """SIGINT arrived; a checkpoint was written (``path``)."""

    def __init__(self, path):
        super().__init__(f"interrupted: checkpoint written to {path}")
        self.path = path


def prepare_run_dir(recipe: Recipe, run_dir: Path, resume: bool, write: bool = True) -> None:
    """Refuse a directory that holds another recipe's run (checkpoints or a final model: a
    start that failed before training leaves nothing to protect); with `write`, record the
    resolved recipe as the run's identity (the trainer does so once the run has started)."""
    info = run_dir / "recipe.json"
    trained = bool(ckpt.complete_checkpoints(run_dir / "checkpoints")) or (run_dir / "final").is_dir()
    if info.is_file() and trained:
        found = json.loads(info.read_text())["digest"]
        if found != recipe.digest():
            raise ValueError(f"--out: {run_dir} holds a run of another recipe (hash {found}, this one "
                             f"{recipe.digest()}); use another directory")
        if not resume and ckpt.complete_checkpoints(run_dir / "checkpoints"):
            raise ValueError(f"--out: {run_dir} already holds checkpoints of this recipe; pass --resume to "
                             "continue it, or use another directory")
    if not write:
        return
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
    if cache is not None:
        # The cache asks for its misses' pixels by file bytes; the batch has them decoded already.
        # A micro-batch without images passes [] (no image's features): the model then runs the
        # connector alone, as the cached micro-batches do (see VLM.blank_image_term).
        blobs = [p.read_bytes() for p in batch["image_files"]]
        first = {blob: i for i, blob in reversed(list(enumerate(blobs)))}
        features = cache.features(blobs, lambda missing: batch["images"][[first[b] for b in missing]]) if blobs else []
        return model(**kwargs, image_features=features)
    images = batch.get("images")
    return model(**kwargs, images=images.to(device) if images is not None else None)


def contrastive_micro_loss(model, stage: Stage, batch: dict, device) -> torch.Tensor:
    """The towers under the caller's autocast; pooling, projections and the B x B loss in
    fp32 (in bf16 the loss itself would be rounded to 3 significant digits)."""
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


def accumulate_distributed(step_loss, micro: list[dict], mp, device, dist) -> float | None:
    """accumulate_gradients over the ranks of a job: this rank's micro-batches, each weighted
    by its supervised tokens over the step's count on all ranks (times W: the gradient
    reduction averages), gradients synchronised on the last one only; the step's global loss."""
    total = dist.all_reduce([sum(b["supervised_tokens"] for b in micro)])[0]
    local = 0.0
    for i, batch in enumerate(micro):
        weight = batch["supervised_tokens"] / total if total else 0.0
        # Every rank runs every backward (also of a non-finite loss: its NaN gradients reach all
        # ranks), so the ranks agree on skipping the step.
        with dist.sync_context(step_loss, sync=i == len(micro) - 1):
            with mp.autocast(device.type):
                loss = step_loss(batch)
            mp.backward(loss * (weight * dist.world))
        local += float(loss.detach()) * weight
    value = dist.all_reduce([local])[0]
    return value if math.isfinite(value) else None


def _grad_norm(params, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor


def optimizer_step(model, stage: Stage, micro: list[dict], optimizer, mp, device, cache=None, dist=None,
                   step_loss=None):
    """One optimizer step: (loss or None when non-finite, gradient norm, whether it stepped).
    A non-finite loss or gradient skips the update (fp16: the loss scale backs off). With an
    active `dist`, `step_loss` (the wrapped micro-batch loss) runs this rank's share."""
    optimizer.zero_grad(set_to_none=True)
    if dist is not None and dist.active:
        loss_value = accumulate_distributed(step_loss, micro, mp, device, dist)
    else:
        loss_value = accumulate_gradients(model, stage, micro, mp, device, cache)
    grad_norm = float("nan")
    if loss_value is not None:
        mp.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = _grad_norm(params, stage.grad_clip or float("inf"))
    # With fp16 the scaler sees inf gradients itself (skips, backs off); otherwise skip here.
    stepped = loss_value is not None and (mp.scaler is not None or math.isfinite(grad_norm)) and mp.step(optimizer)
    if loss_value is None and mp.scaler is not None:
        mp.scaler.update(mp.scaler.get_scale() / 2)  # back off as GradScaler does on an overflow
    if not stepped:
        optimizer.zero_grad(set_to_none=True)
    return loss_value, grad_norm, stepped


def train(recipe: Recipe, run_dir, *, resume: bool = False, progress: bool = True, echo=print) -> dict:
    """Run every stage of `recipe` into `run_dir`; returns {"stages": [...], "final": path}.
    Under torchrun (run.distributed = 'ddp' | 'fsdp') every rank calls it; rank 0 alone
    writes logs, plots, evaluations and the final model."""
    run_dir = Path(run_dir)
    dist, device = distributed.init(recipe.run.distributed, recipe.run.device)
    prepare_run_dir(recipe, run_dir, resume, write=False)
    dist.barrier()  # every rank checked the directory before rank 0 writes to it
    if dist.is_main:
        data = prepare_data(recipe, run_dir)  # generates the data, trains the tokenizer on first use
    dist.barrier()
    if not dist.is_main:  # reads what rank 0 wrote; writes nothing (another node may see other mtimes)
        data = prepare_data(recipe, run_dir, write=False)
    torch.manual_seed(recipe.run.seed)
    model = build_model(recipe, data.tokenizer, recipe.run.seed).to(device)
    if dist.is_main:  # the run has started: from here on the directory is this recipe's
        prepare_run_dir(recipe, run_dir, resume)
        for split, dropped in data.dropped.items():
            if dropped.total and not (split == "data.captions" and dropped is data.dropped["data.train"]):
                echo(f"{split}: {dropped.total} samples skipped before training: {dropped.report()}")
    log = MetricsLog(run_dir) if dist.is_main else _NoLog()
    echo = echo if dist.is_main else _silent
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
            dist.check_stage(stage)
            resuming_here = bool(start) and index == start["stage_index"]
            if resuming_here:  # the base this QLoRA stage quantized, as it found it (if an earlier stage trained it)
                build.load_nf4_source(model, recipe, index, run_dir)
            elif dist.is_main:
                build.save_nf4_source(model, recipe, index, run_dir)
            dist.barrier()
            settings = prepare_stage(model, stage, recipe, device)
            mp = settings["precision"]
            batches = StageBatches(stage, recipe, data, model, seed=recipe.run.seed + index)
            batches.shard(dist.rank, dist.world, dist.all_gather)
            total = batches.total_steps()
            frozen_tower = stage.type in ("align", "instruct") and model.vision_tower.frozen
            cache = _feature_cache(model, run_dir, dist) if frozen_tower and stage.feature_cache else None
            if cache is not None and dist.active:
                _fill_cache(cache, batches, dist)
            # The optimizer right after wrapping: FSDP2 has swapped in the sharded parameters.
            step_loss = dist.wrap(model, _MicroLoss(model, stage, device, cache))
            optimizer, scheduler = stage_optimizer(model, stage, total)
            step, bad, skipped = 0, 0, 0
            if resuming_here:
                state, _ = ckpt.load_checkpoint(found[-1], model, optimizer if dist.uses_dcp else None, dist.rank)
                if not dist.uses_dcp:
                    optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                if state.get("scaler") is not None:
                    mp.scaler = torch.amp.GradScaler(device.type)
                    mp.scaler.load_state_dict(state["scaler"])
                batches.load_state_dict(state["sampler"])
                ckpt.set_rng_state(state["rng"])
                step, bad, skipped, global_step = state["step"], state["bad"], state["skipped"], state["global_step"]
            saver = _Saver(run_dir, recipe, index, stage, model, optimizer, scheduler, mp, batches, dist)
            model.train()
            stream = batches.steps()
            bar = _progress(stage, index, total, step, progress and dist.is_main)
            stage_t0 = time.perf_counter()
            last = next((r for r in reversed(log.records()) if r["event"] == "step" and r["stage_index"] == index), {})
            while step < total:
                if sigint.set if not dist.active else dist.all_reduce([sigint.set], "max")[0]:
                    path = saver.save(step, global_step, bad, skipped)
                    bar.close()
                    raise Interrupted(path)
                t0 = time.perf_counter()
                micro = next(stream)  # this rank's share of the step's micro-batches (all in one process)
                loss_value, grad_norm, stepped = optimizer_step(model, stage, micro, optimizer, mp, device, cache,
                                                                dist, step_loss)
                finite = loss_value is not None
                lr = optimizer.param_groups[0]["lr"]
                lrs = {f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}  # this step's, not the next
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
                real, samples = dist.all_reduce([sum(b["real_tokens"] for b in micro),
                                                 sum(b["num_samples"] for b in micro)])
                last = {"event": "step", "stage": stage.name, "stage_index": index, "step": step,
                        "global_step": global_step, "loss": loss_value, "lr": lr,
                        "grad_norm": grad_norm, "skipped": skipped, "loss_scale": mp.loss_scale,
                        "tokens_per_s": real / dt, "samples_per_s": samples / dt,
                        "peak_mem_mb": dist.all_reduce([_peak_mem_mb(device)], "max")[0],
                        "skipped_samples": batches.skipped.total, **lrs}
                if step % recipe.run.log_every == 0 or step == total:
                    log.write(last)
                bar.set_postfix_str(_postfix(last))
                bar.update(1)
                if stage.eval_every and step % stage.eval_every == 0 and step < total:
                    _evaluate(model, stage, index, step, global_step, recipe, data, run_dir, log, mp, dist)
                if stage.checkpoint_every and step % stage.checkpoint_every == 0 and step < total:
                    saver.save(step, global_step, bad, skipped)
            bar.close()
            saver.save(step, global_step, bad, skipped)
            if dist.mode == "fsdp" and dist.active:
                model = _unsharded(model, recipe, data, index, device, run_dir)
            summary = {"stage": stage.name, "type": stage.type, "steps": total, "skipped": skipped,
                       "loss": last.get("loss"), "seconds": time.perf_counter() - stage_t0,
                       "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                       "samples": {"stage_samples": len(batches.samples), "skipped": batches.skipped.as_dict(),
                                   "filtered": batches.filtered.as_dict()}}
            log.write({"event": "samples", "stage": stage.name, "stage_index": index, "step": step,
                       "global_step": global_step, **summary["samples"]})
            summary["eval"] = _evaluate(model, stage, index, step, global_step, recipe, data, run_dir, log, mp,
                                        dist)
            if cache is not None:
                summary["cache"] = dist.all_reduce([cache.hits, cache.misses])
            echo(_stage_line(summary))
            results.append(summary)
            finish_stage(model, stage)
    final = None
    if dist.is_main:
        final = _save_final(model, data.tokenizer, run_dir, recipe)
        log.plot()
        log.close()
    dist.barrier()
    return {"stages": results, "final": final or run_dir / "final", "plots": run_dir / "plots", "model": model,
            "distributed": dist}


class _MicroLoss(torch.nn.Module):
    """The stage's micro-batch loss as a module, for DDP / FSDP to wrap (every stage type's
    forward, the LLM-only and contrastive ones included, runs through the wrapper)."""

    def __init__(self, model, stage: Stage, device, cache):
        super().__init__()
        self.model, self.stage, self.device, self.cache = model, stage, device, cache

    def forward(self, batch: dict) -> torch.Tensor:
        return micro_loss(self.model, self.stage, batch, self.device, self.cache)


class _NoLog:
    """What ranks other than 0 log: nothing."""

    def truncate_after(self, *args):
        pass

    def records(self):
        return []

    write = plot = close = truncate_after


def _silent(*args, **kwargs):
    pass


def _unsharded(model, recipe: Recipe, data, index: int, device, run_dir: Path):
    """The FSDP-sharded model of stage `index` as a plain one on every rank (for evaluation,
    merging LoRA and the next stage): the same model rebuilt by replaying the stages' shaping,
    with the gathered weights loaded."""
    full = distributed.full_model_state(model)
    with torch.random.fork_rng():  # replaying must not move the run's random stream
        fresh = build.stage_model(recipe, data.tokenizer, index, run_dir, device)
    nf4 = quantized_state_keys(fresh, fresh.state_dict())  # re-quantized by the rebuild, as at the stage's start
    fresh.load_state_dict({k: v for k, v in full.items() if k not in nf4}, strict=not nf4)
    return fresh


def _fill_cache(cache, batches, dist, chunk: int = 16) -> None:
    """Encode every image of the stage once across the job: rank r takes every W-th missing
    file, writes its shards to the shared cache directory; then every rank indexes them all."""
    files = sorted({batches.image_root / p for s in batches.samples for p in s.images})
    blobs = {path: path.read_bytes() for path in files[dist.rank::dist.world]}
    mine = [path for path, blob in blobs.items() if blob not in cache]
    for i in range(0, len(mine), chunk):
        pixels = {blobs[p]: load_image(p, batches.dataset.preprocessor) for p in mine[i:i + chunk]}
        pixels = {b: x for b, x in pixels.items() if x is not None}  # bad files: the dataset skips their samples
        if pixels:
            with torch.no_grad():
                cache.features(list(pixels), lambda missing: torch.stack([pixels[b] for b in missing]))
    dist.barrier()
    cache.refresh()


class _Saver:
    """Writes the stage's checkpoints (model + every state needed to continue) and prunes old ones."""

    def __init__(self, run_dir, recipe, index, stage, model, optimizer, scheduler, mp, batches, dist):
        self.__dict__.update(locals())
        del self.__dict__["self"]

    def save(self, step, global_step, bad, skipped) -> Path:
        dcp = self.dist.uses_dcp  # model + optimizer sharded through DCP then, the rest from rank 0
        state = {"optimizer": None if dcp else self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.mp.scaler.state_dict() if self.mp.scaler is not None else None,
                 "sampler": self.batches.state_dict(), "rng": ckpt.rng_state(), "step": step,
                 "global_step": global_step, "bad": bad, "skipped": skipped}
        meta = {"stage": self.stage.name, "stage_index": self.index, "step": step, "global_step": global_step,
                "digest": self.recipe.digest(), "time": time.time()}
        extra = {"config.json": json.dumps({"model_type": "fastvlm_vlm", "config": self.model.config.to_dict()}),
                 "lora.json": json.dumps(_lora_info(self.model))}
        root = Path(self.run_dir) / "checkpoints"
        name = ckpt.checkpoint_name(self.index, self.stage.name, step)
        if dcp:
            return ckpt.save_sharded_checkpoint(root, name, self.dist, self.model, self.optimizer, state,
                                                ckpt.rng_state(), meta, extra, self.recipe.run.keep_checkpoints)
        path = ckpt.save_checkpoint(root, name, self.model, state, meta, extra)
        ckpt.prune(root, self.recipe.run.keep_checkpoints)
        return path


def _lora_info(model) -> dict:
    from dataclasses import asdict

    info = {part: asdict(cfg) if (cfg := getattr(getattr(model, attr), "lora_config", None)) is not None else None
            for part, attr in (("llm", "language_model"), ("vision", "vision_tower"))}
    info["llm_nf4"] = any(isinstance(m, LoRALinear) and m.quantized for m in model.language_model.modules())
    return info


def _feature_cache(model, run_dir: Path, dist=None):
    """One cache per run: a later stage with the same frozen tower reads the earlier one's
    features (the cache's fingerprint covers the weights; other weights reset it). Ranks
    share the directory; rank 0 opens (or resets) it first."""
    def open_cache():
        return FeatureCache(run_dir / "feature_cache", model.vision_tower, model.feature_layers, on_stale="reset")

    dist = dist or distributed.Distributed()
    cache = open_cache() if dist.is_main else None
    dist.barrier()
    return cache or open_cache()


def _evaluate(model, stage, index, step, global_step, recipe, data, run_dir, log, mp, dist) -> dict | None:
    """VQA accuracy per question type + validation loss (stages that produce answers), on
    rank 0; on every rank in lockstep while the model is FSDP-sharded (its forward gathers)."""
    if stage.type not in ("align", "instruct") or not recipe.run.evaluate:
        return None
    sharded = dist.active and distributed.is_sharded(model)
    if not (dist.is_main or sharded):
        dist.barrier()
        return None
    with dist.gathered() if sharded else contextlib.nullcontext():
        result = _run_evaluation(model, stage, index, step, global_step, recipe, data, run_dir, log, mp, dist)
    if not sharded:
        dist.barrier()
    return result


def _run_evaluation(model, stage, index, step, global_step, recipe, data, run_dir, log, mp, dist) -> dict:
    device = next(model.parameters()).device
    # Under the stage's autocast: frozen weights may be stored in bf16. And forking the RNG
    # keeps evaluation from shifting the training run's random stream.
    with torch.random.fork_rng(), mp.autocast(device.type):
        model.eval()
        result = evaluate(model, data.tokenizer, max_new_tokens=recipe.run.eval_max_new_tokens,
                          **eval_inputs(recipe, run_dir, model, data=data))
        model.train()
        if getattr(model.vision_tower, "frozen", False):
            model.vision_tower.eval()
    if not dist.is_main:
        return result
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

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _progress(stage: Stage, index: int, total: int, step: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=step, desc=f"[{index + 1}] {stage.name} ({stage.type})", disable=not enabled,
                file=sys.stderr, dynamic_ncols=True, leave=False)


def _postfix(m: dict) -> str:
    loss = "nan" if m["loss"] is None else f"{m['loss']:.4f}"
    text = (f"loss {loss} lr {m['lr']:.2e} tok/s {m['tokens_per_s']:.0f} samples/s {m['samples_per_s']:.1f} "
            f"peak {m['peak_mem_mb']:.0f}MB")
    return text + (f" skipped {m['skipped_samples']}" if m["skipped_samples"] else "")


def _stage_line(s: dict) -> str:
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
    return line
