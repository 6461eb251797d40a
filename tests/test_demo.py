"""`fastvlm demo` end to end on a shortened tiny-demo recipe: every stage runs, the table is
printed, the model is exported, and validation accuracy beats chance by a margin that
sampling noise in the evaluated questions cannot explain.

Determinism: the run is seeded by the recipe (run.seed and data.synthetic.seed stay 0, not
the per-test `seed` fixture): the dataset's bytes depend only on its seed, the trainer seeds
initialisation, sampling and dropout from run.seed, and the CPU kernels involved have no
atomics or data races, so on a given machine and thread count the run, and its accuracy,
are the same every time (the README's resume test relies on the same bit-for-bit
reproducibility). Another machine or thread count rounds differently and trains a slightly
different model; the margin below covers what that changes: which of the evaluated
questions it happens to get right.
"""
import json
import math

from fastvlm.train.demo import run_training_demo
from fastvlm.train.recipe import load_recipe

# The shipped recipe, shortened: under a third of the samples and a fifth of the validation
# set; the model, the image geometry, the epochs and every stage type (and its settings) stay
# as shipped.
SHORT = ["data.synthetic.n_train=1200", "data.synthetic.n_val=200", "data.eval_samples=200"]
# Standard errors of a chance-level model's accuracy that the demo must beat chance by: a
# model that ignores the image exceeds it with probability < 4e-5 (normal approximation).
MARGIN_SE = 4.0


def test_short_demo_learns(tmp_path, capsys):
    recipe = load_recipe("tiny-demo", SHORT)
    assert [s.type for s in recipe.stages] == ["contrastive", "lm", "align", "instruct"]
    assert recipe.run.seed == 0 and recipe.data.synthetic.seed == 0
    out = tmp_path / "demo"
    assert run_training_demo(out, SHORT, progress=False) == 0
    printed = capsys.readouterr().out
    for stage in ("vision (contrastive)", "lm (lm)", "align (align)", "instruct (instruct)"):
        assert f"stage {stage}:" in printed
    assert "feature cache" in printed and "validation accuracy" in printed and "| **overall** |" in printed
    assert (out / "plots" / "loss.png").is_file() and (out / "export" / "hf-llava" / "config.json").is_file()
    final = max((out / "eval").glob("instruct-*.json"), key=lambda p: p.stat().st_mtime)
    result = json.loads(final.read_text())
    rows = list(result["per_type"].values())
    n = sum(r["n"] for r in rows)
    assert n == result["n"] >= 200
    # Chance of the whole set: the per-type majority answers' expected hits, and the binomial
    # standard error of that many independent questions at their types' chance levels.
    chance = sum(r["chance"] * r["n"] for r in rows) / n
    se = math.sqrt(sum(r["n"] * r["chance"] * (1 - r["chance"]) for r in rows)) / n
    bound = chance + MARGIN_SE * se
    table = {t: f"{r['accuracy']:.3f} vs {r['chance']:.3f}" for t, r in result["per_type"].items()}
    assert result["overall"] > bound, (f"accuracy {result['overall']:.3f} does not beat chance {chance:.3f} "
                                       f"+ {MARGIN_SE} SE = {bound:.3f}; per type: {table}")
