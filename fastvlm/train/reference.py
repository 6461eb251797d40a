"""Per-pair log-probs of a preference stage's pairs, and its precomputed reference.

``pair_logprobs`` runs a model without autograd over preference pairs: each pair's (chosen,
rejected) summed log-probs and token counts (the validation rewards use it too).
``reference = "precomputed"`` (the only choice when the stage fine-tunes fully: there are no
adapters to switch off) runs it as the stage starts over every pair of the stage's data and of
``data.preference_val``, and keeps the tables in ``RUN/reference/stage<i>-<name>.pt`` (written
atomically, with the recipe digest and pair counts it belongs to). A resumed stage reads that
file: the model as the stage started is gone (the checkpoint holds the trained weights), so
the file is what makes the reference resumable.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from fastvlm.data.images import BadImageCounter
from fastvlm.train.losses import preference_inputs
from fastvlm.train.recipe import Recipe, Stage
from fastvlm.train.stage_data import preference_dataset
from fastvlm.utils.io import atomic_write


def needs_precomputed(stage: Stage) -> bool:
    p = stage.preference
    return stage.type == "preference" and p.loss == "dpo" and p.reference == "precomputed"


def reference_path(run_dir, index: int, stage: Stage) -> Path:
    return Path(run_dir) / "reference" / f"stage{index}-{stage.name}.pt"


@torch.no_grad()
def pair_logprobs(model, dataset, collator, mp, device: torch.device, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([pairs, 2] float64 summed log-probs, [pairs, 2] token counts) of each pair's (chosen,
    rejected) answers under `model` as it is (eval mode, the stage's autocast, the RNG
    untouched), `rows` pairs a batch, one per row; NaN (and 0) for a pair the dataset skips
    (counted apart from the dataset's own counter: a stage counts its skips itself)."""
    dataset = copy.copy(dataset)
    dataset.skipped = BadImageCounter()
    logps = torch.full((len(dataset), 2), float("nan"), dtype=torch.float64)
    counts = torch.zeros((len(dataset), 2), dtype=torch.long)
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
            logp, count = model.answer_logprobs(**preference_inputs(model, batch, device))
            logps[batch["item_indices"]] = logp.double().cpu().view(-1, 2)
            counts[batch["item_indices"]] = count.cpu().view(-1, 2)
    model.train(was_training)
    return logps, counts


def saved_reference(run_dir, index: int, stage: Stage, owner: dict | None = None) -> dict | None:
    """The stage's saved reference tables {"logp": train [pairs, 2], "val_logp": [val pairs, 2]
    or None}, if written (for `owner`, when given)."""
    path = reference_path(run_dir, index, stage)
    if not path.is_file():
        return None
    found = torch.load(path, map_location="cpu", weights_only=True)
    return found if owner is None or found.get("owner") == owner else None


def stage_reference(model, stage: Stage, index: int, recipe: Recipe, batches, mp, device: torch.device, run_dir,
                    dist, resuming: bool, data) -> torch.Tensor | None:
    """The stage's precomputed reference table (None unless it asks for one): read from the
    run directory when there for this recipe and data, else computed by rank 0 (before any
    wrapping: the whole model is on every rank) and written there; every rank reads it."""
    if not needs_precomputed(stage):
        return None
    path = reference_path(run_dir, index, stage)
    owner = {"recipe": recipe.digest(), "stage": index, "pairs": len(batches.samples),
             "val_pairs": len(data.preference_val)}
    if dist.is_main and saved_reference(run_dir, index, stage, owner) is None:
        if resuming:
            raise ValueError(f"--resume: {path} is missing or belongs to another recipe or data: stage "
                             f"{stage.name!r} resumes with its precomputed reference, made as the stage started")
        tables = {"owner": owner, "val_logp": None,
                  "logp": pair_logprobs(model, batches.dataset, batches.collator, mp, device, stage.batch_size)[0]}
        if data.preference_val:
            val = preference_dataset(data.preference_val, stage, recipe, data, model)
            tables["val_logp"] = pair_logprobs(model, val, batches.collator, mp, device, stage.batch_size)[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(tables, tmp))
    dist.barrier()
    return saved_reference(run_dir, index, stage, owner)["logp"]
