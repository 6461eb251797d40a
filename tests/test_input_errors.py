"""Input that means nothing, or that torch would reject deep inside a kernel, is a
ValueError whose message starts with (or names) the argument at fault.

One table: each case builds what it needs (tiny models from configs, files in
tmp_path) and makes one call that must raise.
"""
import functools
import json

import numpy as np
import pytest
import torch

from fastvlm.cli import main as cli_main
from fastvlm.cli import run_demo
from fastvlm.models.feature_cache import FeatureCache
from fastvlm.models.hf_vision import config_from_hf
from fastvlm.models.llm import LLM, LLMConfig
from fastvlm.models.preprocess import ImagePreprocessor
from fastvlm.models.splice import splice_image_features
from fastvlm.models.vision import VisionConfig, VisionEncoder
from fastvlm.models.vlm import VLM, VLMConfig, _from_hf_llava
from fastvlm.nn.connector import FusedMLPConnector, MultiLevelConnector, ResamplerConnector
from fastvlm.ops import AttentionLayout, multimodal_attention
from fastvlm.train.optim import build_optimizer

VOCAB, IMG, T = 64, 64, 4  # the image placeholder lies outside the vocabulary; 4 tokens per image


@functools.cache
def vlm() -> VLM:
    vision = VisionConfig.clip(image_size=28, patch_size=14, hidden_size=16, num_layers=1, num_heads=2,
                               intermediate_size=32)
    llm = LLMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return VLM(VLMConfig(vision, llm, image_token_id=IMG)).eval()


def llm() -> LLM:
    return vlm().language_model


def ids(*rows):
    return torch.tensor(rows)


PROMPT = ids([1, 2] + [IMG] * T + [3])
PIXELS = torch.randn(1, 3, 28, 28)


def nan_pixels():
    px = PIXELS.clone()
    px[0, 1, 3, 4] = float("nan")
    return px


def packed_layout():
    return AttentionLayout(torch.tensor([[0, 0, 1, 1]]))


def saved_vlm(tmp_path):
    vlm().save_pretrained(tmp_path)
    return tmp_path


def truncated(tmp_path, file="model.safetensors"):
    path = saved_vlm(tmp_path)
    data = (path / file).read_bytes()
    (path / file).write_bytes(data[: len(data) // 2])
    return path


def hf_llava_without_image_token(tmp_path):
    pytest.importorskip("transformers")
    from tests.hf_models import tiny_llava

    tiny_llava().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key in ("image_token_id", "image_token_index"):
        cfg.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def llama_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8, "hidden_size": 8}))
    return tmp_path


def one_param_group(**group):
    return [{"name": "connector", "params": [torch.nn.Parameter(torch.randn(2, 2))], **group}]


def vlm_config_without(key):
    d = vlm().config.to_dict()
    d.pop(key)
    return d


ITEM6 = {  # accepted before, though they mean nothing
    "uint8 pixels": (lambda tmp: vlm()(PROMPT, (PIXELS * 50).clamp(0, 255).to(torch.uint8)), "^pixel_values"),
    "NaN pixels": (lambda tmp: vlm()(PROMPT, nan_pixels(), PROMPT.clamp(max=VOCAB - 1)),
                   "^pixel_values: non-finite"),
    "NaN image features": (lambda tmp: splice_image_features(
        torch.randn(1, 7, 4), PROMPT, IMG, torch.full((1, T, 4), float("nan"))), "^image_features: non-finite"),
    "span across samples": (lambda tmp: AttentionLayout.from_lengths([3, 2], image_spans=[[(2, 2)]]),
                            "^image_spans: .*not inside one sample"),
    "span over padding": (lambda tmp: AttentionLayout.from_lengths([3], 6, image_spans=[[(2, 2)]]),
                          "^image_spans: .*not inside one sample"),
    "overlapping spans": (lambda tmp: AttentionLayout.from_lengths([6], image_spans=[[(0, 3), (2, 2)]]),
                          "^image_spans: .*overlaps"),
    "mask vs segment_ids": (lambda tmp: AttentionLayout.from_input_ids(
        ids([1, 2, 3, 4]), 9, segment_ids=ids([0, 0, 0, -1]), attention_mask=ids([1, 1, 1, 1])), "^attention_mask"),
    "tokens_per_image=0": (lambda tmp: AttentionLayout.from_input_ids(ids([1, 9, 9, 2]), 9, tokens_per_image=0),
                           "^tokens_per_image"),
    "image run across samples": (lambda tmp: AttentionLayout.from_input_ids(
        ids([1, 9, 9, 2]), 9, segment_ids=ids([0, 0, 1, 1])), "^input_ids: .*crosses a segment boundary"),
    "generate past max positions": (lambda tmp: vlm().generate(PROMPT, PIXELS, max_new_tokens=32 - 7 + 2),
                                    "^max_new_tokens: sequence of 33 tokens"),
    "negative lr": (lambda tmp: build_optimizer(one_param_group(lr=-1e-3)), "^groups: lr"),
    "NaN lr": (lambda tmp: build_optimizer(one_param_group(lr=float("nan"))), "^groups: lr"),
    "negative weight decay": (lambda tmp: build_optimizer(one_param_group(lr=1e-3, weight_decay=-0.1)),
                              "^groups: weight_decay"),
    "layout and segment_ids": (lambda tmp: llm()(ids([1, 2, 3, 4]), layout=packed_layout(),
                                                 segment_ids=ids([0, 0, 0, 0])), "^segment_ids: give a layout"),
    "generate ids and embeds": (lambda tmp: llm().generate(ids([1, 2]), inputs_embeds=torch.randn(1, 2, 32)),
                                "^input_ids: give exactly one"),
    "embeds of the wrong width": (lambda tmp: llm()(inputs_embeds=torch.randn(1, 2, 31)), "^inputs_embeds"),
    "generate on packed rows": (lambda tmp: llm().generate(ids([1, 2, 3, 4]), layout=packed_layout()),
                                "^layout: generate continues one sample"),
}

ITEM10 = {  # failed deep inside torch before
    "labels shape": (lambda tmp: vlm()(PROMPT, PIXELS, PROMPT[:, :-1]), "^labels: expected shape"),
    "llm labels shape": (lambda tmp: llm()(ids([1, 2, 3]), labels=ids([1, 2])), "^labels: expected shape"),
    "labels >= vocab": (lambda tmp: llm()(ids([1, 2, 3]), labels=ids([1, VOCAB, 3])), "^labels: ids must be"),
    "labels negative": (lambda tmp: llm()(ids([1, 2, 3]), labels=ids([1, -5, 3])), "^labels: ids must be"),
    "vlm ids >= vocab": (lambda tmp: vlm()(ids([1, VOCAB + 1, 3])), "^input_ids: ids must be"),
    "llm ids >= vocab": (lambda tmp: llm()(ids([1, VOCAB, 3])), "^input_ids: ids must be"),
    "llm ids negative": (lambda tmp: llm()(ids([1, -1, 3])), "^input_ids: ids must be"),
    "generate ids >= vocab": (lambda tmp: llm().generate(ids([1, VOCAB])), "^input_ids: ids must be"),
    "empty batch": (lambda tmp: vlm()(torch.zeros(0, 4, dtype=torch.long)), "^input_ids: empty"),
    "empty sequence": (lambda tmp: llm()(torch.zeros(2, 0, dtype=torch.long)), "^input_ids: empty"),
    "empty layout": (lambda tmp: AttentionLayout(torch.zeros(1, 0, dtype=torch.int32)), "^segment_ids: empty"),
    "attention N=0": (lambda tmp: multimodal_attention(*(torch.randn(1, 2, 0, 8) for _ in range(3)),
                                                       AttentionLayout(torch.zeros(1, 1, dtype=torch.int32))),
                      "^q: empty"),
    "short prefix_lengths": (lambda tmp: AttentionLayout.from_lengths([3, 2], prefix_lengths=[[1]], kind="prefix_lm"),
                             "^prefix_lengths"),
    "missing prefix row": (lambda tmp: AttentionLayout.from_lengths([[3], [2]], prefix_lengths=[[1]],
                                                                    kind="prefix_lm"), "^prefix_lengths"),
    "float lengths": (lambda tmp: AttentionLayout.from_lengths([3.0, 2]), "^lengths"),
    "bool lengths": (lambda tmp: AttentionLayout.from_lengths([True, 2]), "^lengths"),
    "float tensor lengths": (lambda tmp: AttentionLayout.from_lengths(torch.tensor([3.0, 2.0])), "^lengths"),
    "float cu_seqlens seq_len": (lambda tmp: AttentionLayout.from_cu_seqlens(torch.tensor([0, 3]), 4.0),
                                 "^seq_len"),
    "float seq_len": (lambda tmp: AttentionLayout.from_lengths([3, 2], 6.0), "^seq_len"),
    "float span": (lambda tmp: AttentionLayout.from_lengths([6], image_spans=[[(0.5, 2)]]), "^image_spans"),
    "no lengths": (lambda tmp: AttentionLayout.from_lengths([]), "^lengths"),
    "max_new_tokens=0": (lambda tmp: vlm().generate(PROMPT, PIXELS, max_new_tokens=0), "^max_new_tokens"),
    "max_new_tokens=-1": (lambda tmp: llm().generate(ids([1, 2]), max_new_tokens=-1), "^max_new_tokens"),
    "max_new_tokens=2.0": (lambda tmp: llm().generate(ids([1, 2]), max_new_tokens=2.0), "^max_new_tokens"),
    "connector in<0": (lambda tmp: FusedMLPConnector(-1, 8), "^in_features"),
    "connector hidden=0": (lambda tmp: FusedMLPConnector(8, 0), "^hidden_features"),
    "connector out<0": (lambda tmp: FusedMLPConnector(8, 8, -2), "^out_features"),
    "multilevel width<0": (lambda tmp: MultiLevelConnector([8, -4], 16), "^in_features"),
    "resampler queries<0": (lambda tmp: ResamplerConnector(8, 16, num_queries=-1), "^num_queries"),
    "resampler in<0": (lambda tmp: ResamplerConnector(-8, 16), "^in_features"),
    "resampler heads=0": (lambda tmp: ResamplerConnector(8, 16, num_heads=0), "^num_heads"),
    "multilevel input width": (lambda tmp: MultiLevelConnector([8, 4], 16)([torch.randn(1, 3, 8),
                                                                           torch.randn(1, 3, 5)]),
                               r"^features: input 1 must be \[B, T, 4\]"),
    "llava without image_token_index": (lambda tmp: VLM.from_pretrained(hf_llava_without_image_token(tmp)),
                                        "image_token_index"),
    "fastvlm config without llm": (lambda tmp: VLMConfig.from_dict(vlm_config_without("llm")),
                                   r"^config: missing required keys \['llm'\]"),
    "vision config without size": (lambda tmp: VisionConfig.from_dict(
        {k: v for k, v in vlm().config.vision.to_dict().items() if k != "hidden_size"}), "hidden_size"),
    "hf text config without sizes": (lambda tmp: LLMConfig.from_hf({"model_type": "llama", "vocab_size": 8}),
                                     r"^config.json: missing required keys \['hidden_size'"),
    "hf vision config without sizes": (lambda tmp: config_from_hf({"model_type": "clip_vision_model"}),
                                       r"^config.json: missing required keys \['image_size'"),
    "hf llava without text_config": (lambda tmp: _from_hf_llava({"model_type": "llava", "vision_config": {}}, {}),
                                     r"^config.json: missing required keys \['text_config'\]"),
    "vision from llama dir": (lambda tmp: VisionEncoder.from_pretrained(llama_dir(tmp)), "^path: .*'llama'"),
    "vlm without config.json": (lambda tmp: VLM.from_pretrained(tmp), "^path: no config.json"),
    "llm without config.json": (lambda tmp: LLM.from_pretrained(tmp), "^path: no config.json"),
    "vision without config.json": (lambda tmp: VisionEncoder.from_pretrained(tmp), "^path: no config.json"),
    "config.json not JSON": (lambda tmp: (tmp.joinpath("config.json").write_text("{"), VLM.from_pretrained(tmp)),
                             "^path: .*not valid JSON"),
    "truncated safetensors": (lambda tmp: VLM.from_pretrained(truncated(tmp)), "^path: cannot read"),
    "demo seq_len 0": (lambda tmp: run_demo(0, 0), "^seq_len"),
    "feature cache no images": (lambda tmp: FeatureCache(tmp, VisionEncoder(vlm().config.vision).freeze()).features(
        [], ImagePreprocessor.for_family("clip", 28)), "^images"),
    "preprocess no images": (lambda tmp: ImagePreprocessor.for_family("clip", 28)([]), "^images: empty"),
}


@pytest.mark.parametrize("call,arg", list(ITEM6.values()) + list(ITEM10.values()), ids=list(ITEM6) + list(ITEM10))
def test_bad_input_is_a_value_error_naming_the_argument(call, arg, tmp_path):
    with pytest.raises(ValueError, match=arg):
        call(tmp_path)


def test_ints_of_other_types_are_ints():
    """numpy ints and 0-d integer tensors are lengths like Python ints."""
    want = AttentionLayout.from_lengths([[3, 2], [4]], 6, image_spans=[[(0, 2)], [(1, 2)]],
                                        prefix_lengths=[[1, 2], [3]], kind="prefix_lm")
    got = AttentionLayout.from_lengths([np.array([3, 2]), [torch.tensor(4)]], np.int64(6),
                                       image_spans=[[(np.int32(0), torch.tensor(2))], [(1, 2)]],
                                       prefix_lengths=[np.array([1, 2]), [torch.tensor(3)]],
                                       kind="prefix_lm")
    for name in ("segment_ids", "image_ids", "prefix_mask"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert torch.equal(AttentionLayout.from_lengths(torch.tensor([3, 2])).segment_ids,
                       AttentionLayout.from_lengths([3, 2]).segment_ids)


def test_cli_demo_refuses_a_non_positive_seq_len(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", "--seq-len", "0"])
    assert exit_info.value.code == 2
    assert "--seq-len" in capsys.readouterr().err


def test_packed_rows_may_exceed_max_positions_when_each_segment_fits():
    """Positions restart per packed segment: the longest segment, not the row, meets the limit."""
    n = llm().config.max_position_embeddings
    row = torch.randint(0, VOCAB, (1, n + 8))
    two_samples = torch.tensor([[0] * (n // 2) + [1] * (n // 2 + 8)])
    assert llm()(row, segment_ids=two_samples).shape == (1, n + 8, VOCAB)
    assert vlm()(row, segment_ids=two_samples).shape == (1, n + 8, VOCAB)
    with pytest.raises(ValueError, match="^input_ids: sequence of 33 tokens"):
        llm()(row, segment_ids=torch.tensor([[0] * 7 + [1] * (n + 1)]))
    with pytest.raises(ValueError, match="^input_ids: sequence of 33 tokens"):
        vlm()(row, segment_ids=torch.tensor([[0] * 7 + [1] * (n + 1)]))
