"""`fastvlm train` on Hugging Face VLMs (model.source = "hf"): a tiny Qwen2-VL saved with its
processor, trained through train() (align, then instruct with LoRA), a SIGKILLed run resumed
with the same losses, and the refusals; a tiny Idefics3 (image splitting) through train()."""
from __future__ import annotations

import json
import random
import re
import signal
import time

import pytest
import torch
import transformers
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from fastvlm.cli import main as cli_main
from fastvlm.integrations.hf_trainable import HFVLM
from fastvlm.nn.lora import LoRALinear
from fastvlm.train.build import build_model, finish_stage, prepare_stage
from fastvlm.train.export import export
from fastvlm.train.losses import stage_loss
from fastvlm.train.recipe import load_recipe, parse_recipe, shipped_recipes, to_toml
from fastvlm.train.stage_data import StageBatches, prepare_data
from fastvlm.train.trainer import train
from tests import hf_patch_models as H
from tests import hf_processors as P
from tests import test_resume as R
from tests.utils import assert_close

SIZES = {"a.png": (56, 84), "b.png": (112, 56), "c.png": (70, 70), "d.png": (84, 56)}
QUESTIONS = [("What is it?", "A square."), ("Which color?", "Red then blue."), ("Where?", "On the left."),
             ("How many?", "Three of them."), ("Is it big?", "No, it is small."), ("Why?", "It was made so.")]


def records() -> list[dict]:
    out = [{"id": f"s{i}", "image": file, "conversations": [
        {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}
        for i, ((q, a), file) in enumerate(zip(QUESTIONS, list(SIZES) * 2))]
    out.append({"id": "text", "conversations": [{"from": "human", "value": "Say hi."},
                                                {"from": "gpt", "value": "hi there"}]})
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Images, a data file, and the model directory (tiny float32 Qwen2-VL + its processor)."""
    root = tmp_path_factory.mktemp("hftrain")
    P.write_images(root / "img", SIZES, seed=0)
    (root / "train.json").write_text(json.dumps(records()))
    P.save_family("qwen2_vl", 0, root / "qwen2_vl")
    return root


def raw_recipe(root, family: str = "qwen2_vl", steps: int = 2, checkpoint_every: int = 0) -> dict:
    common = {"max_steps": steps, "batch_size": 2, "packing_budget": 160, "precision": "fp32",
              "warmup_ratio": 0.3, "checkpoint_every": checkpoint_every}
    return {
        "name": "hf-test",
        "model": {"source": "hf", "path": str(root / family)},
        "data": {"kind": "llava", "train": str(root / "train.json"), "val": str(root / "train.json"),
                 "image_root": str(root / "img"), "num_workers": 0},
        "run": {"evaluate": False, "device": "cpu", "keep_checkpoints": 2},
        "stages": [
            {"name": "align", "type": "align", "lr": {"connector": 1e-2}, **common},
            {"name": "sft", "type": "instruct", "lr": {"connector": 1e-2, "llm": 1e-2}, **common,
             "lora": {"r": 4, "alpha": 8, "targets": "q_proj,v_proj"}, "checkpointing": {"llm": "full"}},
        ],
    }


def groups_of(model: HFVLM) -> dict[str, dict[str, torch.Tensor]]:
    compiled = {g: re.compile(p) for g, p in model.GROUP_PATTERNS.items()}
    out = {g: {} for g in compiled}
    for name, value in model.state_dict().items():
        group = next(g for g, rx in compiled.items() if rx.fullmatch(name))
        out[group][name] = value.clone()
    return out


@pytest.fixture(scope="module")
def trained(root, tmp_path_factory):
    """(run directory, train()'s result, the starting weights by group) of align then LoRA instruct."""
    recipe = parse_recipe(raw_recipe(root))
    before = groups_of(build_model(recipe, None, 0))
    run = tmp_path_factory.mktemp("hfrun") / "run"
    return run, train(recipe, run, progress=False, echo=lambda *a: None), before


def test_hf_run_trains_the_stages_groups_and_saves_the_familys_format(trained):
    run, result, before = trained
    model = result["model"]
    after = groups_of(model)
    assert all(torch.equal(before["vision"][k], v) for k, v in after["vision"].items())  # never trained
    for group in ("connector", "llm"):  # trained (the LLM's LoRA merged at the stage's end)
        assert any(not torch.equal(before[group][k], v) for k, v in after[group].items()), group
    assert model.language_model.lora_config is None
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    assert [(r["stage_index"], r["step"]) for r in steps] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert "lr_connector" in steps[0] and "lr_llm" not in steps[0] and "lr_llm" in steps[2]
    # final/ is the family's own directory (the processor in final/tokenizer)
    loaded = AutoModelForImageTextToText.from_pretrained(result["final"])
    assert type(loaded) is type(model.hf)
    state = model.hf.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    assert AutoProcessor.from_pretrained(result["final"] / "tokenizer").chat_template


def test_hf_run_of_an_idefics3_family_model(root, tmp_path):
    """Idefics3 (SmolVLM-Instruct's architecture: image splitting into tiles, pixel_attention_mask)
    through train(): LoRA instruct on packed rows for two steps, the tower untouched, the
    projection and the LLM trained, final/ the family's own directory."""
    P.save_family("idefics3", 0, tmp_path / "idefics3")
    raw = raw_recipe(root, steps=2)
    raw["model"]["path"] = str(tmp_path / "idefics3")
    raw["stages"] = raw["stages"][1:]
    recipe = parse_recipe(raw)
    before = groups_of(build_model(recipe, None, 0))
    result = train(recipe, tmp_path / "run", progress=False, echo=lambda *a: None)
    after = groups_of(result["model"])
    assert all(torch.equal(before["vision"][k], v) for k, v in after["vision"].items())
    for group in ("connector", "llm"):
        assert any(not torch.equal(before[group][k], v) for k, v in after[group].items()), group
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    loaded = AutoModelForImageTextToText.from_pretrained(result["final"])
    assert type(loaded).__name__ == "Idefics3ForConditionalGeneration"
    state = result["model"].hf.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    assert AutoProcessor.from_pretrained(result["final"] / "tokenizer").chat_template == P.IDEFICS3_TEMPLATE


def prompt_inputs(processor, root) -> dict:
    """A user turn with an image, through the processor's own chat template."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return dict(processor(text=[text], images=[Image.open(root / "img" / "a.png")], return_tensors="pt"))


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}).logits


def test_export_hf_and_peft_round_trips(trained, root, tmp_path):
    """--format hf: AutoModelForImageTextToText + AutoProcessor load OUT, with the trained
    model's logits (the same class on the trained weights). --format peft: OUT's adapter on
    the family class of its base gives those logits (fp32, within plain PyTorch's error of a
    float64 evaluation of the merged model), and names model.path as its base."""
    run, result, _ = trained
    hf_out = export(run, tmp_path / "hf", "hf")
    exported = AutoModelForImageTextToText.from_pretrained(hf_out)
    processor = AutoProcessor.from_pretrained(hf_out)
    inputs = prompt_inputs(processor, root)
    trained_hf = type(result["model"].hf)(result["model"].hf.config)
    trained_hf.load_state_dict(result["model"].hf.state_dict())
    merged32 = logits(exported, inputs)
    assert torch.equal(merged32, logits(trained_hf.eval(), inputs))
    merged64 = logits(AutoModelForImageTextToText.from_pretrained(hf_out, dtype=torch.float64), inputs)

    peft_out = export(run, tmp_path / "peft", "peft")
    config = json.loads((peft_out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((root / "qwen2_vl").resolve())
    assert config["modules_to_save"] == ["model.visual.merger"]
    cls = getattr(transformers, config["auto_mapping"]["base_model_class"])
    adapted = PeftModel.from_pretrained(cls.from_pretrained(config["base_model_name_or_path"]), peft_out).eval()
    assert_close(logits(adapted, inputs), merged64, merged32, name="peft logits")
    with pytest.raises(ValueError, match="format: a Hugging Face VLM run .* exports as hf or peft"):
        export(run, tmp_path / "llava", "hf-llava")


def test_hf_run_sigkill_then_resume_gives_the_same_losses(root, tmp_path, seed):
    steps = 2
    recipe = tmp_path / "hf.toml"
    recipe.write_text(to_toml(parse_recipe(raw_recipe(root, steps=steps, checkpoint_every=1),
                                           [f"run.seed={seed}"])))
    R._finish(recipe, tmp_path / "reference")
    reference = R._losses(tmp_path / "reference")
    assert len(reference) == 2 * steps and all(v is not None for v in reference.values())
    out = tmp_path / "run"
    proc = R._run_until(recipe, out, random.Random(seed).randint(1, 2 * steps - 1))
    time.sleep(random.Random(seed + 1).random() * 0.5)  # anywhere: mid-step, mid-checkpoint, ...
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    R._finish(recipe, out, "--resume")
    assert R._losses(out) == reference


def test_hf_refusals(root, tmp_path):
    raw = raw_recipe(root)
    with pytest.raises(ValueError, match="model.path: .* does not exist"):
        build_model(parse_recipe(raw, [f"model.path={tmp_path / 'nowhere'}"]), None, 0)
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama",
                                                                 "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match=r"model.path: the checkpoint is a LlamaForCausalLM .*supported: .*"
                                         r"Qwen2VLForConditionalGeneration"):
        build_model(parse_recipe(raw, [f"model.path={tmp_path / 'llama'}"]), None, 0)
    with pytest.raises(ValueError, match=r"stages\[1\] \(sft\).type: model.source = 'hf' trains align and "
                                         r"instruct stages, got 'lm'"):
        parse_recipe(raw, ["stages.sft.type=lm", "stages.sft.lr={llm = 1e-3}"])
    with pytest.raises(ValueError, match="checkpointing.llm: a Hugging Face LLM checkpoints each decoder layer"):
        parse_recipe(raw, ["stages.sft.checkpointing={llm = 'selective'}"])


def test_qlora_llm_and_vision_lora_on_hf_modules(root, tmp_path, seed):
    """instruct with QLoRA on the decoder and LoRA on the tower's last layer (fastvlm's
    LoRALinear by module name on transformers modules): exactly those adapters and the
    projector train, a step gives each of them a gradient, and finish_stage leaves plain
    Linears with the adapters folded in."""
    raw = raw_recipe(root)
    raw["stages"] = [{**raw["stages"][1], "finetune": "qlora", "precision": "bf16", "checkpointing": {},
                      "lr": {"connector": 1e-2, "llm": 1e-2, "vision": 1e-3},
                      "lora": {"r": 4, "alpha": 8, "targets": "q_proj,v_proj", "vision_blocks": 1,
                               "vision_targets": "qkv,fc1"}}]
    recipe = parse_recipe(raw, [f"run.seed={seed}"])
    data = prepare_data(recipe, tmp_path)
    model = build_model(recipe, data.tokenizer, seed)
    stage = recipe.stages[0]
    mp = prepare_stage(model, stage, recipe, torch.device("cpu"))["precision"]
    lora = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    tower = next(n for n, m in model.named_modules() if m is model.vision_tower)
    last = len(model.vision_tower.blocks) - 1
    assert {n for n in lora if n.startswith(tower)} == {f"{tower}.blocks.{last}.attn.qkv",
                                                         f"{tower}.blocks.{last}.mlp.fc1"}
    decoder = [m for n, m in model.named_modules() if isinstance(m, LoRALinear) and not n.startswith(tower)]
    assert len(decoder) == 2 * len(model.language_model.layers) and all(m.quantized for m in decoder)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    connector = re.compile(model.GROUP_PATTERNS["connector"])
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_" in n or connector.fullmatch(n)}
    batch = next(iter(StageBatches(stage, recipe, data, model, seed)))
    with mp.autocast("cpu"):
        loss, _ = stage_loss(model, stage, torch.device("cpu"))(batch)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if p.requires_grad and "lora_A" not in n)  # lora_B starts at zero: A's gradient is zero
    finish_stage(model, stage)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad(), mp.autocast("cpu"):
        assert torch.isfinite(model(**model.batch_inputs(batch, "cpu")))


HF_RECIPES = {"qwen2.5-vl-7b-lora": "qwen2_5_vl", "qwen3-vl-4b-lora": "qwen3_vl", "gemma-3-4b-qlora": "gemma3",
              "smolvlm-lora": "smolvlm", "llava-onevision-7b-lora": "llava_onevision"}


def test_shipped_hf_recipes_parse_and_dry_run_on_a_config_alone(tmp_path, capsys):
    """Each shipped Hugging Face recipe loads by name, and `fastvlm train NAME --dry-run` with
    model.path set (--set) to a directory holding only its family's config.json (no weight,
    no processor, no data) prints each stage's groups: the adapters are trainable, the tower
    frozen."""
    assert set(HF_RECIPES) <= set(shipped_recipes())
    for name, family in HF_RECIPES.items():
        recipe = load_recipe(name)
        assert recipe.model.source == "hf" and [s.type for s in recipe.stages] == ["instruct"]
        folder = tmp_path / family
        folder.mkdir()
        (folder / "config.json").write_text(H.build(family, 0).config.to_json_string())
        assert cli_main(["train", name, "--dry-run", "--set", f"model.path={folder}"]) == 0
        text = capsys.readouterr().out
        assert f"recipe {name} " in text and "no data (" in text, text
        groups = dict(re.findall(r"^\s+(connector|vision|llm)\s+[\d,]+ total\s+([\d,]+) trainable", text, re.M))
        assert groups["vision"] == "0" and groups["llm"] != "0", (name, text)
        assert (groups["connector"] != "0") == ("connector" in recipe.stages[0].lr), (name, text)
