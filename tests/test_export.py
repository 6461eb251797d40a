"""Export: fastvlm -> HF LLaVA with the same logits (LoRA merged), tokenizer and processor
files transformers loads, PEFT adapters + connector, native directory; refusals."""
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
from fastvlm.train.lora import apply_lora, load_adapter
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
    processor = transformers.AutoProcessor.from_pretrained(tmp_path)
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


def test_peft_and_fastvlm_formats(tmp_path, seed):
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

    export_model(model, tmp_path / "peft", "peft")
    meta = json.loads((tmp_path / "peft" / "config.json").read_text())
    assert meta["adapters"] == ["adapter_llm", "adapter_vision"]
    from safetensors.torch import load_file

    rebuilt = VLM(VLMConfig.from_dict(meta["config"]))
    base = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    rebuilt.load_state_dict({k.replace("base_layer.", ""): v for k, v in base.items()})
    connector = load_file(tmp_path / "peft" / "connector.safetensors")
    with torch.no_grad():  # the connector file alone restores the projector
        for p in rebuilt.multi_modal_projector.parameters():
            p.zero_()
    rebuilt.load_state_dict(connector, strict=False)
    load_adapter(rebuilt.language_model, str(tmp_path / "peft" / "adapter_llm"))
    load_adapter(rebuilt.vision_tower, str(tmp_path / "peft" / "adapter_vision"))
    with torch.no_grad():
        got = rebuilt.eval()(ids, pixels, attention_mask=mask)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_peft_adapter_loads_in_peft_on_the_transformers_llm(tmp_path, seed):
    """adapter_llm/ is PEFT's own format: peft.PeftModel puts it on transformers' Llama with the
    same base weights, and the logits are fastvlm's (adapters active, not merged)."""
    peft = pytest.importorskip("peft")
    model = _random_model(_config())
    export_model(model, tmp_path, "peft")
    config, _ = to_hf_llava(model)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config["text_config"])).eval()
    base = {k.replace("base_layer.", ""): v for k, v in model.language_model.state_dict().items() if "lora_" not in k}
    hf.load_state_dict(base)
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter_llm").eval()
    ids = torch.randint(0, model.config.llm.vocab_size, (2, 9))
    with torch.no_grad():
        got = hf(input_ids=ids).logits
        base32 = model.language_model(ids)
        ref64 = model.language_model.double()(ids)
    assert_close(got, ref64, base32, name="PEFT logits")


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
    with pytest.raises(ValueError, match="no LoRA adapters"):
        export_model(VLM(_config()), tmp_path / "p", "peft")
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
    from fastvlm.train.checkpoint import load_for_inference

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

    assert main(["export", str(trained_run), str(tmp_path / "peft"), "--format", "peft"]) == 0
    assert (tmp_path / "peft" / "adapter_llm" / "adapter_model.safetensors").is_file()
    assert main(["export", str(trained_run), str(tmp_path / "native"), "--format", "fastvlm"]) == 0
    native = VLM.from_pretrained(tmp_path / "native")
    torch.testing.assert_close(native.state_dict(), VLM.from_pretrained(trained_run / "final").state_dict())
    # A bare model directory exports too, with the tokenizer found beside it.
    assert main(["export", str(trained_run / "final"), str(tmp_path / "hf2"), "--format", "hf-llava"]) == 0
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(tmp_path / "hf2" / "model.safetensors"),
                               load_file(tmp_path / "hf" / "model.safetensors"), rtol=0, atol=0)
    assert (tmp_path / "hf2" / "tokenizer.json").is_file() and (tmp_path / "hf2" / "processor_config.json").is_file()
