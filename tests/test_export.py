"""Export: fastvlm -> HF LLaVA with the same logits (LoRA merged), tokenizer and processor
files transformers loads, PEFT adapters + connector, native directory; refusals."""
import copy
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fastvlm.models.hf_export import merged_state_dict, to_hf_llava
from fastvlm.models.llm import LLMConfig
from fastvlm.models.preprocess import ImagePreprocessor
from fastvlm.models.vision import VisionConfig
from fastvlm.models.vlm import VLM, VLMConfig
from fastvlm.train.export import export_model
from fastvlm.train.lora import apply_lora, lora_layers
from tests.utils import assert_close

transformers = pytest.importorskip("transformers")
IMG = 7  # image token id


def _config(family="clip", llm="llama", vision_options=None, **options):
    vision = {"clip": VisionConfig.clip, "siglip": VisionConfig.siglip, "dinov2": VisionConfig.dinov2}[family](
        image_size=28, patch_size=14, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64,
        **(vision_options or {}))
    bias = {"llama": {}, "qwen2": {"qkv_bias": True}, "llama_bias": {"qkv_bias": True, "o_bias": True,
                                                                     "mlp_bias": True},
            # sliding windows shorter than the rows: Mistral's (every layer), Qwen2's (its last layer)
            "mistral": {"sliding_window": 3}, "qwen2_window": {"qkv_bias": True, "sliding_window": 4,
                                                               "sliding_layers": [1]}}[llm]
    text = LLMConfig(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0, **bias)
    return VLMConfig(vision=vision, llm=text, image_token_id=IMG, **options)


def _random_model(cfg, lora=True):
    """Every parameter random (norms around 1, biases nonzero), LoRA B nonzero, so no mapping slip hides."""
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    model = VLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") or name.endswith("scale"):
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    if lora:
        apply_lora(model.language_model, "q_proj,v_proj,down_proj", r=4, alpha=8)
        apply_lora(model.vision_tower, "fc1", r=2, alpha=4)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.05)
    return model.eval()


def _batch(model):
    t, img = model.image_tokens, model.config.image_token_id
    row1 = [5, 6] + [img] * t + [8, 9, 10]
    row2 = [img] * t + [11, 12]
    n = max(len(row1), len(row2))
    ids = torch.tensor([row1 + [0] * (n - len(row1)), row2 + [0] * (n - len(row2))])
    mask = torch.tensor([[1] * len(row1) + [0] * (n - len(row1)), [1] * len(row2) + [0] * (n - len(row2))])
    return ids, mask, torch.randn(2, 3, 28, 28)


def _hf_logits(path, ids, mask, pixels):
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits


@pytest.mark.parametrize("family,llm,options", [
    ("clip", "llama", {}),
    ("siglip", "qwen2", {"vision_feature": "full"}),
    ("dinov2", "llama_bias", {}),
    ("dinov2", "llama", {"vision_feature": "full",
                         "vision_options": {"num_register_tokens": 2, "interpolate_antialias": True}}),
    ("clip", "llama", {"connector": "multilevel", "select_layers": [-3, -1], "vision_feature": "full"}),
    ("clip", "mistral", {}),
    ("siglip", "qwen2_window", {}),
])
def test_hf_llava_logits_match(family, llm, options, tmp_path, seed):
    model = _random_model(_config(family, llm, **options))
    ids, mask, pixels = _batch(model)
    export_model(model, tmp_path, "hf-llava")
    got = _hf_logits(tmp_path, ids, mask, pixels)
    with torch.no_grad():
        base32 = model(ids, pixels, attention_mask=mask)  # LoRA unmerged: adapters run as trained
        ref64 = model.double()(ids, pixels.double(), attention_mask=mask)
    live = mask.bool()
    assert_close(got[live], ref64[live], base32[live], name="HF logits")


@pytest.mark.parametrize("family,llm", [("clip", "llama"), ("siglip", "qwen2"), ("dinov2", "llama_bias")])
def test_every_weight_is_loaded(family, llm, tmp_path, seed):
    """transformers loads each exported tensor and leaves none of its own to random init."""
    model = _random_model(_config(family, llm))
    export_model(model, tmp_path, "hf-llava")
    _, info = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert any("lora_A" in k for k in model.state_dict())  # the live model is untouched: LoRA unmerged


def test_image_token_past_the_vocabulary(tmp_path, seed):
    """Vicuna's case: the tokenizer added <image> as id 32000 of a 32000-token LLM."""
    cfg = _config()
    cfg.image_token_id = cfg.llm.vocab_size
    model = _random_model(cfg)
    ids, mask, pixels = _batch(model)
    export_model(model, tmp_path, "hf-llava")
    got = _hf_logits(tmp_path, ids, mask, pixels)
    assert got.shape[-1] == cfg.llm.vocab_size + 1
    with torch.no_grad():
        base32 = model(ids, pixels, attention_mask=mask)
        ref64 = model.double()(ids, pixels.double(), attention_mask=mask)
    live = mask.bool()
    assert_close(got[live][:, :-1], ref64[live], base32[live], name="HF logits")
    assert bool((got[live][:, -1] == 0).all())  # the added row is zero ...
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == [cfg.llm.vocab_size]  # ... and never generated


def test_qlora_model_exports_its_dequantized_weights(tmp_path, seed):
    """NF4 bases: the export holds the weights the model multiplies by (dequantized + s·BA)."""
    pytest.importorskip("bitsandbytes")
    from fastvlm.train.quant import apply_qlora, dequantized_weight

    model = _random_model(_config(), lora=False)
    apply_qlora(model.language_model, "q_proj,v_proj,down_proj", r=4, alpha=8, compute_dtype="fp32")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    q = model.language_model.model.layers[1].self_attn.q_proj
    merged = merged_state_dict(model.language_model)["model.layers.1.self_attn.q_proj.weight"]
    torch.testing.assert_close(merged, dequantized_weight(q.base_layer).float() + q.delta_weight(), rtol=0, atol=0)
    ids, mask, pixels = _batch(model)
    export_model(model, tmp_path, "hf-llava", dtype=torch.float32)
    got = _hf_logits(tmp_path, ids, mask, pixels)
    plain = VLM(model.config)
    plain.load_state_dict(merged_state_dict(model))
    with torch.no_grad():
        # bitsandbytes' own NF4 matmul in fp32 (train mode: its CPU inference path repacks
        # weights and needs widths divisible by its block; dropout is 0, so the outputs are the eval ones)
        base32 = model.train()(ids, pixels, attention_mask=mask)
        ref64 = plain.double().eval()(ids, pixels.double(), attention_mask=mask)
    live = mask.bool()
    assert_close(got[live], ref64[live], base32[live], name="HF logits of a QLoRA model")


def test_merged_state_dict_equals_merge(seed):
    model = _random_model(_config())
    merged = merged_state_dict(model.language_model)
    q = model.language_model.model.layers[0].self_attn.q_proj
    want = q.base_layer.weight + q.delta_weight()
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], want)
    assert not any("lora_" in k or "base_layer" in k for k in merged)


def test_tokenizer_and_processor_load_in_transformers(tmp_path, seed):
    from fastvlm.data import train_bpe_tokenizer

    texts = ["what color is the square", "how many circles are there", "the red one is left of the blue one"] * 4
    tok = train_bpe_tokenizer(texts, vocab_size=300, min_frequency=1)
    cfg = _config()
    cfg.image_token_id = tok.image_token_id
    model = _random_model(cfg)
    pre = ImagePreprocessor.for_family("clip", 28)
    export_model(model, tmp_path, "hf-llava", tokenizer=tok, preprocessor=pre)

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "how many circles"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)[0]
    # backend="pil": the pixels training saw (the torchvision backend resamples differently)
    processor = transformers.AutoProcessor.from_pretrained(tmp_path, backend="pil")
    assert type(processor).__name__ == "LlavaProcessor"
    image = Image.fromarray((np.random.default_rng(seed).random((40, 52, 3)) * 255).astype(np.uint8))
    inputs = processor(text=f"{tok.image_token} how many circles", images=[image], return_tensors="pt")
    pixels = pre([image])
    torch.testing.assert_close(inputs["pixel_values"], pixels, rtol=0, atol=0)
    ids = inputs["input_ids"]
    assert int((ids == tok.image_token_id).sum()) == model.image_tokens
    want_ids = [tok.image_token_id] * model.image_tokens + tok.encode(" how many circles")[0]
    assert ids[0].tolist()[-len(want_ids):] == want_ids
    got = _hf_logits(tmp_path, ids, inputs["attention_mask"], inputs["pixel_values"])
    with torch.no_grad():
        base32 = model(ids, pixels)
        ref64 = model.double()(ids, pixels.double())
    assert_close(got, ref64, base32, name="HF logits from the processor's inputs")


def test_fastvlm_format(tmp_path, seed):
    model = _random_model(_config())
    ids, mask, pixels = _batch(model)
    with torch.no_grad():
        want = model(ids, pixels, attention_mask=mask)
    export_model(model, tmp_path / "native", "fastvlm")
    native = VLM.from_pretrained(tmp_path / "native").eval()
    assert not any("lora" in k for k in native.state_dict())
    with torch.no_grad():
        got = native(ids, pixels, attention_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _peft_config(out):
    return json.loads((out / "adapter_config.json").read_text())


def _assert_peft_logits(model, peft_model, ids, mask, pixels, name):
    """The PEFT model's logits (adapters active) within a few times fastvlm's own fp32 error
    of the float64 truth (fastvlm's model with its adapters unmerged)."""
    with torch.no_grad():
        got = peft_model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        base32 = model(ids, pixels, attention_mask=mask)
        ref64 = copy.deepcopy(model).double()(ids, pixels.double(), attention_mask=mask)
    live = mask.bool()
    assert_close(got[live], ref64[live], base32[live], name=name)


@pytest.mark.parametrize("options", [{}, {"connector": "multilevel", "select_layers": [-3, -1],
                                          "vision_feature": "full"}], ids=["mlp", "multilevel"])
def test_peft_export_loads_onto_transformers_llava(tmp_path, seed, options):
    """Issue 23 item 5: LLM and vision-tower LoRA (other ranks: rank_pattern) and the connector
    (either kind HF LLaVA holds) load onto LlavaForConditionalGeneration with fastvlm's logits;
    with no HF base given, the base is written beside the adapter and named."""
    from tests.llava_models import peft_load

    model = _random_model(_config(**options))
    ids, mask, pixels = _batch(model)
    out = tmp_path / "peft"
    export_model(model, out, "peft", trained=("multi_modal_projector",))
    cfg = _peft_config(out)
    assert cfg["base_model_name_or_path"] == str((out / "base").resolve())
    assert cfg["modules_to_save"] == ["model.multi_modal_projector"]
    assert cfg["rank_pattern"] and all("vision_tower" in k for k in cfg["rank_pattern"])
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(cfg["base_model_name_or_path"],
                                                                    dtype=torch.float32).eval()
    with torch.no_grad():
        plain = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    peft_model = peft_load(hf, out)
    injected = [n for n, _ in peft_model.named_modules() if n.endswith(".lora_A")]
    assert len(injected) == len(lora_layers(model)) == 2 * 3 + 3  # q, v, down per LLM layer; fc1 per vision block
    with torch.no_grad():
        got = peft_model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert (got - plain).abs().max() > 1e-2  # the adapter changes the logits
    _assert_peft_logits(model, peft_model, ids, mask, pixels, "PEFT logits")


def _adapted_llava(seed, directory):
    """A VLM from an HF LLaVA directory, LoRA put on as a LoRA stage does (per part), the
    adapters and the connector trained (perturbed)."""
    from tests.llava_models import llava_pair

    _, model = llava_pair(seed, directory)
    apply_lora(model.language_model, "q_proj,o_proj,gate_proj", r=4, alpha=8)
    apply_lora(model.vision_tower, r"blocks\.(1|2)\.(attn|mlp)\.(q_proj|fc2)", r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith("multi_modal_projector."):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_peft_export_names_the_hf_base_the_model_started_from(tmp_path, seed):
    """With an HF LLaVA base whose weights are still the model's base, the adapter names it
    (the retrained connector travels in modules_to_save); once an LLM weight has moved, the
    named base would be wrong, so the base is written beside the adapter instead."""
    from tests.llava_models import llava_batch, peft_load

    model = _adapted_llava(seed, tmp_path / "hf")
    ids, pixels = llava_batch()
    mask = torch.ones_like(ids)
    export_model(model, tmp_path / "a", "peft", base=tmp_path / "hf")
    cfg = _peft_config(tmp_path / "a")
    assert cfg["base_model_name_or_path"] == str((tmp_path / "hf").resolve())
    assert cfg["modules_to_save"] == ["model.multi_modal_projector"] and not (tmp_path / "a" / "base").exists()
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    _assert_peft_logits(model, peft_load(hf.eval(), tmp_path / "a"), ids, mask, pixels, "PEFT logits on its HF base")

    with torch.no_grad():
        model.language_model.model.norm.weight.mul_(1.5)
    export_model(model, tmp_path / "b", "peft", base=tmp_path / "hf")
    cfg = _peft_config(tmp_path / "b")
    assert cfg["base_model_name_or_path"] == str((tmp_path / "b" / "base").resolve())
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(cfg["base_model_name_or_path"],
                                                                    dtype=torch.float32)
    _assert_peft_logits(model, peft_load(hf.eval(), tmp_path / "b"), ids, mask, pixels, "PEFT logits, written base")


def test_failed_export_leaves_no_output_directory(tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapters"):
        export_model(VLM(_config()), tmp_path / "p", "peft")
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a temporary folder
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="out: .*not an empty directory"):
        export_model(VLM(_config()), tmp_path / "full", "fastvlm")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_refuses_what_hf_llava_cannot_express(tmp_path):
    for options, match in (({"connector": "resampler", "resampler_queries": 4}, "connector"),
                           ({"token_reduction": "avg_pool"}, "token_reduction"),
                           ({"connector": "multilevel", "select_layers": [-2, -1], "multilevel_mode": "sum"},
                            "multilevel_mode")):
        with pytest.raises(ValueError, match=match):
            to_hf_llava(VLM(_config(**options)))
    with pytest.raises(ValueError, match="allow_causal"):
        to_hf_llava(VLM(_config(attention_kind="mmca")))
    with pytest.warns(UserWarning, match="causal attention"):
        to_hf_llava(VLM(_config(attention_kind="image_bidirectional")), allow_causal=True)
    registers = _config("dinov2")
    registers.vision = registers.vision.replace(num_register_tokens=2)
    with pytest.raises(ValueError, match="prefix tokens"):
        to_hf_llava(VLM(registers))
    bad_bias = _config()
    bad_bias.llm.o_bias = True
    with pytest.raises(ValueError, match="o_proj bias"):
        to_hf_llava(VLM(bad_bias))
    for llm, match in (({"sliding_window": 3, "mlp_bias": True}, "sliding-window LLM with q/k/v or MLP biases"),
                       ({"sliding_window": 3, "sliding_layers": [0]}, "sliding_layers")):
        cfg = _config()
        cfg.llm = LLMConfig(**{**vars(cfg.llm), **llm})
        with pytest.raises(ValueError, match=match):
            to_hf_llava(VLM(cfg))
    cfg = _config("clip", "qwen2")
    cfg.llm = LLMConfig(**{**vars(cfg.llm), "sliding_window": 3, "sliding_layers": [0]})
    with pytest.warns(UserWarning, match="4.x would slide every layer from max_window_layers=0"):
        to_hf_llava(VLM(cfg))
    with pytest.raises(ValueError, match="format"):
        export_model(VLM(_config()), tmp_path / "x", "onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_hf_llava(VLM(_config()))  # a plain causal mlp model exports without a warning


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real run of the trainer (align + LoRA instruct on a tiny model, a few steps)."""
    from fastvlm.train.recipe import parse_recipe
    from fastvlm.train.trainer import train
    from tests.train_recipes import tiny_raw

    raw = tiny_raw(steps=2)
    raw["stages"] = raw["stages"][2:]
    raw["model"]["token_reduction"] = ""  # HF LLaVA feeds every patch token
    run = tmp_path_factory.mktemp("run") / "run"
    train(parse_recipe(raw), run, progress=False, echo=lambda *_: None)
    return run


def test_cli_exports_a_training_run(trained_run, tmp_path, seed):
    from fastvlm.cli import main
    from fastvlm.train.export import load_for_inference

    model, tok, _ = load_for_inference(trained_run)
    assert main(["export", str(trained_run), str(tmp_path / "hf"), "--format", "hf-llava"]) == 0
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    image = Image.fromarray((np.random.default_rng(seed).random((30, 40, 3)) * 255).astype(np.uint8))
    inputs = processor(text=f"{tok.image_token}\nQuestion: what colour is it?\nAnswer:", images=[image],
                       return_tensors="pt")
    got = _hf_logits(tmp_path / "hf", inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    with torch.no_grad():
        base32 = model(inputs["input_ids"], inputs["pixel_values"])
        ref64 = model.double()(inputs["input_ids"], inputs["pixel_values"].double())
    assert_close(got, ref64, base32, name="HF logits of the exported run")

    assert main(["export", str(trained_run), str(tmp_path / "native"), "--format", "fastvlm"]) == 0
    native = VLM.from_pretrained(tmp_path / "native")
    torch.testing.assert_close(native.state_dict(), VLM.from_pretrained(trained_run / "final").state_dict())
    # A bare model directory exports too, with the tokenizer found beside it.
    assert main(["export", str(trained_run / "final"), str(tmp_path / "hf2"), "--format", "hf-llava"]) == 0
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(tmp_path / "hf2" / "model.safetensors"),
                               load_file(tmp_path / "hf" / "model.safetensors"), rtol=0, atol=0)
    assert (tmp_path / "hf2" / "tokenizer.json").is_file() and (tmp_path / "hf2" / "processor_config.json").is_file()


def _newest_checkpoint(run):
    from fastvlm.train.checkpoint import complete_checkpoints

    return complete_checkpoints(run / "checkpoints")[-1]


@pytest.mark.parametrize("where", ["run", "final"])
def test_cli_peft_export_of_a_run_loads_onto_llava(trained_run, tmp_path, seed, where):
    """Issue 23 item 5 from a real run (tiny source: no HF base, so one is written): from RUN and
    from RUN/final, the adapter of the LoRA stage's last checkpoint, the connector it trained in
    modules_to_save; PeftModel and AutoPeftModel give the trained model's logits, and the
    processor in OUT renders the recipe's template."""
    from peft import AutoPeftModel

    from fastvlm.cli import main
    from fastvlm.data import encode_prompt
    from fastvlm.train.export import load_for_inference
    from tests.llava_models import peft_load

    model, tok, recipe = load_for_inference(_newest_checkpoint(trained_run))
    assert lora_layers(model)  # the LoRA stage's checkpoint: adapters unmerged
    out = tmp_path / "peft"
    assert main(["export", str(trained_run if where == "run" else trained_run / "final"), str(out),
                 "--format", "peft"]) == 0
    cfg = _peft_config(out)
    assert cfg["base_model_name_or_path"] == str((out / "base").resolve())
    assert cfg["modules_to_save"] == ["model.multi_modal_projector"]
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(out / "base", dtype=torch.float32).eval()
    peft_model = peft_load(hf, out)
    assert sum(n.endswith(".lora_A") for n, _ in peft_model.named_modules()) == len(lora_layers(model))

    processor = transformers.AutoProcessor.from_pretrained(out)
    turns = [{"from": "human", "value": "<image>\nwhat colour is it?"}]
    image = Image.fromarray((np.random.default_rng(seed).random((30, 40, 3)) * 255).astype(np.uint8))
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "what colour is it?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    ids = inputs["input_ids"]
    assert ids[0].tolist() == encode_prompt(turns, tok, recipe.data.template, model.image_tokens)
    mask, pixels = inputs["attention_mask"], inputs["pixel_values"]
    _assert_peft_logits(model, peft_model, ids, mask, pixels, "PEFT logits of the exported run")
    with peft_model.disable_adapter(), pytest.raises(AssertionError):  # the bound sees a missing adapter
        _assert_peft_logits(model, peft_model, ids, mask, pixels, "base logits")
    auto = AutoPeftModel.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(auto(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits,
                                   peft_model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits,
                                   rtol=0, atol=0)


def test_cli_export_of_a_missing_path_names_the_argument(tmp_path, capsys):
    """Issue 23 item 8: a clear error, no traceback, no output directory."""
    from fastvlm.cli import main

    assert main(["export", str(tmp_path / "no-such-run"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"fastvlm export: run: {tmp_path / 'no-such-run'} does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "fastvlm export: run: " in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_cli_peft_export_of_a_pretrained_run_names_its_hf_base(trained_run, tmp_path, seed):
    """A run started from an HF LLaVA directory (here the tiny run's hf-llava export): a LoRA
    stage that also trains the connector gives an adapter naming that directory as its base,
    the connector in modules_to_save, nothing written beside it, and the trained logits."""
    from fastvlm.cli import main
    from fastvlm.train.export import load_for_inference
    from fastvlm.train.recipe import parse_recipe
    from fastvlm.train.trainer import train
    from tests.llava_models import peft_load
    from tests.train_recipes import tiny_raw

    hf_dir = tmp_path / "hf"
    assert main(["export", str(trained_run), str(hf_dir), "--format", "hf-llava"]) == 0
    raw = tiny_raw(steps=2)
    raw["stages"] = raw["stages"][3:]  # the LoRA instruct stage (connector and LLM)
    raw["model"] = {"source": "pretrained", "path": str(hf_dir), "select_layer": -1}
    raw["run"]["evaluate"] = False
    run = tmp_path / "run"
    train(parse_recipe(raw), run, progress=False, echo=lambda *_: None)
    out = tmp_path / "peft"
    assert main(["export", str(run), str(out), "--format", "peft"]) == 0
    cfg = _peft_config(out)
    assert cfg["base_model_name_or_path"] == str(hf_dir.resolve()) and not (out / "base").exists()
    assert cfg["modules_to_save"] == ["model.multi_modal_projector"]
    model, tok, _ = load_for_inference(_newest_checkpoint(run))
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    peft_model = peft_load(hf, out)
    t, img = model.image_tokens, model.config.image_token_id
    ids = torch.tensor([[tok.bos_token_id] + [img] * t + tok.encode(" what colour is it?")[0]])
    _assert_peft_logits(model, peft_model, ids, torch.ones_like(ids), torch.randn(1, 3, 24, 24), "PEFT logits")
