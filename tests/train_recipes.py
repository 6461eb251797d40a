"""A very small recipe (every stage type, tiny model, a few dozen synthetic samples) that
the trainer, resume and demo tests run in seconds."""
from fastvlm.train.recipe import parse_recipe, to_toml

TINY_MODEL = {"image_size": 24, "patch_size": 8, "vision_hidden": 32, "vision_layers": 1, "vision_heads": 2,
              "llm_hidden": 32, "llm_layers": 1, "llm_heads": 2, "llm_intermediate": 64, "vocab_size": 300}


def tiny_raw(steps: int = 3, checkpoint_every: int = 0, precision: str = "fp32") -> dict:
    common = {"max_steps": steps, "batch_size": 2, "packing_budget": 96, "precision": precision,
              "checkpoint_every": checkpoint_every, "warmup_ratio": 0.3}
    return {
        "name": "tiny-test",
        "model": {"source": "tiny", "select_layer": -1, "tiny": TINY_MODEL},
        "data": {"template": "literal", "eval_samples": 6,
                 "synthetic": {"n_train": 24, "n_val": 6, "image_size": 24, "seed": 0}},
        "run": {"keep_checkpoints": 50, "eval_max_new_tokens": 3},
        "stages": [
            {"name": "vision", "type": "contrastive", "lr": {"vision": 1e-3, "heads": 1e-3}, **common,
             "batch_size": 6, "contrastive": {"chunk": 4, "embed_dim": 16}},
            {"name": "lm", "type": "lm", "lr": {"llm": 1e-3}, **common},
            {"name": "align", "type": "align", "lr": {"connector": 1e-3}, **common},
            {"name": "instruct", "type": "instruct", "lr": {"connector": 1e-3, "llm": 1e-3}, **common,
             "lora": {"r": 4, "alpha": 8}, "checkpointing": {"llm": "selective"}},
        ],
    }


def tiny_recipe(overrides=(), **kw):
    return parse_recipe(tiny_raw(**kw), overrides)


def write_tiny_recipe(path, overrides=(), **kw):
    path.write_text(to_toml(tiny_recipe(overrides, **kw)))
    return path


def preference_raw(steps: int = 3, checkpoint_every: int = 0, reference: str = "adapters_off",
                   loss: str = "dpo") -> dict:
    """The tiny recipe with one preference stage (LoRA, or full FT with a precomputed reference):
    its pairs fit a row of 192 tokens."""
    raw = tiny_raw(steps, checkpoint_every)
    stage = {**{k: raw["stages"][3][k] for k in ("max_steps", "batch_size", "precision", "checkpoint_every",
                                                   "warmup_ratio")},
             "name": "prefer", "type": "preference", "packing_budget": 192,
             "preference": {"loss": loss, "beta": 0.1, "reference": reference}}
    if reference == "precomputed":
        stage.update(finetune="full", lr={"connector": 1e-3, "llm": 1e-3})
    else:
        stage.update(lr={"llm": 1e-2}, lora={"r": 4, "alpha": 8})
    raw["stages"] = [stage]
    return raw
