"""torchrun DDP and FSDP2 of a Hugging Face VLM run (model.source = "hf", tiny Qwen2-VL with its
processor, align then LoRA instruct) on 2 CPU ranks (gloo): the per-step losses of one
process on the same global batch, within the bound tests/test_distributed.py derives (the
difference of two one-process runs that split the global batch differently, plus a few
fp32 roundings per step); a 2-rank DDP run SIGKILLed (every rank) and resumed in one
process continues on those losses; the FSDP run evaluates (VQA, generate) during each
stage (sharded) and at its end. One test: each run is a few processes that import torch and transformers."""
import copy
import json
import math

import torch
import torch.distributed as tdist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from fastvlm.integrations.hf_load import load_patched
from fastvlm.integrations.hf_trainable import HFVLM, layer_list
from fastvlm.integrations.transformers import patch
from fastvlm.nn.lora import LoRALinear
from fastvlm.train import checkpoint as ckpt
from fastvlm.train.build import finish_stage
from fastvlm.train.export import load_for_inference
from fastvlm.train.recipe import parse_recipe, to_toml
from tests import hf_patch_models as H
from tests import hf_processors as P
from tests.test_hf_train import QUESTIONS, SIZES, raw_recipe, records

from .dist_launch import losses, run, run_until_checkpoints
from .test_distributed import EPS32, assert_close, images_per_micro_batch

STEPS = 2


def hf_raw(root, mode: str, batch_size: int, grad_accum: int, evaluate: bool = False) -> dict:
    """align then LoRA instruct (raw_recipe), `evaluate`: after each stage's first step (on the
    sharded model under FSDP: every rank generates in lockstep) and at its end (evaluation
    forks the RNG: the losses are those of a run without it)."""
    raw = raw_recipe(root, steps=STEPS, checkpoint_every=1)
    raw["run"].update(distributed=mode, keep_checkpoints=2 * STEPS, evaluate=evaluate, eval_max_new_tokens=4, seed=3)
    for stage in raw["stages"]:
        stage.update(batch_size=batch_size, grad_accum=grad_accum, eval_every=1 if evaluate else 0)
    return raw


def test_hf_two_ranks_ddp_and_fsdp_match_one_process_and_resume(tmp_path):
    root = tmp_path / "data"
    P.write_images(root / "img", SIZES, seed=0)
    # the samples with an image, and two text-only ones: they make a packed row of their own,
    # so that in each sft step one rank's micro-batch holds no image (checked below), which
    # runs the FSDP-sharded tower on a blank image while the other rank's runs it on images
    with_image = [r for r in records() if "image" in r]
    text_only = [{"id": f"t{i}", "conversations": [{"from": "human", "value": "Say it again. " * 2},
                                                   {"from": "gpt", "value": "It is said again, " * 2}]}
                 for i in range(2)]
    (root / "train.json").write_text(json.dumps(with_image + text_only))
    (root / "val.json").write_text(json.dumps(with_image))  # the VQA questions
    P.save_family("qwen2_vl", 0, root / "qwen2_vl")
    recipes = {}
    for name, mode, kw in (("ddp", "ddp", dict(batch_size=1, grad_accum=2)),
                           ("fsdp", "fsdp", dict(batch_size=1, grad_accum=2, evaluate=True)),
                           ("single", "ddp", dict(batch_size=2, grad_accum=1))):
        raw = hf_raw(root, mode, **kw)
        raw["data"]["val"] = str(root / "val.json")
        recipes[name] = tmp_path / f"{name}.toml"
        recipes[name].write_text(to_toml(parse_recipe(raw)))
    held = images_per_micro_batch(recipes["fsdp"], tmp_path / "plan", 1, 2 * STEPS, key="pixel_values")
    assert held == [False, True, True, False], held  # rank 0 takes a step's first, rank 1 its second
    refs = {}
    for name in ("ddp", "single"):
        run(recipes[name], tmp_path / f"ref-{name}", 1)
        refs[name] = losses(tmp_path / f"ref-{name}")
    a, b = refs["ddp"], refs["single"]
    assert len(a) == 2 * STEPS and set(a) == set(b) and all(math.isfinite(v) for v in a.values())
    orderings = max(abs(a[k] - b[k]) for k in a)
    bound = {k: 4 * orderings + 8 * (i + 1) * EPS32 * abs(a[k]) for i, k in enumerate(sorted(a))}

    out = tmp_path / "fsdp"
    res = run(recipes["fsdp"], out, 2)
    assert_close(losses(out), a, bound)
    assert res.stdout.count("stage sft (instruct):") == 1  # rank 0 alone reports
    for stage in ("align", "sft"):
        for step in range(1, STEPS + 1):  # mid-stage (sharded) and at the stage's end
            result = json.loads((out / "eval" / f"{stage}-step{step}.json").read_text())
            assert len(result["predictions"]) == len(QUESTIONS) and result["val_loss"] > 0

    out = tmp_path / "ddp"
    run_until_checkpoints(recipes["ddp"], out, 2, count=STEPS + 1)  # align's, then sft's first
    assert ckpt.complete_checkpoints(out / "checkpoints")[-1].name.startswith("s01-sft")
    res = run(recipes["ddp"], out, 1, "--resume")
    assert "resuming from s01-sft" in res.stdout
    assert_close(losses(out), a, bound)
    # Its last checkpoint (DCP) loads for fastvlm eval / export with the stage's adapters: folded
    # in, they give final/'s weights exactly.
    model, processor, recipe = load_for_inference(ckpt.complete_checkpoints(out / "checkpoints")[-1])
    assert any(isinstance(m, LoRALinear) for m in model.modules()) and processor.processor.chat_template
    finish_stage(model, recipe.stages[1])
    final = load_patched(out / "final", torch.float32).state_dict()
    assert model.hf.state_dict().keys() == final.keys()
    assert all(torch.equal(v, final[k]) for k, v in model.hf.state_dict().items())


def test_fsdp_micro_batch_without_images_runs_a_blank_image(tmp_path, seed):
    """A text-only training micro-batch under FSDP runs the sharded tower (and the merger) on a
    blank image weighted 0, so that its rank joins the gathers other ranks' images make: the
    loss and every gradient are exactly those of the micro-batch alone, the tower's and the
    merger's gradients are zeros (present, as on a rank with images). One process, a group of
    1; one process without FSDP runs no blank image (no gradient there)."""
    model = HFVLM(patch(H.build("qwen2_vl", seed))).train()
    alone = copy.deepcopy(model)
    ids = torch.randint(0, H.TEXT_MAX, (1, 12), generator=torch.Generator().manual_seed(seed))
    want = alone(input_ids=ids, labels=ids)
    want.backward()
    in_tower = {id(p) for p in model.vision_tower.parameters()}  # Qwen2-VL's merger included
    tower = {n for n, p in model.named_parameters() if id(p) in in_tower}
    assert tower and all(p.grad is None for n, p in alone.named_parameters() if n in tower)
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for layer in layer_list(model.vision_tower)[1]:
            fully_shard(layer, mesh=mesh)
        got = model(input_ids=ids, labels=ids)
        got.backward()
        assert torch.equal(got, want)
        for name, p in model.named_parameters():
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            if name in tower:
                assert grad is not None and not grad.any(), name
            else:
                assert torch.equal(grad, alone.get_parameter(name).grad), name  # every LLM weight has one
        model.eval()  # evaluation runs every rank on the same inputs: no blank image
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids, labels=ids), want)
    finally:
        tdist.destroy_process_group()
