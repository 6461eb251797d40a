"""A QLoRA stage in the trainer, one process: it trains to the end (the adapters folded into
the dequantized base, so the final model is a plain one), resumes mid-stage with the losses
of an uninterrupted run bit for bit (its checkpoints hold no NF4 weight: the base is
re-quantized from the weights the stage found, kept because an earlier stage trained them),
and a mid-stage checkpoint loads for inference with the trained base and adapters."""
import shutil

import pytest
import torch

from fastvlm.models.vlm import VLM
from fastvlm.nn.lora import LoRALinear
from fastvlm.train import checkpoint as ckpt
from fastvlm.train.export import load_for_inference
from fastvlm.train.quant import dequantized_weight, merge_quantized, to_nf4
from fastvlm.train.recipe import parse_recipe
from fastvlm.train.trainer import train

from .dist_launch import losses
from .train_recipes import tiny_raw

STEPS = 3


def qlora_recipe():
    """lm (trains the LLM, so the QLoRA stage's base is not the starting model's) then QLoRA."""
    raw = tiny_raw(steps=STEPS, checkpoint_every=1)
    raw["run"].update(evaluate=False)
    lm, instruct = (s for s in raw["stages"] if s["type"] in ("lm", "instruct"))
    instruct.update(finetune="qlora", precision="bf16")
    instruct["lora"]["targets"] = "q_proj,v_proj,down_proj"
    raw["stages"] = [lm, instruct]
    return parse_recipe(raw)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora") / "run"
    result = train(qlora_recipe(), out, progress=False, echo=lambda *a: None)
    return out, result


def test_qlora_stage_ends_in_a_plain_model(finished):
    out, result = finished
    model = result["model"]
    assert not any(isinstance(m, LoRALinear) for m in model.modules()) and model.language_model.lora_config is None
    saved = VLM.from_pretrained(out / "final")
    for k, v in model.state_dict().items():
        assert torch.equal(saved.state_dict()[k], v), k
    names = {p.name for p in (out / "checkpoints").iterdir()}
    assert "s01-instruct-nf4-source.safetensors" in names
    last = ckpt.complete_checkpoints(out / "checkpoints")[-1]
    from safetensors.torch import load_file

    stored = load_file(str(last / "model.safetensors"))
    assert not any(k.endswith("base_layer.weight") or ".weight." in k for k in stored if "q_proj" in k), \
        "a QLoRA checkpoint holds NF4 weights"
    assert any(k.endswith("q_proj.lora_B") for k in stored)


def test_resume_mid_qlora_stage_is_bit_exact(finished, tmp_path):
    out, _ = finished
    expected = losses(out)
    resumed = tmp_path / "run"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "final")
    for c in ckpt.complete_checkpoints(resumed / "checkpoints")[-(STEPS - 1):]:
        shutil.rmtree(c)  # as if killed right after the QLoRA stage's first checkpoint
    assert ckpt.complete_checkpoints(resumed / "checkpoints")[-1].name == "s01-instruct-step0000001"
    train(qlora_recipe(), resumed, resume=True, progress=False, echo=lambda *a: None)
    assert losses(resumed) == expected

    (resumed / "checkpoints" / "s01-instruct-nf4-source.safetensors").unlink()
    for c in ckpt.complete_checkpoints(resumed / "checkpoints")[-(STEPS - 1):]:
        shutil.rmtree(c)
    with pytest.raises(ValueError, match=r"--resume: .*s01-instruct-nf4-source\.safetensors is missing"):
        train(qlora_recipe(), resumed, resume=True, progress=False, echo=lambda *a: None)


def test_mid_stage_checkpoint_loads_for_inference(finished, tmp_path):
    """The last QLoRA checkpoint, loaded, holds the NF4 base and adapters the stage ended with:
    folding it gives the final model's weights exactly."""
    out, result = finished
    last = ckpt.complete_checkpoints(out / "checkpoints")[-1]
    model, _, _ = load_for_inference(last)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert layers and all(m.quantized for m in layers.values())
    final = result["model"].state_dict()
    for name, layer in layers.items():
        merged = merge_quantized(layer)
        assert torch.equal(merged.weight, final[f"{name}.weight"]), name


def test_peft_export_of_a_qlora_run_holds_its_adapters(finished, tmp_path):
    from safetensors.torch import load_file

    from fastvlm.train.export import export

    out, _ = finished
    exported = export(out, tmp_path / "peft", "peft")
    adapter = load_file(str(exported / "adapter_model.safetensors"))  # PEFT's, for LlavaForConditionalGeneration
    stored = load_file(str(ckpt.complete_checkpoints(out / "checkpoints")[-1] / "model.safetensors"))
    trained = {k: v for k, v in stored.items() if k.startswith("language_model.") and ".lora_B" in k}
    assert trained and len([k for k in adapter if "lora_B" in k]) == len(trained)
    assert all(v.abs().sum() > 0 for v in trained.values()), "the adapters did not train"
    assert sorted(v.sum().item() for k, v in adapter.items() if "lora_B" in k) == \
        sorted(v.sum().item() for v in trained.values())


def test_merge_quantized_is_dequantized_base_plus_adapter(seed):
    base = torch.nn.Linear(96, 40, bias=True)
    layer = LoRALinear(to_nf4(base, torch.bfloat16), r=4, alpha=8.0)
    torch.nn.init.normal_(layer.lora_B)
    merged = merge_quantized(layer)
    exact = (dequantized_weight(layer.base_layer).double()
             + (layer.lora_B.double() @ layer.lora_A.double()) * layer.scaling)
    # The fp32 sum rounds once; the rank-4 product's error is below r roundings of sum_k |B_ik A_kj|
    # (its terms may cancel), the scaling once more.
    terms = (layer.lora_B.double().abs() @ layer.lora_A.double().abs()) * layer.scaling
    bound = 2 * torch.finfo(torch.float32).eps * (exact.abs() + (layer.r + 1) * terms)
    assert merged.weight.dtype == torch.float32 and not merged.weight.requires_grad
    assert ((merged.weight.double() - exact).abs() <= bound).all()
    assert torch.equal(merged.bias, layer.base_layer.bias.float())
