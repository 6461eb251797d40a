"""`fastvlm demo` end to end on a shortened tiny-demo recipe: every stage runs, the table is
printed, the model is exported, and validation accuracy beats chance."""
import json

from fastvlm.train.demo import run_training_demo

# The shipped recipe, shortened: fewer samples, fewer steps, a smaller model.
SHORT = ["data.synthetic.n_train=400", "data.synthetic.n_val=60", "data.eval_samples=60",
         "stages.vision.epochs=1", "stages.vision.batch_size=32", "stages.lm.epochs=1", "stages.align.max_steps=6",
         "stages.instruct.epochs=3"]


def test_short_demo_learns(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_training_demo(out, SHORT, progress=False) == 0
    printed = capsys.readouterr().out
    for stage in ("vision (contrastive)", "lm (lm)", "align (align)", "instruct (instruct)"):
        assert f"stage {stage}:" in printed
    assert "validation accuracy" in printed and "overall" in printed
    assert (out / "plots" / "loss.png").is_file() and (out / "export" / "hf-llava" / "config.json").is_file()
    final = max((out / "eval").glob("instruct-*.json"), key=lambda p: p.stat().st_mtime)
    result = json.loads(final.read_text())
    rows = result["per_type"].values()
    chance = sum(r["chance"] * r["n"] for r in rows) / sum(r["n"] for r in rows)
    assert result["overall"] > chance, f"accuracy {result['overall']:.3f} does not beat chance {chance:.3f}"
