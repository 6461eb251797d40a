"""A Hugging Face VLM run's setup (model.source = "hf"): the model loaded in its stored dtype
and cast by each stage as a float32 load was, the run's processor (pixel budget, chat
template) the one every consumer and saved copy uses, the dry run's precision taken from
the recipe rather than the host, the tower's default LoRA targets per family."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from fastvlm.integrations.hf_load import config_dtype, stored_dtype
from fastvlm.integrations.hf_trainable import HFVLM, layer_list
from fastvlm.integrations.transformers import patch
from fastvlm.nn.lora import LoRALinear, dequantized_weight
from fastvlm.train import build, hf_build, hf_evaluation
from fastvlm.train.dryrun import hf_dry_run, hf_model_on_meta
from fastvlm.train.export import export
from fastvlm.train.hf_build import RunProcessor, shape_hf_stage
from fastvlm.train.hf_export import base_dtype
from fastvlm.train.precision import is_norm
from fastvlm.train.recipe import parse_recipe
from fastvlm.train.stage_data import prepare_data
from fastvlm.train.trainer import train
from tests import hf_patch_models as H
from tests import hf_processors as P
from tests.test_hf_train import SIZES, raw_recipe, records

BUDGET = {"min_pixels": 28 * 28, "max_pixels": 84 * 84}  # the processor's own: 56 * 56 .. 112 * 112


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Images, a data file, a tiny Qwen2-VL saved in float32 and the same one saved in bf16."""
    root = tmp_path_factory.mktemp("hfsetup")
    P.write_images(root / "img", SIZES, seed=0)
    (root / "train.json").write_text(json.dumps(records()))
    P.save_family("qwen2_vl", 0, root / "qwen2_vl")
    save_bf16(root / "qwen2_vl", root / "qwen2_vl_bf16")
    return root


def save_bf16(src, out):
    """The checkpoint of `src` (model and processor) with its weights stored in bf16."""
    AutoModelForImageTextToText.from_pretrained(src).to(torch.bfloat16).save_pretrained(out)
    AutoProcessor.from_pretrained(src).save_pretrained(out)
    return out


def recipe_for(root, path, *stages, precision="bf16", **data):
    raw = raw_recipe(root)
    raw["model"]["path"] = str(path)
    raw["data"].update(data)
    raw["stages"] = [{**raw["stages"][i], "precision": precision} for i in stages]
    return parse_recipe(raw)


def loaded_bytes(monkeypatch) -> list:
    """Records (dtype, parameter bytes) of each model build_hf_model loads."""
    seen, load = [], hf_build.load_patched

    def spy(path, dtype, **options):
        model = load(path, dtype, **options)
        seen.append((dtype, sum(p.numel() * p.element_size() for p in model.parameters())))
        return model
    monkeypatch.setattr(hf_build, "load_patched", spy)
    return seen


def stage_state(recipe, loaded_in=None) -> dict:
    """{name: tensor} of the model (parameters, buffers, NF4 bases dequantized, with their
    quantization dtype) as recipe's last stage starts on CPU, bf16 native; `loaded_in`: the
    dtype build_hf_model loads in instead of the stored one (float32: the previous code's)."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(build, "bf16_supported", lambda device: True)
        if loaded_in is not None:
            m.setattr(hf_build, "stored_dtype", lambda path: loaded_in)
        torch.manual_seed(0)  # the adapters' initialisation
        model = build.build_model(recipe, None, 0)
        for stage in recipe.stages[:-1]:
            build.prepare_stage(model, stage, recipe, torch.device("cpu"))
            build.finish_stage(model, stage)
        build.prepare_stage(model, recipe.stages[-1], recipe, torch.device("cpu"))
    state = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()}
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear) and layer.quantized:
            state[f"{name}.nf4"] = dequantized_weight(layer.base_layer)
            state[f"{name}.nf4_dtype"] = torch.tensor(layer.base_layer.weight.quant_state.dtype == torch.float32)
    return state


@pytest.mark.parametrize("stages", [(0, 1), (1,)], ids=["align-then-lora", "lora-first"])
def test_a_bf16_checkpoint_loads_in_bf16_and_stages_cast_it_as_a_float32_load(root, monkeypatch, stages):
    """A checkpoint stored in bf16 loads in bf16 (the parameter bytes at load are bf16's); as
    the stage starts, what it freezes is bf16 (its stored values) and what it trains float32
    (the stored values upcast): every parameter and buffer equal, dtype and value, to the
    previous code's, which loaded the checkpoint in float32."""
    seen = loaded_bytes(monkeypatch)
    recipe = recipe_for(root, root / "qwen2_vl_bf16", *stages)
    state = stage_state(recipe)
    # the stored values, by transformers' own loading (Qwen2-VL's files hold older key names)
    stored = dict(HFVLM(hf_build.load_patched(root / "qwen2_vl_bf16", torch.bfloat16)).named_parameters())
    assert {p.dtype for p in stored.values()} == {torch.bfloat16}
    assert seen[0] == (torch.bfloat16, 2 * sum(p.numel() for p in stored.values()))
    before = stage_state(recipe, loaded_in=torch.float32)
    assert state.keys() == before.keys()
    for name, value in state.items():
        assert value.dtype == before[name].dtype and torch.equal(value, before[name]), name
    model = build.build_model(recipe, None, 0)
    monkeypatch.setattr(build, "bf16_supported", lambda device: True)
    build.prepare_stage(model, recipe.stages[0], recipe, torch.device("cpu"))
    modules = dict(model.named_modules())
    trained = frozen = 0
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        owner = modules[name.rpartition(".")[0]]
        want = torch.float32 if p.requires_grad or is_norm(owner) else torch.bfloat16
        assert p.dtype == want and torch.equal(p, stored[name.replace(".base_layer.", ".")].to(want)), name
        trained, frozen = trained + p.requires_grad, frozen + (want == torch.bfloat16)
    assert trained and frozen


def test_a_float32_checkpoint_loads_as_before(root, monkeypatch):
    seen = loaded_bytes(monkeypatch)
    assert stored_dtype(root / "qwen2_vl") == torch.float32
    build.build_model(recipe_for(root, root / "qwen2_vl", 0), None, 0)
    assert [dtype for dtype, _ in seen] == [torch.float32]


def test_stored_dtype_reads_the_weights_then_the_config(root, tmp_path):
    assert stored_dtype(root / "qwen2_vl_bf16") == torch.bfloat16
    config = json.loads((root / "qwen2_vl" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    assert stored_dtype(tmp_path) == torch.bfloat16  # no weights: the config's
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "dtype"}))
    assert stored_dtype(tmp_path) == torch.float32  # nothing says: float32
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(2, dtype=torch.bfloat16), "b": torch.zeros(2, dtype=torch.float16),
               "i": torch.zeros(2, dtype=torch.int64)}, tmp_path / "model.safetensors")
    assert stored_dtype(tmp_path) == torch.float32  # mixed: one that holds both exactly


def test_config_dtype_names_as_transformers_writes_them(root, tmp_path):
    """"bfloat16" or "torch.bfloat16", under dtype or torch_dtype, at the top or in the text
    config: one reading for the load (stored_dtype) and the export (base_dtype); a name that
    is not a float dtype is an error for the export, float32 for the load."""
    assert config_dtype({"torch_dtype": "torch.float16"}) == torch.float16
    assert config_dtype({"text_config": {"dtype": "bfloat16"}}) == torch.bfloat16
    assert config_dtype({"vision_config": {"dtype": "bfloat16"}}) is None
    with pytest.raises(ValueError, match="'int8' is not one of"):
        config_dtype({"dtype": "int8"})
    config = json.loads((root / "qwen2_vl" / "config.json").read_text())
    config.pop("dtype", None)
    (tmp_path / "config.json").write_text(json.dumps({**config, "torch_dtype": "torch.bfloat16"}))
    assert stored_dtype(tmp_path) == torch.bfloat16
    recipe = recipe_for(root, tmp_path, 0)
    assert base_dtype(recipe) == torch.bfloat16
    (tmp_path / "config.json").write_text(json.dumps({**config, "dtype": "int8"}))
    assert stored_dtype(tmp_path) == torch.float32
    with pytest.raises(ValueError, match=r"model.path: .*config.json names dtype 'int8'.*pass --dtype"):
        base_dtype(recipe)


@pytest.mark.parametrize("name", list(H.FAMILIES))
def test_buffers_of_a_bf16_load_are_a_float32_loads(name, tmp_path, seed):
    """Floating buffers (RoPE frequencies, Gemma's embed_scale) after build_hf_model's load of
    a bf16 checkpoint: float32, equal to a float32 load's (Gemma's sqrt(hidden) exact, not
    rounded to bf16)."""
    H.build(name, seed).to(torch.bfloat16).save_pretrained(tmp_path)
    raw = raw_recipe(tmp_path)
    raw["model"]["path"] = str(tmp_path)
    model = hf_build.build_hf_model(parse_recipe(raw))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = dict(hf_build.load_patched(tmp_path, torch.float32).named_buffers())
    buffers = {n.partition(".")[2]: b for n, b in model.named_buffers() if b.is_floating_point()}
    assert buffers and buffers.keys() <= reference.keys()
    for key, value in buffers.items():
        assert value.dtype == torch.float32 and torch.equal(value, reference[key]), key


def test_qlora_as_the_first_stage_quantizes_a_bf16_checkpoint_as_a_float32_load(root):
    """A QLoRA first stage quantizes from float32 (exact from bf16): the NF4 bases and their
    quantization dtype (what merges and exports read) are the previous code's."""
    raw = raw_recipe(root)
    raw["model"]["path"] = str(root / "qwen2_vl_bf16")
    raw["stages"] = [{**raw["stages"][1], "finetune": "qlora", "precision": "bf16", "checkpointing": {}}]
    recipe = parse_recipe(raw)
    state, before = stage_state(recipe), stage_state(recipe, loaded_in=torch.float32)
    assert any(k.endswith(".nf4") for k in state) and state.keys() == before.keys()
    for name, value in state.items():
        assert value.dtype == before[name].dtype and torch.equal(value, before[name]), name


# ---- the dry run ------------------------------------------------------------------------------
def dry_run_stage(root, path, device: str, host_bf16: bool, monkeypatch):
    """(precision, {dtype of the frozen weights}) of the dry run's model as a bf16 align stage
    starts, for `device` as run.device, on a host with or without bf16."""
    recipe = recipe_for(root, path, 0)
    recipe.run.device = device
    monkeypatch.setattr(build, "bf16_supported", lambda d: host_bf16)
    model = hf_model_on_meta(recipe)
    mp = build.prepare_stage(model, recipe.stages[0], recipe, torch.device("meta"))["precision"]
    modules = dict(model.named_modules())
    return mp.precision, {p.dtype for n, p in model.named_parameters()
                          if not p.requires_grad and not is_norm(modules[n.rpartition(".")[0]])}


@pytest.mark.parametrize("path", ["qwen2_vl", "qwen2_vl_bf16"])
def test_dry_run_precision_is_the_recipes_not_the_hosts(root, monkeypatch, path):
    """A bf16 recipe's dry run for a GPU (run.device cuda or auto) is in bf16 (frozen weights
    in bf16) whether or not this host's CPU has bf16; for run.device = cpu, the host decides
    (fp32 without it)."""
    for device in ("cuda", "auto"):
        for host in (False, True):
            assert dry_run_stage(root, root / path, device, host, monkeypatch) == ("bf16", {torch.bfloat16})
    assert dry_run_stage(root, root / path, "cpu", False, monkeypatch) == ("fp32", {torch.float32})
    assert dry_run_stage(root, root / path, "cpu", True, monkeypatch) == ("bf16", {torch.bfloat16})


def test_dry_run_models_the_load_in_the_stored_dtype(root):
    """The dry run's model is built in the dtype the run loads the checkpoint in, and says so."""
    for path, dtype in (("qwen2_vl_bf16", torch.bfloat16), ("qwen2_vl", torch.float32)):
        recipe = recipe_for(root, root / path, 0)
        assert {p.dtype for p in hf_model_on_meta(recipe).parameters()} == {dtype}
        assert f" parameters, loaded in {str(dtype).removeprefix('torch.')} (" in hf_dry_run(recipe)


# ---- the run's processor ------------------------------------------------------------------------
def image_tokens(ids: torch.Tensor) -> int:
    return int((ids == H.IMAGE).sum())


@pytest.fixture(scope="module")
def budget_run(root, tmp_path_factory):
    """(recipe, run directory) of one align step with data.min_pixels / max_pixels set."""
    recipe = parse_recipe(raw_recipe(root, steps=1), [f"data.{k}={v}" for k, v in BUDGET.items()])
    recipe.stages = recipe.stages[:1]
    run = tmp_path_factory.mktemp("budget") / "run"
    train(recipe, run, progress=False, echo=lambda *a: None)
    return recipe, run


def test_the_pixel_budget_is_in_every_saved_processor(budget_run, tmp_path):
    """final/tokenizer and an export carry the recipe's pixel budget (loaded back, a large image
    gives the budgeted number of image tokens: 84 x 84 pixels, 3 x 3 merged patches)."""
    recipe, run = budget_run
    out = export(run, tmp_path / "hf", "hf")
    big = Image.new("RGB", (448, 448))
    for saved in (run / "final" / "tokenizer", out):
        processor = AutoProcessor.from_pretrained(saved)
        size = processor.image_processor.size
        assert (size["shortest_edge"], size["longest_edge"]) == (BUDGET["min_pixels"], BUDGET["max_pixels"]), saved
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False)
        assert image_tokens(processor(text=[text], images=[big], return_tensors="pt")["input_ids"]) == 9, saved


def test_evaluation_renders_with_the_pixel_budget(budget_run, root, tmp_path, monkeypatch):
    """Generation's inputs and the validation loss's batches of a large image hold the budgeted
    number of image tokens (9), not the processor's default (16 at 112 x 112)."""
    recipe, run = budget_run
    processor = prepare_data(recipe, run, write=False).tokenizer
    Image.new("RGB", (448, 448)).save(tmp_path / "big.png")
    model = HFVLM.from_pretrained(run / "final").eval()
    prompt = hf_evaluation.prompt_text(processor, [{"from": "human", "value": "<image>\nWhat?"}])
    inputs = hf_evaluation.processor_inputs(model, processor, [prompt], [[Image.open(tmp_path / "big.png")]])
    assert image_tokens(inputs["input_ids"]) == 9
    batches, collate = [], hf_evaluation.HFPaddedCollator

    def spy(pad):
        inner = collate(pad)
        return lambda items: batches.append(inner(items)) or batches[-1]
    monkeypatch.setattr(hf_evaluation, "HFPaddedCollator", spy)
    sample = {"id": "big", "image": "big.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                                  {"from": "gpt", "value": "A square."}]}
    (tmp_path / "val.json").write_text(json.dumps([sample]))
    from fastvlm.data.formats import read_samples
    hf_evaluation.hf_validation_loss(model, processor, read_samples(tmp_path / "val.json"), image_root=tmp_path)
    assert [image_tokens(b["input_ids"]) for b in batches] == [9]


def test_a_processor_without_a_chat_template_is_refused_before_the_model_loads(root, tmp_path, monkeypatch):
    bare = P.save_family("qwen2_vl", 0, tmp_path / "bare", chat_template=False)
    (bare / "model.safetensors").unlink()

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the processor was refused")
    monkeypatch.setattr(hf_build, "load_patched", no_load)
    recipe = recipe_for(root, bare, 0)
    with pytest.raises(ValueError, match=r"^model.path: the processor in .*bare has no chat template; set "
                                         r"data.chat_template"):
        train(recipe, tmp_path / "run", progress=False, echo=lambda *a: None)
    (tmp_path / "t.jinja").write_text(P.QWEN_TEMPLATE)
    given = recipe_for(root, bare, 0, chat_template=str(tmp_path / "t.jinja"))
    assert RunProcessor.of_recipe(given).chat_template == P.QWEN_TEMPLATE


# ---- the tower's LoRA targets ---------------------------------------------------------------------
def vision_lora_stage(root, **lora):
    raw = raw_recipe(root)
    raw["stages"] = [{**raw["stages"][1], "lr": {"connector": 1e-2, "llm": 1e-2, "vision": 1e-3},
                      "lora": {"r": 4, "alpha": 8, "targets": "q_proj,v_proj", "vision_blocks": 1, **lora}}]
    return parse_recipe(raw).stages[0]


@pytest.mark.parametrize("name", list(H.FAMILIES))
def test_default_vision_targets_are_the_familys_tower_linears(root, name, seed):
    """lora.vision_targets left at its default: LoRA on every Linear of the tower's last layer,
    whatever the family calls them (Qwen2.5-VL: qkv, proj, gate / up / down_proj)."""
    model = HFVLM(patch(H.build(name, seed)))
    _, layers = layer_list(model.vision_tower)
    linears = {id(m) for m in layers[-1].modules() if isinstance(m, torch.nn.Linear)}
    shape_hf_stage(model, vision_lora_stage(root))
    adapted = {id(m.base_layer) for m in model.vision_tower.modules() if isinstance(m, LoRALinear)}
    assert adapted == linears


def test_vision_targets_naming_no_tower_linear_are_refused(root, seed):
    model = HFVLM(patch(H.build("qwen2_5_vl", seed)))
    with pytest.raises(ValueError, match=r"^lora.vision_targets: fc1 name\(s\) no Linear of "
                                         r"Qwen2_5_VLForConditionalGeneration's vision tower layers; their "
                                         r"Linears are qkv, proj, gate_proj, up_proj, down_proj$"):
        shape_hf_stage(model, vision_lora_stage(root, vision_targets="qkv,fc1"))
