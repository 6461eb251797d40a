"""`fastvlm demo` / `make demo`: the tiny-demo recipe trained from scratch on synthetic VQA.

Runs every stage type through the real trainer (contrastive vision pretraining,
LM pretraining, align with a frozen bf16 tower and the feature cache, instruct
with LoRA; packed rows, selective checkpointing, bf16 autocast where the CPU has
it), then prints validation accuracy per question type next to its chance level
and where the plots and the exported model are.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

DEMO_RECIPE = "tiny-demo"


def fresh_run_dir(out: Path) -> None:
    """Empty a previous demo run, keeping its generated dataset (same recipe, same bytes)."""
    if not out.is_dir():
        return
    for child in out.iterdir():
        if child.name != "data":
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def accuracy_table(result: dict) -> str:
    lines = [f"{'question type':14s} {'n':>5s} {'accuracy':>9s} {'chance':>7s} {'x chance':>9s}"]
    for qtype, row in sorted(result["per_type"].items()):
        chance = row.get("chance")
        ratio = f"{row['accuracy'] / chance:8.2f}x" if chance else "        -"
        lines.append(f"{qtype:14s} {row['n']:5d} {row['accuracy']:9.1%} "
                     f"{chance if chance is None else format(chance, '7.1%'):>7s} {ratio}")
    lines.append(f"{'overall':14s} {result['n']:5d} {result['overall']:9.1%}")
    return "\n".join(lines)


def run_training_demo(out=None, overrides=(), progress: bool = True) -> int:
    from fastvlm.train.recipe import load_recipe
    from fastvlm.train.trainer import train

    t0 = time.perf_counter()
    recipe = load_recipe(DEMO_RECIPE, overrides)
    out = Path(out or Path("runs") / DEMO_RECIPE)
    fresh_run_dir(out)
    print(f"fastvlm demo: recipe {recipe.name} ({len(recipe.stages)} stages) -> {out}")
    result = train(recipe, out, progress=progress)
    final_eval = next(s["eval"] for s in reversed(result["stages"]) if s.get("eval"))
    print("\nvalidation accuracy (greedy generation, exact match after normalisation):")
    print(accuracy_table(final_eval))
    print(f"validation loss {final_eval.get('val_loss', float('nan')):.4f}")
    from fastvlm.train.export import export

    exported = out / "export" / "hf-llava"
    export(out, exported, format="hf-llava")
    print(f"plots: {result['plots']}\nmodel: {result['final']} (fastvlm), {exported} (Hugging Face LLaVA)\n"
          f"metrics: {out / 'metrics.jsonl'}; wall time {time.perf_counter() - t0:.0f}s")
    return 0
