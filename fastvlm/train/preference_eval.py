"""A preference stage's validation: rewards on ``data.preference_val``, before and after.

``evaluate_preference`` scores the first ``data.eval_samples`` validation pairs (all with 0)
with the stage's own loss: its reward accuracy (the fraction of pairs whose chosen answer's
reward is strictly higher) and mean reward margin, and how often the policy gives the chosen
answer the higher log-probability (``chosen_preferred``). The model before the stage is at
hand without a copy: with adapters it is the model with them switched off, which also gives
the VQA accuracy before the stage (``vqa_before``); with a precomputed reference, its saved
validation table. DPO's rewards need that reference; SimPO's and ORPO's do not.
"""
from __future__ import annotations

import torch

from fastvlm.data.preference import PairPaddedCollator
from fastvlm.nn.lora import adapters_disabled, lora_layers
from fastvlm.train.losses import loss_params
from fastvlm.train.preference import preference_loss
from fastvlm.train.recipe import Recipe, Stage
from fastvlm.train.reference import needs_precomputed, pair_logprobs, saved_reference
from fastvlm.train.stage_data import RunData, preference_dataset

EVAL_ROWS = 16  # pairs per validation batch


def evaluate_preference(model, stage: Stage, index: int, recipe: Recipe, data: RunData, run_dir, mp,
                        vqa=None) -> dict | None:
    """{"pairs", "reward_accuracy", "reward_margin", "chosen_preferred", "reference_chosen_preferred",
    "vqa_before"} (the last three when the model before the stage is at hand; `vqa`: a
    callable evaluating VQA accuracy, run with the adapters off). None without validation pairs."""
    pairs = data.preference_val[:recipe.data.eval_samples or None]
    if not pairs:
        return None
    device = next(model.parameters()).device
    dataset = preference_dataset(pairs, stage, recipe, data, model)
    pad = data.tokenizer.pad_token_id if data.tokenizer.pad_token_id is not None else 0
    collator = PairPaddedCollator(pad, model.config.attention_kind)
    logp, counts = pair_logprobs(model, dataset, collator, mp, device, EVAL_ROWS)
    ref, before = None, None
    adapters = lora_layers(model)
    if adapters and not any(m.merged for m in adapters.values()):
        with adapters_disabled(model):
            ref = pair_logprobs(model, dataset, collator, mp, device, EVAL_ROWS)[0]
            before = vqa() if vqa is not None else None
    elif needs_precomputed(stage):
        saved = saved_reference(run_dir, index, stage)
        ref = saved["val_logp"][:len(pairs)] if saved and saved.get("val_logp") is not None else None
    keep = ~logp.isnan().any(1)
    out = {"pairs": int(keep.sum()), "chosen_preferred": _preferred(logp[keep])}
    if not out["pairs"]:
        return out
    p = stage.preference
    if p.loss != "dpo" or ref is not None:
        _, metrics = preference_loss(p.loss, logp[keep].flatten(), counts[keep].flatten(),
                                     ref[keep].flatten() if ref is not None else None, **loss_params(p))
        out |= {k: float(metrics[k]) for k in ("reward_accuracy", "reward_margin")}
    if ref is not None:
        out["reference_chosen_preferred"] = _preferred(ref[keep])
    if before is not None:
        out["vqa_before"] = {"overall": before["overall"],
                             "per_type": {t: row["accuracy"] for t, row in before["per_type"].items()}}
    return out


def _preferred(logp: torch.Tensor) -> float:
    return float((logp[:, 0] > logp[:, 1]).double().mean()) if len(logp) else float("nan")


def preference_table(result: dict) -> str:
    """Validation of a preference stage as lines of text: rewards, then VQA accuracy per type
    before and after the stage (before: when the model before it was at hand)."""
    pref = result["preference"]
    lines = [f"validation pairs {pref['pairs']}: chosen answer preferred "
             + (f"{pref['reference_chosen_preferred']:.1%} -> " if "reference_chosen_preferred" in pref else "")
             + f"{pref['chosen_preferred']:.1%}"]
    if "reward_accuracy" in pref:
        lines[0] += f", reward accuracy {pref['reward_accuracy']:.1%}, reward margin {pref['reward_margin']:.4f}"
    before = pref.get("vqa_before")
    lines.append("VQA accuracy " + ("before -> after" if before else "after") + ":")
    for qtype, row in result["per_type"].items():
        was = f"{before['per_type'][qtype]:.1%} -> " if before and qtype in before["per_type"] else ""
        lines.append(f"  {qtype}: {was}{row['accuracy']:.1%}")
    lines.append(f"  overall: {before['overall']:.1%} -> " if before else "  overall: ")
    lines[-1] += f"{result['overall']:.1%}"
    return "\n".join(lines)
