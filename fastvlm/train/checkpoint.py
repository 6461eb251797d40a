"""Run checkpoints: everything a step needs to continue exactly, in one directory.

RUN/checkpoints/s<stage>-<name>-step<step>/
    model.safetensors   the whole model's state dict (LoRA layers included)
    state.pt            optimizer, scheduler, loss scaler, data sampler, RNG states, counters
    meta.json           stage index and name, step, recipe digest; written last

A run of a distributed recipe (run.distributed = ddp | fsdp, any world size) holds
    dcp/                model + optimizer, torch.distributed.checkpoint (every rank its shards)
    state.pt            the rest, from rank 0 (its "optimizer" is None)
    rng-<rank>.pt       each rank's RNG states
instead of model.safetensors; DCP reshards on load, so it resumes on another world size.

Neither holds a QLoRA stage's NF4 weights (fastvlm.train.quant): resuming re-quantizes
the frozen base from its source, the starting model's weights, or, when an earlier stage
trained the LLM, RUN/checkpoints/s<stage>-<name>-nf4-source.safetensors (the weights the
stage quantized, written once when it starts).

A checkpoint is built in RUN/checkpoints/.tmp-<uuid>/ and renamed into place
once complete (a rename within one folder is atomic), so a writer killed at any
point leaves the previous checkpoints untouched and at most a .tmp-* folder that
nothing reads; the newest K complete ones are kept.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from fastvlm.nn.lora import LoRALinear
from fastvlm.train import distributed
from fastvlm.train.quant import quantized_state_keys
from fastvlm.train.recipe import Recipe, to_toml
from fastvlm.utils.io import atomic_write, atomic_write_text

NAME = re.compile(r"^s(\d{2})-(.+)-step(\d{7})$")


def checkpoint_name(stage_index: int, stage: str, step: int) -> str:
    return f"s{stage_index:02d}-{stage}-step{step:07d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: Path, name: str, model: torch.nn.Module, state: dict, meta: dict,
                    extra: dict[str, str] | None = None) -> Path:
    """Write a complete checkpoint under root/name (replacing one of that name); `extra`
    holds further text files (config.json, lora.json) by name."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        state_dict = model.state_dict()
        nf4 = quantized_state_keys(model, state_dict)
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if k not in nf4}
        save_file(_untie(tensors), str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
        for filename, text in (extra or {}).items():
            (tmp / filename).write_text(text)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        final = root / name
        _replace_dir(tmp, final)  # the same step saved again (e.g. after a resume) is swapped out
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _untie(tensors: dict) -> dict:
    # safetensors refuses tensors sharing memory (tied embeddings): store a copy of each alias.
    seen, out = set(), {}
    for k, v in tensors.items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (by stage, then step)."""
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = NAME.match(d.name)
        weights = (d / "model.safetensors").is_file() or (d / "dcp" / ".metadata").is_file()
        if m and (d / "meta.json").is_file() and (d / "state.pt").is_file() and weights:
            found.append(((int(m.group(1)), int(m.group(3))), d))
    return [d for _, d in sorted(found)]


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer=None, rank: int = 0) -> tuple[dict, dict]:
    """Load the weights into `model` (whose structure must match); return (state, meta). A DCP
    checkpoint also loads `optimizer` (required then) and gives this rank's RNG states (rank 0's
    where the checkpoint had fewer ranks)."""
    if (path / "dcp").is_dir():
        if optimizer is None:
            raise ValueError(f"checkpoint {path}: a distributed run's checkpoint; resume it with the recipe's "
                             "run.distributed (ddp / fsdp), which loads model and optimizer together")
        distributed.load_state(path / "dcp", model, optimizer)
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        own = path / f"rng-{rank}.pt"
        state["rng"] = torch.load(own if own.is_file() else path / "rng-0.pt", weights_only=False)
        return state, json.loads((path / "meta.json").read_text())
    if optimizer is not None:
        raise ValueError(f"checkpoint {path}: a one-process run's checkpoint (model.safetensors); a distributed "
                         "recipe reads DCP checkpoints only")

    load_weights(path / "model.safetensors", model)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    return state, json.loads((path / "meta.json").read_text())


def load_weights(file: Path, model: torch.nn.Module, skip=lambda key: False) -> None:
    """A safetensors file of the model's weights (all of them, but for NF4 weights, which
    the model re-quantized itself) into `model`; keys `skip` names are left out."""
    from safetensors.torch import load_file

    tensors = {k: v for k, v in load_file(str(file)).items() if not skip(k)}
    expected = {k for k in model.state_dict() if not skip(k)}
    expected -= quantized_state_keys(model, expected)
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise ValueError(f"checkpoint {file.parent}: does not fit the model of this stage (missing "
                         f"{sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})")
    model.load_state_dict(tensors, strict=False)


def nf4_source_path(root: Path, stage_index: int, stage: str) -> Path:
    return root / f"s{stage_index:02d}-{stage}-nf4-source.safetensors"


def save_tensors(path: Path, tensors: dict) -> None:
    """A safetensors file written atomically."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(_untie(cpu), tmp))


def save_sharded_checkpoint(root: Path, name: str, dist, model, optimizer, state: dict | None, rng: dict,
                            meta: dict, extra: dict[str, str], keep: int) -> Path:
    """save_checkpoint for every rank of a job: all ranks write their DCP shards and RNG
    states into one temporary directory, then rank 0 adds state.pt, `extra` and meta.json,
    renames it into place and prunes (keeping `keep`)."""
    tmp = root / dist.broadcast(f".tmp-{uuid.uuid4().hex}")
    if dist.is_main:
        tmp.mkdir(parents=True)
    dist.barrier()
    try:
        distributed.save_state(tmp / "dcp", model, optimizer)
        torch.save(rng, tmp / f"rng-{dist.rank}.pt")
        _fsync_tree(tmp)
        dist.barrier()
        final = root / name
        if dist.is_main:
            torch.save(state, tmp / "state.pt")
            for filename, text in extra.items():
                (tmp / filename).write_text(text)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            _fsync_tree(tmp)
            _replace_dir(tmp, final)
            prune(root, keep)
        dist.barrier()
        return final
    finally:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [path, *(d for d in path.rglob("*") if d.is_dir())]:
        _fsync_dir(d)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename the complete `tmp` to `final`, swapping out one of that name (the same step saved again)."""
    root = final.parent
    if final.exists():
        old = root / f".tmp-old-{uuid.uuid4().hex}"
        os.replace(final, old)
        shutil.rmtree(old)
    os.replace(tmp, final)
    _fsync_dir(root)


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and stale temporary folders."""
    for d in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
    for d in root.glob(".tmp-*"):
        shutil.rmtree(d, ignore_errors=True)


def prepare_run_dir(recipe: Recipe, run_dir: Path, resume: bool, write: bool = True) -> None:
    """Refuse a directory that holds another recipe's run (checkpoints or a final model: a
    start that failed before training leaves nothing to protect); with `write`, record the
    resolved recipe as the run's identity (the trainer does so once the run has started)."""
    info = run_dir / "recipe.json"
    trained = bool(complete_checkpoints(run_dir / "checkpoints")) or (run_dir / "final").is_dir()
    if info.is_file() and trained:
        found = json.loads(info.read_text())["digest"]
        if found != recipe.digest():
            raise ValueError(f"--out: {run_dir} holds a run of another recipe (hash {found}, this one "
                             f"{recipe.digest()}); use another directory")
        if not resume and complete_checkpoints(run_dir / "checkpoints"):
            raise ValueError(f"--out: {run_dir} already holds checkpoints of this recipe; pass --resume to "
                             "continue it, or use another directory")
    if not write:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "recipe.toml", to_toml(recipe))
    atomic_write_text(info, json.dumps({"digest": recipe.digest(), "recipe": recipe.to_dict()}, indent=2))


def lora_info(model) -> dict:
    """The LoRA setup of a VLM's parts (lora.json beside a checkpoint's weights)."""
    info = {part: asdict(cfg) if (cfg := getattr(getattr(model, attr), "lora_config", None)) is not None else None
            for part, attr in (("llm", "language_model"), ("vision", "vision_tower"))}
    info["llm_nf4"] = any(isinstance(m, LoRALinear) and m.quantized for m in model.language_model.modules())
    return info


def checkpoint_files(model) -> dict[str, str]:
    """The text files beside a checkpoint's weights: the model's own (``checkpoint_files()``,
    e.g. a Hugging Face VLM's config), else fastvlm.VLM's config.json and lora.json."""
    own = getattr(model, "checkpoint_files", None)
    if own is not None:
        return own()
    return {"config.json": json.dumps({"model_type": "fastvlm_vlm", "config": model.config.to_dict()}),
            "lora.json": json.dumps(lora_info(model))}


class StageSaver:
    """Writes a stage's checkpoints (model + every state needed to continue) and prunes old ones."""

    def __init__(self, run_dir: Path, recipe: Recipe, index: int, stage, model, optimizer, scheduler, mp,
                 batches, dist):
        self.run_dir, self.recipe, self.index, self.stage, self.model = Path(run_dir), recipe, index, stage, model
        self.optimizer, self.scheduler, self.mp, self.batches, self.dist = optimizer, scheduler, mp, batches, dist

    def save(self, step: int, global_step: int, bad: int, skipped: int) -> Path:
        dcp = self.dist.uses_dcp  # model + optimizer sharded through DCP then, the rest from rank 0
        state = {"optimizer": None if dcp else self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.mp.scaler.state_dict() if self.mp.scaler is not None else None,
                 "sampler": self.batches.state_dict(), "rng": rng_state(), "step": step,
                 "global_step": global_step, "bad": bad, "skipped": skipped}
        meta = {"stage": self.stage.name, "stage_index": self.index, "step": step, "global_step": global_step,
                "digest": self.recipe.digest(), "time": time.time()}
        extra = checkpoint_files(self.model)
        root = self.run_dir / "checkpoints"
        name = checkpoint_name(self.index, self.stage.name, step)
        if dcp:
            return save_sharded_checkpoint(root, name, self.dist, self.model, self.optimizer, state, rng_state(),
                                           meta, extra, self.recipe.run.keep_checkpoints)
        path = save_checkpoint(root, name, self.model, state, meta, extra)
        prune(root, self.recipe.run.keep_checkpoints)
        return path

    def restore(self, path: Path, device: torch.device) -> dict:
        """Load checkpoint `path` into the model, optimizer, scheduler, scaler, sampler and RNG;
        returns its counters (step, bad, skipped, global_step)."""
        state, _ = load_checkpoint(path, self.model, self.optimizer if self.dist.uses_dcp else None, self.dist.rank)
        if not self.dist.uses_dcp:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None:
            self.mp.scaler = torch.amp.GradScaler(device.type)
            self.mp.scaler.load_state_dict(state["scaler"])
        self.batches.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        return {k: state[k] for k in ("step", "bad", "skipped", "global_step")}

