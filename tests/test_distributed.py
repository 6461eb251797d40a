"""torchrun DDP / FSDP2 training on CPU (gloo, 2 processes): the same losses as one process
on the same global batch, gradient accumulation without synchronising, resume across world
sizes after a SIGKILL (of every rank), frozen weights identical on every rank, rank 0 alone
writing; on mixed data (text-only, one- and two-image samples) too, where the ranks'
micro-batches differ in whether they hold an image.

Bounds: a 2-rank run adds the ranks' fp32 gradients in another order than one process
does; so do two one-process runs of one global batch split differently (2 micro-batches
of 2 rows vs 1 of 4). Their measured difference, with a floor of a few fp32 roundings of
the loss per step taken, bounds the 2-rank difference."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastvlm.data import Sample, synthetic_vqa
from fastvlm.models.vlm import VLM
from fastvlm.nn.lora import LoRALinear
from fastvlm.train import checkpoint as ckpt
from fastvlm.train.build import build_model
from fastvlm.train.distributed import Distributed
from fastvlm.train.dryrun import dry_run, per_process
from fastvlm.train.export import load_for_inference
from fastvlm.train.quant import merge_quantized
from fastvlm.train.recipe import load_recipe, parse_recipe, to_toml
from fastvlm.train.stage_data import RunData, StageBatches, prepare_data, stage_samples

from .dist_launch import losses, rank_reports, run, run_until_checkpoints
from .train_recipes import tiny_raw

STEPS = 3
EPS32 = torch.finfo(torch.float32).eps


def recipe_raw(mode: str, batch_size: int = 2, grad_accum: int = 2, first: str = "align") -> dict:
    """align (frozen encoder, its feature cache) then instruct with LoRA: global batch 4 rows."""
    raw = tiny_raw(steps=STEPS, checkpoint_every=1)
    raw["run"].update(evaluate=False, distributed=mode)
    raw["stages"] = [s for s in raw["stages"] if s["type"] in (first, "instruct")]
    for s in raw["stages"]:
        s.update(batch_size=batch_size, grad_accum=grad_accum)
    return raw


def write(path, mode: str, **kw):
    path.write_text(to_toml(parse_recipe(recipe_raw(mode, **kw))))
    return path


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipes")
    return {"ddp": write(d / "ddp.toml", "ddp"), "fsdp": write(d / "fsdp.toml", "fsdp"),
            "single": write(d / "single.toml", "ddp", batch_size=4, grad_accum=1),
            "accum": write(d / "accum.toml", "ddp", batch_size=1, grad_accum=4)}


@pytest.fixture(scope="module")
def reference(recipes, tmp_path_factory):
    """One process: the 2 x 2-row run (resume reference), the 1 x 4-row run, and the bound."""
    runs = {}
    for name in ("ddp", "single"):
        out = tmp_path_factory.mktemp(f"ref-{name}")
        run(recipes[name], out, 1)
        runs[name] = losses(out)
    a, b = runs["ddp"], runs["single"]
    assert len(a) == 2 * STEPS and set(a) == set(b) and all(math.isfinite(v) for v in a.values())
    orderings = max(abs(a[k] - b[k]) for k in a)
    bound = {k: 4 * orderings + 8 * (i + 1) * EPS32 * abs(a[k]) for i, k in enumerate(sorted(a))}
    return {"losses": a, "unaccumulated": b, "bound": bound, "out": out}


def assert_close(found: dict, expected: dict, bound: dict) -> None:
    assert set(found) == set(expected), (sorted(found), sorted(expected))
    for k in sorted(expected):
        assert abs(found[k] - expected[k]) <= bound[k], (k, found[k], expected[k], bound[k])


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(mode, recipes, reference, tmp_path):
    out = tmp_path / "run"
    res = run(recipes[mode], out, 2, worker=True)
    assert_close(losses(out), reference["losses"], reference["bound"])
    r0, r1 = rank_reports(out)
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    assert r0["final"] == r1["final"], "the ranks ended with different weights"
    tower = [k for k in r0["final"] if k.startswith("vision_tower.")]
    assert tower and all(r0["final"][k] == r0["initial"][k] for k in tower), "a frozen weight moved"
    # Trap 1 (an FSDP2 optimizer holding unsharded parameters trains nothing): these moved.
    connector = [k for k in r0["final"] if k.startswith("multi_modal_projector.")]
    assert connector and all(r0["final"][k] != r0["initial"][k] for k in connector)
    # Rank 0 alone logs and writes: one line per stage summary, one state.pt per checkpoint.
    assert res.stdout.count("stage instruct (instruct):") == 1
    for c in (out / "checkpoints").iterdir():
        names = {p.name for p in c.iterdir()}
        assert {"state.pt", "meta.json", "rng-0.pt", "rng-1.pt", "dcp"} <= names and "model.safetensors" not in names
    assert len(list((out / "feature_cache" / "shards").iterdir())) > 0


def test_ddp_accumulation_matches_one_micro_batch(recipes, reference, tmp_path):
    """Each rank accumulates 2 one-row micro-batches (no all-reduce on the first) of a 4-row
    global batch; one process takes the 4 rows in one micro-batch."""
    out = tmp_path / "run"
    run(recipes["accum"], out, 2)
    assert_close(losses(out), reference["unaccumulated"], reference["bound"])


def test_sigkill_then_resume_on_the_same_world_size_is_bit_exact(tmp_path):
    """With LoRA dropout each rank draws its own random numbers; a checkpoint keeps every
    rank's RNG state, so a 2-rank run resumed on 2 ranks logs the uninterrupted losses exactly."""
    raw = recipe_raw("ddp")
    raw["stages"][1]["lora"]["dropout"] = 0.1
    recipe = tmp_path / "dropout.toml"
    recipe.write_text(to_toml(parse_recipe(raw)))
    run(recipe, tmp_path / "through", 2)
    out = tmp_path / "run"
    run_until_checkpoints(recipe, out, 2, count=STEPS + 1 + STEPS // 2)  # align's 3, then instruct's first
    assert ckpt.complete_checkpoints(out / "checkpoints")[-1].name.startswith("s01-instruct")
    res = run(recipe, out, 2, "--resume")
    assert "resuming from s01-instruct" in res.stdout
    assert losses(out) == losses(tmp_path / "through")


@pytest.mark.parametrize("mode,first,then", [("ddp", 2, 1), ("fsdp", 1, 2)])
def test_sigkill_then_resume_on_another_world_size(mode, first, then, recipes, reference, tmp_path):
    out = tmp_path / "run"
    run_until_checkpoints(recipes[mode], out, first, count=2 + STEPS // 2)
    res = run(recipes[mode], out, then, "--resume")
    assert "resuming from" in res.stdout
    assert_close(losses(out), reference["losses"], reference["bound"])


def test_grad_accum_must_split_over_ranks():
    stage = parse_recipe(recipe_raw("ddp", grad_accum=3)).stages[0]
    with pytest.raises(ValueError, match=r"stages\.align\.grad_accum: 3 micro-batches .* 2 ranks"):
        Distributed("ddp", 0, 2).check_stage(stage)
    Distributed("ddp", 0, 3).check_stage(stage)


def qlora_raw(mode: str, batch_size: int = 2, grad_accum: int = 2) -> dict:
    """lm (trains the LLM: the QLoRA stage's base is not the starting model's) then QLoRA."""
    raw = recipe_raw(mode, batch_size, grad_accum, first="lm")
    raw["stages"][1].update(finetune="qlora", precision="bf16")
    return raw


@pytest.fixture(scope="module")
def qlora(tmp_path_factory):
    d = tmp_path_factory.mktemp("qlora")
    recipes = {}
    for name, mode, kw in (("ddp", "ddp", {}), ("fsdp", "fsdp", {}), ("single", "ddp", dict(batch_size=4,
                                                                                             grad_accum=1))):
        recipes[name] = d / f"{name}.toml"
        recipes[name].write_text(to_toml(parse_recipe(qlora_raw(mode, **kw))))
    runs = {}
    for name in ("ddp", "single"):
        run(recipes[name], d / f"ref-{name}", 1)
        runs[name] = losses(d / f"ref-{name}")
    a, b = runs["ddp"], runs["single"]
    orderings = max(abs(a[k] - b[k]) for k in a)
    bound = {k: 4 * orderings + 8 * (i + 1) * EPS32 * abs(a[k]) for i, k in enumerate(sorted(a))}
    return {"recipes": recipes, "losses": a, "bound": bound}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_qlora_on_two_ranks_killed_then_resumed_on_one(mode, qlora, tmp_path):
    """QLoRA's checkpoints hold no NF4 weight (FSDP drops their quantisation state): the
    resumed process re-quantizes the base the stage started from, kept in a file because the
    lm stage trained it; the losses are those of one process throughout."""
    out = tmp_path / "run"
    run_until_checkpoints(qlora["recipes"][mode], out, 2, count=STEPS + 1)  # lm's 3, QLoRA's first
    assert (out / "checkpoints" / "s01-instruct-nf4-source.safetensors").is_file()
    res = run(qlora["recipes"][mode], out, 1, "--resume")
    assert "resuming from s01-instruct-step" in res.stdout
    assert_close(losses(out), qlora["losses"], qlora["bound"])
    # The last (DCP) checkpoint loads in one process with the base and adapters the stage ended
    # with: folded, they are final/'s weights exactly.
    model, _, _ = load_for_inference(ckpt.complete_checkpoints(out / "checkpoints")[-1])
    final = VLM.from_pretrained(out / "final").state_dict()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert layers and all(m.quantized for m in layers.values())
    for name, layer in layers.items():
        assert torch.equal(merge_quantized(layer).weight, final[f"{name}.weight"]), name


def test_unknown_mode_names_the_key():
    with pytest.raises(ValueError, match=r"run\.distributed: expected one of none, ddp, fsdp"):
        parse_recipe(recipe_raw("zero3"))


def test_dry_run_shards_states_under_fsdp_only():
    mem = {"weights": 4000, "gradients": 800, "optimizer": 1600, "activations": 300}
    assert per_process(mem, "ddp", 4, 50) == {**mem, "ddp_buckets": 800}
    assert per_process(mem, "fsdp", 4, 50) == {"weights": 1000, "gradients": 200, "optimizer": 400,
                                                "gathered": 50, "activations": 300}
    assert per_process(mem, "fsdp", 1, 50) == mem
    text = dry_run(parse_recipe(recipe_raw("fsdp")), world_size=4)
    assert "run.distributed = 'fsdp' on 4 processes: memory per process" in text and "gathered" in text


# ---- mixed data: text-only, one- and two-image samples ----------------------------------------

def mixed_raw(mode: str, root, batch_size: int = 1, grad_accum: int = 2, chunk: int = 4) -> dict:
    """Every stage type on mixed data (the captions default to it: contrastive and align pair
    the samples with an image): contrastive, lm, align, instruct with the frozen tower's
    feature cache (micro-batches with images bring features) and instruct with vision LoRA
    (they run the tower). One packed row of one or two samples per micro-batch."""
    raw = tiny_raw(steps=2, checkpoint_every=1)
    raw["data"] = {"kind": "llava", "train": str(root / "mixed.json"), "val": str(root / "val.json"),
                   "image_root": str(root / "images"), "template": "literal"}
    # seed 27: each instruct step gives one rank a text-only micro-batch (checked below)
    raw["run"].update(evaluate=False, distributed=mode, seed=27)
    contrastive, lm, align, instruct = raw["stages"]
    contrastive["contrastive"]["chunk"] = chunk
    contrastive.update(max_steps=1, grad_accum=2)
    lm.update(max_steps=1)
    align.update(max_steps=1)
    tower = {**instruct, "name": "tower", "lr": {"connector": 1e-3, "llm": 1e-3, "vision": 1e-3},
             "lora": {"r": 4, "alpha": 8, "vision_blocks": 1}}
    raw["stages"] = [contrastive, lm, align, instruct, tower]
    for s in raw["stages"][1:]:  # rows of 80 tokens hold one or two samples (the longest has 79)
        s.update(batch_size=batch_size, grad_accum=grad_accum, packing_budget=80)
    return raw


def images_per_micro_batch(recipe_path, run_dir, index: int, count: int, key: str = "images") -> list[bool]:
    """Whether each of stage `index`'s first `count` micro-batches holds an image (`key`: the
    batch's pixels, ``pixel_values`` for a Hugging Face VLM)."""
    recipe = load_recipe(recipe_path)
    data = prepare_data(recipe, run_dir)
    model = build_model(recipe, data.tokenizer, recipe.run.seed)
    batches = iter(StageBatches(recipe.stages[index], recipe, data, model, seed=recipe.run.seed + index))
    return [next(batches).get(key) is not None for _ in range(count)]


def test_contrastive_and_align_pair_the_samples_with_an_image():
    """Their pairs are image(s) and a caption: a text-only sample of the captions (by default
    the training file) has none and is counted as filtered out; align keeps every image of a
    two-image sample (one <image> each), contrastive (one image, one caption) filters it out."""
    def sample(i, images):
        turns = [{"from": "human", "value": "<image>\n" * len(images) + "Describe."},
                 {"from": "gpt", "value": f"caption {i}"}]
        return Sample(f"s{i}", images, turns)

    captions = [sample(0, []), sample(1, ["a.png"]), sample(2, ["b.png", "c.png"])]
    data = RunData(None, [], [], captions, Path("."), None)
    contrastive, align = parse_recipe(mixed_raw("ddp", Path("."))).stages[:3:2]
    pairs, _, filtered = stage_samples(contrastive, data)
    assert [(p.id, p.images, p.conversations[1]["value"]) for p in pairs] == [("s1", ["a.png"], "caption 1")]
    assert filtered.counts == {"no_image": 1, "several_images": 1}
    pairs, _, filtered = stage_samples(align, data)
    assert [(p.id, p.images, p.conversations) for p in pairs] == [
        ("s1", ["a.png"], [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "caption 1"}]),
        ("s2", ["b.png", "c.png"], [{"from": "human", "value": "<image><image>"},
                                    {"from": "gpt", "value": "caption 2"}])]
    assert filtered.counts == {"no_image": 1}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The synthetic VQA data with every other sample of one image made text-only (12 of 24;
    8 keep one image, 4 have two); one-process references of every stage type on it."""
    root = tmp_path_factory.mktemp("mixed-data")
    records = json.loads(synthetic_vqa.write_dataset(root, 24, 6, seed=0, image_size=24).train.read_text())
    for i, record in enumerate(records):
        if "image" in record and i % 2 == 0:
            del record["image"]
            for turn in record["conversations"]:
                turn["value"] = turn["value"].replace("<image>", "").strip()
    (root / "mixed.json").write_text(json.dumps(records))
    # single: the same rows, both in one micro-batch (the contrastive stage's two micro-batches
    # kept, their B x B loss summed in chunks of 2 rows): the same terms added in another order.
    recipes = {}
    for name, mode, kw in (("ddp", "ddp", {}), ("fsdp", "fsdp", {}),
                           ("single", "ddp", dict(batch_size=2, grad_accum=1, chunk=2))):
        recipes[name] = root / f"{name}.toml"
        recipes[name].write_text(to_toml(parse_recipe(mixed_raw(mode, root, **kw))))
    outs = {name: tmp_path_factory.mktemp(f"mixed-ref-{name}") for name in ("ddp", "single")}
    for name, out in outs.items():
        run(recipes[name], out, 1)
    # The data make the ranks differ: in every step of both instruct stages, of the step's 2
    # micro-batches (rank 0 takes the first, rank 1 the second) one holds an image, one none.
    for index in (3, 4):
        held = images_per_micro_batch(recipes["ddp"], outs["ddp"], index, 2 * 2)
        assert held[0] != held[1] and held[2] != held[3], (index, held)
    a, b = losses(outs["ddp"]), losses(outs["single"])
    assert len(a) == 7 and set(a) == set(b) and all(math.isfinite(v) for v in a.values())
    orderings = max(abs(a[k] - b[k]) for k in a)
    bound = {k: 4 * orderings + 8 * (i + 1) * EPS32 * abs(a[k]) for i, k in enumerate(sorted(a))}
    # Final weights: the two one-process runs' difference per tensor bounds the 2-rank one's.
    w, v = (load_file(outs[name] / "final" / "model.safetensors") for name in ("ddp", "single"))
    weight_bound = {k: 4 * (w[k] - v[k]).abs().max() + 8 * len(a) * EPS32 * w[k].abs() for k in w}
    return {"recipes": recipes, "losses": a, "bound": bound, "weights": w, "weight_bound": weight_bound}


def assert_weights_close(out, mixed) -> None:
    found, want = load_file(out / "final" / "model.safetensors"), mixed["weights"]
    assert set(found) == set(want)
    for k in sorted(want):
        assert ((found[k] - want[k]).abs() <= mixed["weight_bound"][k]).all(), k


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_mixed_data_on_two_ranks_matches_one_process(mode, mixed, tmp_path):
    """Issue 27: a rank whose micro-batch holds no image runs the tower and connector on a
    blank image (the connector alone when the others bring cached features), so FSDP's
    gathers and both modes' gradient reductions match across ranks; losses and final
    weights are one process's."""
    out = tmp_path / "run"
    run(mixed["recipes"][mode], out, 2, worker=True)
    assert_close(losses(out), mixed["losses"], mixed["bound"])
    r0, r1 = rank_reports(out)
    assert r0["final"] == r1["final"], "the ranks ended with different weights"
    assert_weights_close(out, mixed)


def test_mixed_data_killed_on_two_fsdp_ranks_then_resumed_on_one(mixed, tmp_path):
    """Killed after the cached instruct stage's first step (contrastive, lm, align: one each),
    a step where one rank had no image; the resumed process trains the vision-LoRA stage.
    (The other direction, and DDP, on image-only data: test_sigkill_then_resume_on_another_world_size.)"""
    out = tmp_path / "run"
    run_until_checkpoints(mixed["recipes"]["fsdp"], out, 2, count=4)
    assert ckpt.complete_checkpoints(out / "checkpoints")[-1].name.startswith("s03-instruct-step")
    res = run(mixed["recipes"]["fsdp"], out, 1, "--resume")
    assert "resuming from s03-instruct-step" in res.stdout
    assert_close(losses(out), mixed["losses"], mixed["bound"])
    assert_weights_close(out, mixed)
