"""`fastvlm export --format hf | peft` of a Hugging Face VLM run, for every family
tests/hf_processors.py builds: a run directory as `fastvlm train` leaves it (the recipe, one
checkpoint of a LoRA instruct stage), its adapters and projector set to random values in
place of training, exported both ways through `export`; the family's own classes load each
export, and its logits on a prompt with an image are the trained model's (float32, within
plain PyTorch's own error of the trained model's float64 logits). Also: the export's dtype
(the base's by default, --dtype otherwise), a connector parameter no module holds alone
(LLaVA-NeXT / OneVision's image_newline), and a QLoRA stage's adapter."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from fastvlm.cli import main as cli_main
from fastvlm.integrations.hf_trainable import HFVLM
from fastvlm.nn.lora import dequantized_weight, lora_layers
from fastvlm.train import checkpoint as ckpt
from fastvlm.train.build import stage_model
from fastvlm.train.export import export
from fastvlm.train.recipe import parse_recipe
from tests import hf_patch_models as H
from tests import hf_processors as P
from tests.utils import assert_close


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    P.write_images(root, {"a.png": (56, 84)}, seed=0)
    return root / "a.png"


def instruct_recipe(base: Path, seed: int, lr: dict, finetune: str = "lora"):
    # QLoRA as the shipped recipe runs it: a bf16 stage (its frozen weights cast to bf16)
    precision = "bf16" if finetune == "qlora" else "fp32"
    stage = {"name": "sft", "type": "instruct", "lr": lr, "max_steps": 1, "batch_size": 1, "precision": precision,
             "finetune": finetune, "lora": {"r": 4, "alpha": 8, "targets": "q_proj,v_proj"}}
    return parse_recipe({"name": "hf-export", "model": {"source": "hf", "path": str(base)},
                         "data": {"kind": "llava", "train": str(base / "train.json"), "val": str(base / "train.json")},
                         "run": {"evaluate": False, "device": "cpu"}, "stages": [stage]},
                        [f"run.seed={seed}"])


def fake_run(base: Path, run: Path, seed: int, lr: dict | None = None, finetune: str = "lora") -> HFVLM:
    """A run directory as training leaves it after one step of a LoRA instruct stage: the
    model `fastvlm train` shapes for the stage, every weight the stage trains set to random
    values (LoRA B is zero at the start, so an untrained adapter would prove nothing), saved
    as the stage's checkpoint. Returns that model."""
    recipe = instruct_recipe(base, seed, lr or {"connector": 1e-3, "llm": 1e-3}, finetune)
    ckpt.prepare_run_dir(recipe, run, resume=False)
    model = stage_model(recipe, None, 0, run, torch.device("cpu")).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # the adapters and the connector: changes above the tiny weights' 0.02 std
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    meta = {"stage": "sft", "stage_index": 0, "step": 1, "global_step": 1, "digest": recipe.digest(), "time": 0.0}
    ckpt.save_checkpoint(run / "checkpoints", ckpt.checkpoint_name(0, "sft", 1), model, {}, meta,
                         ckpt.checkpoint_files(model))
    return model


def prompt_inputs(processor, image: Path) -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.open(image)], return_tensors="pt")
    return {k: v for k, v in inputs.items() if k != "labels"}  # PaliGemma's: a loss in place of the logits


def logits(model, inputs: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}).logits


def peft_model(out: Path, dtype: torch.dtype | str = "auto"):
    """PEFT's own loading of adapter OUT on the family class of its base."""
    config = json.loads((out / "adapter_config.json").read_text())
    cls = getattr(transformers, config["auto_mapping"]["base_model_class"])
    base = cls.from_pretrained(config["base_model_name_or_path"], dtype=dtype)
    return PeftModel.from_pretrained(base, out).eval(), config


@pytest.mark.parametrize("family", list(H.FAMILIES))
def test_hf_and_peft_exports_give_the_trained_models_logits(family, image, tmp_path, seed):
    if not P.buildable(family):
        pytest.skip(f"{family}: its processor needs {P.missing(family)}, not installed here")
    base = P.save_family(family, 0, tmp_path / family)
    model = fake_run(base, tmp_path / "run", seed)
    inputs = prompt_inputs(AutoProcessor.from_pretrained(base), image)
    trained32 = logits(model.hf, inputs)
    hf_out = export(tmp_path / "run", tmp_path / "hf", "hf")
    peft_out = export(tmp_path / "run", tmp_path / "peft", "peft")
    trained64 = logits(model.hf.double(), inputs, torch.float64)

    exported = AutoModelForImageTextToText.from_pretrained(hf_out).eval()
    assert type(exported) is type(model.hf) and exported.dtype == torch.float32  # the tiny base's dtype
    assert AutoProcessor.from_pretrained(hf_out).chat_template
    assert_close(logits(exported, prompt_inputs(AutoProcessor.from_pretrained(hf_out), image)), trained64,
                 trained32, name=f"{family} hf logits")

    adapted, config = peft_model(peft_out)
    # image_newline (LLaVA-NeXT / OneVision) trained: no adapter holds it, so the base is OUT/base
    own_base = any(n.endswith("image_newline") for n, p in model.named_parameters() if p.requires_grad)
    assert config["base_model_name_or_path"] == str(peft_out / "base" if own_base else base.resolve())
    connector = re.compile(model.GROUP_PATTERNS["connector"])
    assert {n for n, p in model.hf.named_parameters() if connector.fullmatch(f"model.{n}") and
            not any(n.startswith(m + ".") for m in config["modules_to_save"])} <= {"model.image_newline"}
    assert_close(logits(adapted, inputs), trained64, trained32, name=f"{family} peft logits")


def test_an_untrained_image_newline_stays_with_the_base(image, tmp_path, seed):
    """LLaVA-OneVision's image_newline (a bare parameter of the inner model, no module of its
    own) at the base's value, the connector not trained: the adapter applies to model.path."""
    base = P.save_family("llava_onevision", 0, tmp_path / "base")
    model = fake_run(base, tmp_path / "run", seed, lr={"llm": 1e-3})
    inputs = prompt_inputs(AutoProcessor.from_pretrained(base), image)
    trained32 = logits(model.hf, inputs)
    out = export(tmp_path / "run", tmp_path / "peft", "peft")
    adapted, config = peft_model(out)
    assert config["base_model_name_or_path"] == str(base.resolve()) and not (out / "base").exists()
    assert not any("image_newline" in k for k in load_file(str(out / "adapter_model.safetensors")))
    assert_close(logits(adapted, inputs), logits(model.hf.double(), inputs, torch.float64), trained32,
                 name="peft logits")


def bf16_base(family: str, path: Path) -> Path:
    """The tiny family's directory with its weights, and config, in bfloat16 (as released)."""
    P.save_family(family, 0, path)
    AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    return path


def saved(out: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(config.json's dtype, the floating-point weights) of a save_pretrained directory."""
    tensors = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    return json.loads((out / "config.json").read_text())["dtype"], {k: v for k, v in tensors.items()
                                                                    if v.is_floating_point()}


def test_export_dtype_is_the_bases_unless_given(tmp_path, seed):
    """A bfloat16 base (the model trained in float32): --format hf writes bfloat16 (config and
    weights: the float32 export's values rounded) from a checkpoint and from final/, --dtype
    (the command's) writes its own; peft's OUT/base (image_newline trained) is bfloat16, the adapter float32."""
    base = bf16_base("llava_onevision", tmp_path / "base")
    run = tmp_path / "run"
    fake_run(base, run, seed)
    dtype32, full = saved(export(run, tmp_path / "fp32", "hf", dtype=torch.float32))
    assert dtype32 == "float32" and all(v.dtype == torch.float32 for v in full.values())
    expected = {k: v.to(torch.bfloat16) for k, v in full.items()}
    for out in (export(run, tmp_path / "default", "hf"),
                export(run / "checkpoints" / ckpt.checkpoint_name(0, "sft", 1), tmp_path / "ckpt", "hf")):
        dtype, weights = saved(out)
        assert dtype == "bfloat16" and weights.keys() == expected.keys()
        assert all(torch.equal(v, expected[k]) for k, v in weights.items())
    assert cli_main(["export", str(run), str(tmp_path / "fp16"), "--format", "hf", "--dtype", "fp16"]) == 0
    dtype, weights = saved(tmp_path / "fp16")
    assert dtype == "float16" and all(v.dtype == torch.float16 for v in weights.values())
    export(run, run / "final", "hf", dtype=torch.float32)  # final/ as the trainer writes it: float32
    dtype, weights = saved(export(run, tmp_path / "from-final", "hf"))
    assert dtype == "bfloat16" and all(torch.equal(v, expected[k]) for k, v in weights.items())

    peft_out = export(run, tmp_path / "peft", "peft")
    config = json.loads((peft_out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(peft_out / "base")
    assert saved(peft_out / "base")[0] == "bfloat16"
    adapter = load_file(str(peft_out / "adapter_model.safetensors"))
    assert adapter and all(v.dtype == torch.float32 for v in adapter.values())


def merged_reference(model: HFVLM, base: Path, dtype: torch.dtype, dequantize: bool):
    """The family class on `base` in `dtype`, each LoRA layer's weight replaced by its base's
    (the NF4 weight dequantized, or the base directory's full-precision one) plus the
    adapter's product, the connector the model's: the merge, computed apart from fastvlm."""
    ref = type(model.hf).from_pretrained(base, dtype=dtype).eval()
    state = ref.state_dict()
    connector = re.compile(model.GROUP_PATTERNS["connector"])
    with torch.no_grad():
        for name, layer in lora_layers(model.hf).items():
            weight = state[f"{name}.weight"]
            if dequantize:
                weight.copy_(dequantized_weight(layer.base_layer))
            weight.add_((layer.lora_B.to(dtype) @ layer.lora_A.to(dtype)) * layer.scaling)
        for name, p in model.hf.named_parameters():
            if connector.fullmatch(f"model.{name}"):
                state[name].copy_(p)
    return ref


def test_qlora_stage_exports(image, tmp_path, seed):
    """Gemma 3 (a bfloat16 base, as released) with a QLoRA decoder in a bf16 stage
    (bitsandbytes NF4 on CPU): --format hf is the dequantized base plus the adapters,
    --format peft the adapters on the full-precision base, model.path (the stage's frozen
    weights, cast to bf16, are still the base's). Compared in float32 (the trained model runs
    no float64: the references are the merges, computed in float64 apart from fastvlm)."""
    base = bf16_base("gemma3", tmp_path / "base")
    model = fake_run(base, tmp_path / "run", seed, finetune="qlora")
    assert all(layer.quantized for layer in lora_layers(model.hf).values())
    inputs = prompt_inputs(AutoProcessor.from_pretrained(base), image)
    outputs = {"hf": export(tmp_path / "run", tmp_path / "hf", "hf", dtype=torch.float32),
               "peft": export(tmp_path / "run", tmp_path / "peft", "peft")}
    exported = AutoModelForImageTextToText.from_pretrained(outputs["hf"]).eval()
    adapted, config = peft_model(outputs["peft"], torch.float32)
    assert config["base_model_name_or_path"] == str(base.resolve())
    for name, got, dequantize in (("hf", exported, True), ("peft", adapted, False)):
        ref64 = logits(merged_reference(model, base, torch.float64, dequantize), inputs, torch.float64)
        assert_close(logits(got, inputs), ref64, logits(merged_reference(model, base, torch.float32, dequantize),
                                                        inputs), name=f"{name} logits")
