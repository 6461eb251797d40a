"""Recipes: shipped ones load by name, every key is checked (name, type, combination), --set overrides."""
import pytest
import tomllib

from fastvlm.train.recipe import Recipe, apply_override, load_recipe, parse_recipe, shipped_recipes, to_toml


def minimal(**stage):
    return {"name": "t", "stages": [{"name": "a", "type": "align", "lr": {"connector": 1e-3}, **stage}]}


def test_shipped_demo_by_name_and_by_path(tmp_path):
    assert "tiny-demo" in shipped_recipes()
    recipe = load_recipe("tiny-demo")
    assert [s.type for s in recipe.stages] == ["contrastive", "lm", "align", "instruct"]
    path = tmp_path / "copy.toml"
    path.write_text(to_toml(recipe))
    assert load_recipe(str(path)) == recipe


def test_resolved_toml_round_trips():
    recipe = load_recipe("tiny-demo", ["stages.instruct.checkpointing.vision=full"])
    again = parse_recipe(tomllib.loads(to_toml(recipe)))
    assert again == recipe and again.digest() == recipe.digest()


@pytest.mark.parametrize("raw, key", [
    ({"nmae": "x"}, "nmae"),
    ({"model": {"conector": "mlp"}}, "conector"),
    ({"model": {"tiny": {"hiden": 3}}}, "hiden"),
    ({"stages": [{"name": "a", "type": "align", "lr": {"connector": 1.0}, "epoch": 2}]}, "epoch"),
    ({"stages": [{"name": "a", "type": "align", "lr": {"connector": 1.0}, "lora": {"rank": 2}}]}, "rank"),
])
def test_unknown_keys_are_named(raw, key):
    base = minimal()
    base.update({k: v for k, v in raw.items() if k != "stages"})
    base["stages"] = raw.get("stages", base["stages"])
    with pytest.raises(ValueError, match=key):
        parse_recipe(base)


@pytest.mark.parametrize("stage, key", [
    ({"epochs": "two"}, r"stages\[0\]\.epochs: expected float"),
    ({"batch_size": 2.5}, r"stages\[0\]\.batch_size: expected int"),
    ({"packing": 1}, r"stages\[0\]\.packing: expected bool"),
    ({"lr": {"connector": "high"}}, r"stages\[0\]\.lr\.connector: expected float"),
    ({"betas": 0.9}, r"stages\[0\]\.betas: expected a list"),
])
def test_wrong_types_are_named(stage, key):
    with pytest.raises(ValueError, match=key):
        parse_recipe(minimal(**stage))


@pytest.mark.parametrize("change, key", [
    ({"lr": {}}, r"lr: the stage trains nothing"),
    ({"lr": {"llm": 1e-4}}, r"lr\.llm: a align stage trains only connector"),
    ({"type": "finetune"}, r"type: expected one of"),
    ({"epochs": 0.0}, r"epochs / max_steps"),
    ({"schedule": "linear"}, r"schedule"),
    ({"optimizer": "sgd"}, r"optimizer"),
    ({"precision": "fp8"}, r"precision"),
    ({"checkpointing": {"vision": "sometimes"}}, r"checkpointing\.vision"),
    ({"checkpointing": {"decoder": "full"}}, r"checkpointing key"),
    ({"warmup_ratio": 1.5}, r"warmup_ratio"),
    ({"attention_kind": "sliding"}, r"attention_kind"),
    ({"type": "instruct", "lr": {"vision": 1e-5}}, r"lr\.vision: set lora\.vision_blocks"),
    ({"type": "instruct", "lr": {"connector": 1e-5}, "finetune": "adapter"}, r"finetune"),
])
def test_impossible_stages_are_named(change, key):
    with pytest.raises(ValueError, match=key):
        parse_recipe(minimal(**change))


def test_impossible_model_and_run_settings():
    with pytest.raises(ValueError, match="model.select_layers: several layers need model.connector"):
        parse_recipe({**minimal(), "model": {"select_layers": [-2, -5]}})
    with pytest.raises(ValueError, match="model.path"):
        parse_recipe({**minimal(), "model": {"source": "pretrained"}})
    with pytest.raises(ValueError, match="names two stages"):
        parse_recipe({"stages": minimal()["stages"] * 2})
    with pytest.raises(ValueError, match="recipe.stages"):
        parse_recipe({"name": "empty"})
    with pytest.raises(ValueError, match="neither a shipped recipe"):
        load_recipe("no-such-recipe")


def test_overrides_reach_every_level():
    recipe = load_recipe("tiny-demo", ["stages.instruct.lr.llm=5e-4", "model.tiny.llm_layers=3",
                                       "stages.1.max_steps=7", "run.seed=11", "data.template=plain",
                                       "stages.align.betas=[0.8, 0.95]"])
    assert recipe.stages[3].lr["llm"] == 5e-4 and recipe.model.tiny.llm_layers == 3
    assert recipe.stages[1].max_steps == 7 and recipe.run.seed == 11 and recipe.data.template == "plain"
    assert recipe.stages[2].betas == [0.8, 0.95]
    with pytest.raises(ValueError, match="no stage 'nope'"):
        load_recipe("tiny-demo", ["stages.nope.epochs=1"])
    with pytest.raises(ValueError, match="section.key=value"):
        apply_override({}, "model.connector")
    with pytest.raises(ValueError, match="model.tiny.llm_layers: expected int"):
        load_recipe("tiny-demo", ["model.tiny.llm_layers=many"])


def test_digest_follows_training_settings_only():
    base = load_recipe("tiny-demo")
    assert load_recipe("tiny-demo", ["run.keep_checkpoints=5"]).digest() == base.digest()
    assert load_recipe("tiny-demo", ["stages.lm.lr.llm=1e-4"]).digest() != base.digest()
    assert isinstance(base, Recipe)


@pytest.mark.parametrize("name", ["llava-1.5-7b-stage1", "llava-1.5-7b-stage2-lora", "llava-1.5-7b-stage2-qlora"])
def test_llava_recipes_carry_the_published_hyperparameters(name):
    recipe = load_recipe(name)
    (s,) = recipe.stages
    assert (recipe.model.select_layer, recipe.model.connector, recipe.data.max_length, s.epochs) == (-2, "mlp", 2048, 1)
    assert (s.warmup_ratio, s.schedule, s.precision, s.weight_decay) == (0.03, "cosine", "bf16", 0.0)
    if name.endswith("stage1"):
        assert s.type == "align" and s.lr == {"connector": 1e-3} and s.batch_size * s.grad_accum == 256
    else:
        assert s.type == "instruct" and s.lr == {"connector": 2e-5, "llm": 2e-4}
        assert s.batch_size * s.grad_accum == 128 and (s.lora.r, s.lora.alpha) == (128, 256.0)
        assert s.finetune == ("qlora" if name.endswith("qlora") else "lora")
