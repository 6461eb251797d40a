"""A preference stage's precomputed reference: DPO's reference log-probs in one pass before training.

``reference = "precomputed"`` (the only choice when the stage fine-tunes fully: there are no
adapters to switch off) runs the model as the stage starts, without autograd, over every pair
of the stage's data, and keeps each pair's (chosen, rejected) summed log-probs in
``RUN/reference/stage<i>-<name>.pt`` (written atomically, with the recipe digest and the pair
count it belongs to). A resumed stage reads that file: its model at the stage's start is gone
(the checkpoint holds the trained weights), so the file is what makes the reference resumable.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from fastvlm.data.images import BadImageCounter
from fastvlm.train.losses import preference_inputs
from fastvlm.train.recipe import Recipe, Stage
from fastvlm.utils.io import atomic_write


def needs_precomputed(stage: Stage) -> bool:
    p = stage.preference
    return stage.type == "preference" and p.loss == "dpo" and p.reference == "precomputed"


def reference_path(run_dir, index: int, stage: Stage) -> Path:
    return Path(run_dir) / "reference" / f"stage{index}-{stage.name}.pt"


@torch.no_grad()
def reference_logprobs(model, dataset, collator, mp, device: torch.device, rows: int) -> torch.Tensor:
    """[pairs, 2] float64: each pair's (chosen, rejected) summed log-probs under `model` as it is
    (eval mode, the stage's autocast, the RNG untouched), `rows` pairs a batch, one per row; NaN
    for a pair the dataset skips (its skips are counted apart: the stage counts its own)."""
    dataset = copy.copy(dataset)
    dataset.skipped = BadImageCounter()
    table = torch.full((len(dataset), 2), float("nan"), dtype=torch.float64)
    collate = getattr(collator, "collate_planned", None)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), mp.autocast(device.type):
        for start in range(0, len(dataset), rows):
            chunk = [item for item in map(dataset.__getitem__, range(start, min(start + rows, len(dataset))))
                     if item is not None]
            if not chunk:
                continue
            batch = collate([[item] for item in chunk]) if collate is not None else collator(chunk)
            logp, _ = model.answer_logprobs(**preference_inputs(model, batch, device))
            table[batch["item_indices"]] = logp.double().cpu().view(-1, 2)
    model.train(was_training)
    return table


def stage_reference(model, stage: Stage, index: int, recipe: Recipe, batches, mp, device: torch.device, run_dir,
                    dist, resuming: bool) -> torch.Tensor | None:
    """The stage's precomputed reference table (None unless it asks for one): read from the
    run directory when there for this recipe and data, else computed by rank 0 (before any
    wrapping: the whole model is on every rank) and written there; every rank reads it."""
    if not needs_precomputed(stage):
        return None
    path = reference_path(run_dir, index, stage)
    owner = {"recipe": recipe.digest(), "stage": index, "pairs": len(batches.samples)}

    def saved() -> torch.Tensor | None:
        if not path.is_file():
            return None
        found = torch.load(path, map_location="cpu", weights_only=True)
        return found["logp"] if found.get("owner") == owner else None

    if dist.is_main and saved() is None:
        if resuming:
            raise ValueError(f"--resume: {path} is missing or belongs to another recipe or data: stage "
                             f"{stage.name!r} resumes with its precomputed reference, made as the stage started")
        table = reference_logprobs(model, batches.dataset, batches.collator, mp, device, stage.batch_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save({"owner": owner, "logp": table}, tmp))
    dist.barrier()
    return saved()
