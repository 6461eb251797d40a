"""The trainer's pieces: what a stage trains, per-group LRs, gradient accumulation, the
feature cache, non-finite losses, run-directory checks."""
import json
import re

import pytest
import torch

from fastvlm.train import trainer
from fastvlm.train.build import GROUP_PATTERNS, build_model, finish_stage, prepare_stage
from fastvlm.train.checkpoint import prepare_run_dir
from fastvlm.train.distributed import Distributed
from fastvlm.train.losses import stage_loss
from fastvlm.train.optim import accumulate, optimizer_step, stage_optimizer
from fastvlm.train.stage_data import StageBatches, open_feature_cache, prepare_data
from fastvlm.train.trainer import TrainingError, train

from .train_recipes import tiny_recipe
from .utils import unit_roundoff

CPU = torch.device("cpu")


def group_of(name: str) -> str:
    return next(g for g, p in GROUP_PATTERNS.items() if re.fullmatch(p, name))


@pytest.fixture(scope="module")
def run_data(tmp_path_factory):
    recipe = tiny_recipe()
    return recipe, prepare_data(recipe, tmp_path_factory.mktemp("run"))


def test_each_stage_trains_exactly_the_groups_it_names(run_data, seed):
    recipe, data = run_data
    model = build_model(recipe, data.tokenizer, seed)
    for stage in recipe.stages:
        mp = prepare_stage(model, stage, recipe, CPU)["precision"]
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert {group_of(n) for n in trainable} == set(stage.lr), stage.name
        before = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer, _ = stage_optimizer(model, stage, 2)
        batches = iter(StageBatches(stage, recipe, data, model, seed))
        for _ in range(2):
            loss, _, stepped = optimizer_step(stage_loss(model, stage, CPU), [next(batches)], optimizer, mp, stage,
                                              "cpu", Distributed())
            assert stepped and loss is not None
        after = model.state_dict()
        for name, value in before.items():
            if name not in trainable:
                assert torch.equal(value, after[name]), f"{stage.name}: frozen {name} changed"
        changed = {group_of(n) for n in trainable if not torch.equal(before[n], after[n])}
        assert changed == set(stage.lr), f"{stage.name}: groups that moved {changed}"
        finish_stage(model, stage)
    assert not hasattr(model, "contrastive_heads")  # dropped after the contrastive stage
    assert getattr(model.language_model, "lora_config", None) is None  # LoRA merged after instruct


def test_per_group_learning_rates_reach_the_optimizer(run_data, seed):
    recipe, data = run_data
    recipe = tiny_recipe(["stages.instruct.lr.vision=3e-5", "stages.instruct.lr.llm=2e-4",
                          "stages.instruct.lr.connector=4e-3", "stages.instruct.lora.vision_blocks=1",
                          "stages.instruct.weight_decay=0.1"])
    stage = recipe.stages[3]
    model = build_model(recipe, data.tokenizer, seed)
    prepare_stage(model, stage, recipe, CPU)
    optimizer, scheduler = stage_optimizer(model, stage, 10)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in optimizer.param_groups:
        base = group["name"].removesuffix("_no_decay")
        assert group["initial_lr"] == stage.lr[base]
        assert group["lr"] == pytest.approx(stage.lr[base] * scheduler.lr_lambdas[0](0))
        for p in group["params"]:
            assert group_of(names[id(p)]) == base
            assert (group["weight_decay"] == 0.0) == (p.ndim < 2)  # norms and biases never decay
            seen.add(names[id(p)])
    assert seen == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {g["name"].removesuffix("_no_decay") for g in optimizer.param_groups} == {"vision", "llm", "connector"}


def _concat(batches):
    """The micro-batches as one batch of all their rows."""
    out = dict(batches[0])
    for key in ("input_ids", "labels", "segment_ids", "images"):
        out[key] = torch.cat([b[key] for b in batches])
    for key in ("supervised_tokens", "real_tokens", "num_samples"):
        out[key] = sum(b[key] for b in batches)
    return out


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def test_grad_accumulation_equals_one_k_times_batch(run_data, seed):
    """k micro-batches (weighted by their targets) give the gradient of their concatenation.
    Both are sums of the same terms in another order: the fp64 difference is bounded by the
    fp32 run's error scaled by the roundoff ratio (rounding error is linear in it)."""
    recipe, data = run_data
    stage = recipe.stages[3]
    model = build_model(recipe, data.tokenizer, seed)
    for done in recipe.stages[:3]:
        prepare_stage(model, done, recipe, CPU)
        finish_stage(model, done)
    mp = prepare_stage(model, stage, recipe, CPU)["precision"]
    model.vision_tower.frozen_dtype = None  # run the tower in the test's dtype too
    stream = iter(StageBatches(stage, recipe, data, model, seed))
    micro = [next(stream) for _ in range(3)]
    grads = {}
    for dtype in (torch.float64, torch.float32):
        model.to(dtype)
        for how, batches in (("accumulated", micro), ("one batch", [_concat(micro)])):
            model.zero_grad(set_to_none=True)
            assert accumulate(stage_loss(model, stage, CPU), batches, mp, "cpu", Distributed()) is not None
            grads[how, dtype] = _grads(model).double()
    ref = grads["one batch", torch.float64]
    err64 = float((grads["accumulated", torch.float64] - ref).norm())
    err32 = float((grads["accumulated", torch.float32] - ref).norm())
    ratio = unit_roundoff(torch.float64) / unit_roundoff(torch.float32)
    bound = 4 * err32 * ratio + 16 * unit_roundoff(torch.float64) * float(ref.norm())
    assert err64 <= bound, f"accumulated vs one batch: {err64:.3e} > {bound:.3e}"
    if len({b["supervised_tokens"] for b in micro}) == 1:
        return  # equal shares: a plain mean of the micro-batch means would be right too
    # with unequal shares, a plain mean of micro-batch means (the classic mistake) is far outside it
    model.to(torch.float64).zero_grad(set_to_none=True)
    for b in micro:
        (stage_loss(model, stage, CPU)(b)[0] / len(micro)).backward()
    assert float((_grads(model).double() - ref).norm()) > 100 * bound


def test_feature_cache_gives_the_towers_features(run_data, seed, tmp_path):
    recipe, data = run_data
    model = build_model(recipe, data.tokenizer, seed)
    stage = recipe.stages[2]
    prepare_stage(model, stage, recipe, CPU)
    cache = open_feature_cache(model, tmp_path, Distributed())
    batch = next(iter(StageBatches(stage, recipe, data, model, seed)))
    assert batch["image_keys"] and len(batch["image_keys"]) == len(batch["images"])
    direct = stage_loss(model, stage, CPU)(batch)[0]
    miss = stage_loss(model, stage, CPU, cache)(batch)[0]
    hit = stage_loss(model, stage, CPU, cache)(batch)[0]
    assert cache.misses > 0 and cache.hits == cache.misses
    assert torch.equal(direct, miss) and torch.equal(miss, hit)


def test_non_finite_losses_stop_the_run_naming_stage_and_step(tmp_path, monkeypatch):
    recipe = tiny_recipe(["stages.vision.max_bad_steps=2"])
    calls = []

    class NanLoss(torch.nn.Module):
        def __init__(self, stage):
            super().__init__()
            self.stage = stage

        def forward(self, batch):
            calls.append(self.stage.name)
            return torch.tensor(float("nan"), requires_grad=True), {}

    monkeypatch.setattr(trainer, "stage_loss", lambda model, stage, device, cache=None, reference=None: NanLoss(stage))
    with pytest.raises(TrainingError, match=r"stage 'vision', step 2: non-finite loss in 2 steps in a row; "
                                            r"likely cause: the learning rate"):
        train(recipe, tmp_path / "run", progress=False, echo=lambda *_: None)
    assert calls == ["vision", "vision"]


def test_run_dir_of_another_recipe_is_refused(tmp_path):
    prepare_run_dir(tiny_recipe(), tmp_path, resume=False)
    (tmp_path / "final").mkdir()  # it trained
    with pytest.raises(ValueError, match="holds a run of another recipe"):
        prepare_run_dir(tiny_recipe(["stages.lm.lr.llm=5e-4"]), tmp_path, resume=True)


def test_run_dir_of_a_start_that_trained_nothing_is_accepted(tmp_path):
    prepare_run_dir(tiny_recipe(), tmp_path, resume=False)
    other = tiny_recipe(["stages.lm.lr.llm=5e-4"])
    prepare_run_dir(other, tmp_path, resume=False)  # no checkpoint, no final model: nothing to protect
    assert json.loads((tmp_path / "recipe.json").read_text())["digest"] == other.digest()
