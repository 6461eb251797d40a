"""`fastvlm demo` / `make demo`: the tiny-demo recipe trained from scratch on synthetic VQA.

Runs every stage type through the real trainer (contrastive vision pretraining,
LM pretraining, align with a frozen bf16 tower and the feature cache, instruct
with the tiny LLM fully fine-tuned and LoRA on the vision tower; packed rows,
selective checkpointing, bf16 autocast where the CPU has it), then prints
validation accuracy per question type next to its chance level and where the
plots and the exported model are.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from fastvlm.train.evaluation import format_table
from fastvlm.train.export import export
from fastvlm.train.recipe import load_recipe
from fastvlm.train.trainer import train

DEMO_RECIPE = "tiny-demo"


def fresh_run_dir(out: Path) -> None:
    """Empty a previous demo run, keeping its generated dataset (same recipe, same bytes)."""
    if not out.is_dir():
        return
    for child in out.iterdir():
        if child.name != "data":
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def run_training_demo(out=None, overrides=(), progress: bool = True) -> int:
    t0, cpu0 = time.perf_counter(), time.process_time()
    recipe = load_recipe(DEMO_RECIPE, overrides)
    out = Path(out or Path("runs") / DEMO_RECIPE)
    fresh_run_dir(out)
    print(f"fastvlm demo: recipe {recipe.name} ({len(recipe.stages)} stages) -> {out}")
    result = train(recipe, out, progress=progress)
    final_eval = next(s["eval"] for s in reversed(result["stages"]) if s.get("eval"))
    print("\nvalidation accuracy (greedy generation, exact match after normalisation):")
    print(format_table(final_eval))
    exported = out / "export" / "hf-llava"
    export(out, exported, format="hf-llava")
    print(f"plots: {result['plots']}\nmodel: {result['final']} (fastvlm), {exported} (Hugging Face LLaVA)\n"
          f"metrics: {out / 'metrics.jsonl'}; wall time {time.perf_counter() - t0:.0f}s "
          f"(CPU time {time.process_time() - cpu0:.0f}s)")
    return 0
