"""The preference stage type through the trainer: DPO's loss is ln 2 while the policy is the
reference; the reference from the adapters switched off is the model without them; the
stage's gradient is that of each answer run alone; recipe combinations that cannot work are
named; a precomputed reference survives SIGKILL and resume."""
import copy
import json
import math
import random
import re
import signal

import pytest
import torch

from fastvlm.data.images import load_image_and_key
from fastvlm.nn.lora import adapters_disabled, lora_layers
from fastvlm.train.build import build_model, prepare_stage
from fastvlm.train.dryrun import dry_run
from fastvlm.train.losses import PreferenceLoss, preference_inputs
from fastvlm.train.recipe import load_recipe, parse_recipe, to_toml
from fastvlm.train.stage_data import StageBatches, prepare_data
from fastvlm.train.trainer import train

from . import dist_launch
from .test_resume import _finish, _losses, _run_until
from .train_recipes import preference_raw
from .utils import assert_close, unit_roundoff

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A 3-step DPO stage (LoRA, adapters off) from the tiny model, evaluated at its end."""
    recipe = parse_recipe(preference_raw())
    out = tmp_path_factory.mktemp("dpo")
    result = train(recipe, out, progress=False, echo=lambda *a: None)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return recipe, out, result, records


def _ln2_bound(record: dict) -> float:
    """|loss - ln 2| at policy = reference: each of the four summed log-probs (magnitude
    |logp|, a sum over at most 192 tokens of fp32 terms) is rounded apart in the two runs, the
    margin is beta times their difference, and d loss / d margin = 1/2 there."""
    logp = abs(record["chosen_logp"]) + abs(record["rejected_logp"])
    return 0.5 * 0.1 * 2 * logp * 192 * unit_roundoff(torch.float32) + 4 * unit_roundoff(torch.float32)


def test_dpo_loss_is_ln2_at_the_first_step(lora_run):
    _, _, _, records = lora_run
    first = next(r for r in records if r["event"] == "step")
    assert abs(first["loss"] - math.log(2)) <= _ln2_bound(first), first
    assert abs(first["reward_margin"]) <= _ln2_bound(first) * 4, first
    later = [r for r in records if r["event"] == "step"][1:]
    assert any(r["loss"] != first["loss"] for r in later)  # then the policy moves away
    for key in ("reward_accuracy", "chosen_logp", "rejected_logp", "chosen_reward", "rejected_reward"):
        assert all(math.isfinite(r[key]) for r in records if r["event"] == "step"), key


def test_the_stage_evaluates_rewards_and_vqa_before_and_after(lora_run):
    _, out, result, records = lora_run
    evaluation = result["stages"][0]["eval"]
    pref = evaluation["preference"]
    assert pref["pairs"] == 6 and 0 <= pref["reward_accuracy"] <= 1
    assert set(pref["vqa_before"]["per_type"]) == set(evaluation["per_type"])
    assert [r for r in records if r["event"] == "eval"][-1]["val_pairs"] == 6


@pytest.fixture(scope="module")
def stage_batch(tmp_path_factory):
    recipe = parse_recipe(preference_raw())
    data = prepare_data(recipe, tmp_path_factory.mktemp("data"))
    stage = recipe.stages[0]
    model = build_model(recipe, data.tokenizer, 0)
    frozen = copy.deepcopy(model)
    prepare_stage(model, stage, recipe, CPU)
    batches = StageBatches(stage, recipe, data, model, 0, num_workers=0)
    return model, frozen, next(iter(batches)), stage, batches


def _randomize_adapters(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen, dtype=m.lora_B.dtype) * 0.3)


def test_adapters_off_equals_a_frozen_copy(stage_batch, seed):
    model, frozen, batch, _, _ = stage_batch
    _randomize_adapters(model, seed)
    with torch.no_grad():
        with adapters_disabled(model):
            off, off_counts = model.answer_logprobs(**preference_inputs(model, batch, CPU))
        on, _ = model.answer_logprobs(**preference_inputs(model, batch, CPU))
        copy_logp, copy_counts = frozen.answer_logprobs(**preference_inputs(frozen, batch, CPU))
    assert torch.equal(off, copy_logp) and torch.equal(off_counts, copy_counts)
    assert not torch.equal(on, off)  # the adapters were on again after the block
    assert off.numel() == 2 * batch["num_samples"] and bool((off_counts > 0).all())


def test_adapters_off_refuses_merged_adapters(stage_batch):
    model = copy.deepcopy(stage_batch[0])
    next(iter(lora_layers(model).values())).merge()
    with pytest.raises(ValueError, match="merged into its base weight"):
        with adapters_disabled(model):
            pass


def _alone_logp(model, batch, pair_items):
    """Each answer of each pair run as its own sequence [prompt | answer] through forward's
    logits: its tokens' log-probs summed."""
    out = []
    for item in pair_items:
        for branch in (1, 2):
            keep = (item["branch_ids"] == 0) | (item["branch_ids"] == branch)
            ids, labels = item["input_ids"][keep][None], item["labels"][keep][None]
            images = item["pixel_values"]
            logits = model(ids, images.to(next(model.parameters()).dtype) if images is not None else None)
            logp = logits[0, :-1].log_softmax(-1)
            target = labels[0, 1:]
            mask = target != -100
            out.append(logp[mask].gather(1, target[mask][:, None]).sum())
    return torch.stack(out)


def test_dpo_gradient_equals_each_answer_alone(stage_batch, seed):
    """The trainer's DPO loss (one shared-prompt forward, fused log-prob, adapters-off
    reference) and its LoRA gradients vs the paper's formula on each answer run alone, in
    float64; bounded by the same computation's float32 error (RMSNorm computes in fp32)."""
    model, _, batch, stage, batches = stage_batch
    model = copy.deepcopy(model)
    _randomize_adapters(model, seed)
    items = [batches.dataset[i] for i in batch["item_indices"]]

    def run(dtype, alone):
        m = copy.deepcopy(model).to(dtype)
        m.train()
        m.zero_grad()
        if alone:
            logp = _alone_logp(m, batch, items)
            with torch.no_grad(), adapters_disabled(m):
                ref = _alone_logp(m, batch, items)
            margin = 0.1 * ((logp[0::2] - ref[0::2]) - (logp[1::2] - ref[1::2]))
            loss = -torch.nn.functional.logsigmoid(margin).mean()
        else:
            b = {**batch, "images": batch["images"].to(dtype) if batch["images"] is not None else None}
            loss, _ = PreferenceLoss(m, CPU, stage.preference)(b)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    got_loss, got = run(torch.float64, alone=False)
    ref_loss, ref = run(torch.float64, alone=True)
    base_loss, base = run(torch.float32, alone=True)
    assert set(got) == set(ref) and ref
    assert_close(got_loss, ref_loss, base_loss, torch.float32, scale=float(ref_loss), name="loss")
    for name in ref:
        assert_close(got[name], ref[name], base[name], torch.float32, name=name)


@pytest.mark.parametrize("change, message", [
    ({"finetune": "full", "lr": {"llm": 1e-3}}, "finetune = 'full' has no adapters to switch off"),
    ({"lr": {"llm": 1e-3, "connector": 1e-3}}, "lr.connector: reference = 'adapters_off' needs every trained"),
    ({"preference": {"loss": "ipo"}}, "preference.loss: expected one of dpo, simpo, orpo"),
    ({"preference": {"reference": "copy"}}, "preference.reference: expected one of adapters_off, precomputed"),
    ({"preference": {"label_smoothing": 0.5}}, "preference.label_smoothing: expected a number in"),
])
def test_bad_preference_recipes_are_named(change, message):
    raw = preference_raw()
    raw["stages"][0].update(change)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_recipe(raw)
    raw = preference_raw()
    raw["data"] = {"kind": "llava", "train": "t.json", "val": "v.json"}
    with pytest.raises(ValueError, match="data.preference: stage 'prefer' is a preference stage"):
        parse_recipe(raw)


def test_simpo_and_orpo_need_no_reference():
    for loss in ("simpo", "orpo"):
        raw = preference_raw(loss=loss)
        raw["stages"][0].update(finetune="full", lr={"llm": 1e-3, "connector": 1e-3})
        assert parse_recipe(raw).stages[0].preference.loss == loss


# ---- precomputed reference: SIGKILL and resume ---------------------------------------------
INSTRUCT_STEPS, PREFER_STEPS = 2, 3


@pytest.fixture(scope="module")
def precomputed_recipe(tmp_path_factory):
    """An instruct stage that trains the LLM, then a full-FT DPO stage with a precomputed
    reference: resumed inside it, the model as the stage started is gone (replaying the
    stages rebuilds the starting model), so only the saved reference gives the same losses."""
    raw = preference_raw(PREFER_STEPS, checkpoint_every=1, reference="precomputed")
    instruct = {**raw["stages"][0], "name": "instruct", "type": "instruct", "max_steps": INSTRUCT_STEPS,
                "packing_budget": 96}
    del instruct["preference"]
    raw["stages"].insert(0, instruct)
    raw["run"].update(evaluate=False, keep_checkpoints=2)
    path = tmp_path_factory.mktemp("recipe") / "precomputed.toml"
    path.write_text(to_toml(parse_recipe(raw)))
    return path


def test_precomputed_reference_resumes_after_sigkill(precomputed_recipe, tmp_path_factory, seed):
    full = tmp_path_factory.mktemp("through")
    _finish(precomputed_recipe, full)
    reference = _losses(full)
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r["event"] == "step" and r["stage_index"] == 1)
    assert abs(first["loss"] - math.log(2)) <= _ln2_bound(first), first  # policy = reference at first
    out = tmp_path_factory.mktemp("killed")
    proc = _run_until(precomputed_recipe, out, random.Random(seed).randint(INSTRUCT_STEPS + 1,
                                                                           INSTRUCT_STEPS + PREFER_STEPS - 1))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    saved = out / "reference" / "stage1-prefer.pt"
    written = saved.stat().st_mtime_ns
    _finish(precomputed_recipe, out, "--resume")
    assert saved.stat().st_mtime_ns == written  # read, not made again from the rebuilt model
    assert _losses(out) == reference


def test_pairs_carry_their_images_feature_cache_keys(stage_batch):
    _, _, batch, _, batches = stage_batch
    item = batches.dataset[0]
    preprocessor = batches.dataset.preprocessor
    assert item["image_keys"] == [load_image_and_key(p, preprocessor)[1] for p in item["image_files"]]
    assert len(batch["image_keys"]) == len(batch["images"]) > 0


def test_dry_run_plans_a_preference_stage():
    text = dry_run(parse_recipe(preference_raw()))
    assert "[1] prefer (preference): 3 optimizer steps" in text and "llm_adapters" not in text
    assert re.search(r"llm +[\d,]+ total +[\d,]+ trainable +lr 0.01", text)


def test_shipped_recipe_continues_from_a_final_model(lora_run, tmp_path):
    """tiny-demo-preference on a run's final directory (here the tiny DPO run's, in place of
    the demo's), shrunk to one step: it trains and prints rewards and VQA before and after."""
    final = lora_run[2]["final"]
    recipe = load_recipe("tiny-demo-preference", [
        f"model.path={final}", f"model.tokenizer={final / 'tokenizer'}", "data.eval_samples=4",
        "data.synthetic.n_train=24", "data.synthetic.n_val=4", "data.synthetic.image_size=24",
        "stages.dpo.max_steps=1", "stages.dpo.packing_budget=192", "stages.dpo.precision=fp32",
        "run.eval_max_new_tokens=3"])
    lines = []
    train(recipe, tmp_path / "run", progress=False, echo=lines.append)
    text = "\n".join(lines)
    assert "stage dpo (preference): 1 steps" in text
    assert re.search(r"validation pairs 4: chosen answer preferred [\d.]+% -> [\d.]+%, reward accuracy", text)
    assert re.search(r"VQA accuracy before -> after:\n(  \w+: [\d.]+% -> [\d.]+%\n)+  overall: ", text)


# ---- two DDP ranks ------------------------------------------------------------------------
def _ddp_recipe(path, batch_size: int, grad_accum: int):
    raw = preference_raw(steps=2)
    raw["run"].update(evaluate=False, distributed="ddp")
    raw["stages"][0].update(batch_size=batch_size, grad_accum=grad_accum)
    path.write_text(to_toml(parse_recipe(raw)))
    return path


def test_two_ddp_ranks_match_one_process(tmp_path):
    """A DPO step of 2 rows (one micro-batch of one row per rank, the reference from the
    adapters off on each rank) gives one process's losses; bounded as in test_distributed by
    two one-process runs of the same global batch split differently (2 x 1 row vs 1 x 2 rows)
    plus a few fp32 roundings of the loss per step."""
    split, whole = _ddp_recipe(tmp_path / "split.toml", 1, 2), _ddp_recipe(tmp_path / "whole.toml", 2, 1)
    dist_launch.run(split, tmp_path / "one", 1)
    dist_launch.run(whole, tmp_path / "whole", 1)
    dist_launch.run(split, tmp_path / "two", 2)
    a, b, found = (dist_launch.losses(tmp_path / d) for d in ("one", "whole", "two"))
    assert set(found) == set(a) == set(b) and len(a) == 2
    orderings = max(abs(a[k] - b[k]) for k in a)
    eps = torch.finfo(torch.float32).eps
    for i, k in enumerate(sorted(a)):
        assert abs(found[k] - a[k]) <= 4 * orderings + 8 * (i + 1) * eps * abs(a[k]), (k, found[k], a[k])
