"""The VLM: HF LLaVA parity, splicing + layout, save/load, overfitting, errors."""
import copy

import pytest
import torch

from fastvlm.models.vlm import VLM
from tests.utils import assert_close

transformers = pytest.importorskip("transformers")
IMG = 119  # image token id (inside the vocabulary, as in llava-hf checkpoints)


def _hf_llava(select_strategy="default"):
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, image_size=28, patch_size=14, projection_dim=16)
    tc = transformers.LlamaConfig(vocab_size=120, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMG, vision_feature_layer=-2,
                                   vision_feature_select_strategy=select_strategy, projector_hidden_act="gelu")
    model = transformers.LlavaForConditionalGeneration(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.5 if "norm" in name else 0.0, 0.1)
    return model


def _batch(tokens_per_image, images=2):
    """Two rows: text, image, text / image, text, with right padding in row 2."""
    t = tokens_per_image
    row1 = [5, 6] + [IMG] * t + [7, 8, 9]
    row2 = [IMG] * t + [10, 11]
    n = max(len(row1), len(row2))
    ids = torch.tensor([row1 + [0] * (n - len(row1)), row2 + [0] * (n - len(row2))])
    mask = torch.tensor([[1] * len(row1) + [0] * (n - len(row1)), [1] * len(row2) + [0] * (n - len(row2))])
    return ids, mask, torch.randn(images, 3, 28, 28)


@pytest.mark.parametrize("strategy,tokens", [("default", 4), ("full", 5)])
def test_logits_match_hf_llava(strategy, tokens, tmp_path, seed):
    hf = _hf_llava(strategy)
    hf.save_pretrained(tmp_path)
    ours = VLM.from_pretrained(tmp_path).eval()
    ids, mask, pixels = _batch(tokens)
    base = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits  # transformers in fp32: the baseline
    want = copy.deepcopy(hf).double()(input_ids=ids, attention_mask=mask, pixel_values=pixels.double()).logits
    got = ours(ids, pixels, attention_mask=mask)
    live = mask.bool()
    assert_close(got[live], want[live], base[live], name="logits")


def test_save_load_round_trip_and_overfit(tmp_path, seed):
    hf = _hf_llava()
    hf.save_pretrained(tmp_path / "hf")
    model = VLM.from_pretrained(tmp_path / "hf")
    ids, mask, pixels = _batch(4)
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    first = None
    for _ in range(40):  # a handful of image-question-answer triples, memorised
        loss = model(ids, pixels, labels, attention_mask=mask)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.05 * first
    model.save_pretrained(tmp_path / "ours")
    assert not list((tmp_path / "ours").glob(".*"))  # no temp files left behind
    again = VLM.from_pretrained(tmp_path / "ours")
    model.eval(), again.eval()
    assert torch.equal(again(ids, pixels, attention_mask=mask), model(ids, pixels, attention_mask=mask))  # same weights
    greedy = again.generate(ids, pixels, attention_mask=mask, max_new_tokens=3)
    assert greedy.shape == (2, 3)


@pytest.mark.parametrize("kind", ["image_bidirectional", "mmca"])
def test_layout_kind_reaches_attention(kind, tmp_path, seed):
    """With a non-causal kind, image tokens see later tokens of their image: outputs change."""
    hf = _hf_llava()
    hf.save_pretrained(tmp_path)
    causal = VLM.from_pretrained(tmp_path).eval()
    other = VLM.from_pretrained(tmp_path).eval()
    other.config.attention_kind = kind
    ids, mask, pixels = _batch(4)
    layout = other.layout(ids, mask)
    assert layout.kind == kind and layout.image_ids[0].tolist()[:7] == [-1, -1, 0, 0, 0, 0, -1]
    a, b = causal(ids, pixels, attention_mask=mask), other(ids, pixels, attention_mask=mask)
    assert not torch.allclose(a[0, 2:6], b[0, 2:6])
    assert torch.equal(a[0, :2], b[0, :2])  # text before the image: the same keys, the same computation


@pytest.mark.parametrize("from_features", [False, True])
def test_text_only_training_batch_runs_the_image_path_for_nothing(from_features, tmp_path, seed):
    """Issue 27: the ranks of a distributed job must run the same modules whatever their
    micro-batches hold, so a training batch without images runs the tower and connector
    (the connector alone when images come as features) on a blank image: the loss and
    every gradient are those of the text alone, the image path's gradients zeros."""
    hf = _hf_llava()
    hf.save_pretrained(tmp_path)
    model = VLM.from_pretrained(tmp_path)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, IMG, (2, 9))
    labels = ids.clone()
    calls = []
    model.vision_tower.register_forward_hook(lambda *args: calls.append("tower"))
    model.multi_modal_projector.register_forward_hook(lambda *args: calls.append("connector"))
    loss = model(ids, labels=labels, **({"image_features": []} if from_features else {}))
    loss.backward()
    assert calls == (["connector"] if from_features else ["tower", "connector"])
    lm = reference.language_model  # what VLM.forward computes for text, without the image path
    want = lm(inputs_embeds=lm.model.embed_tokens(ids), layout=reference.layout(ids), labels=labels)
    want.backward()
    assert torch.equal(loss, want)
    # The image path's parameters that a batch with images (the same way in) gives gradients.
    with_images = copy.deepcopy(reference)
    image_ids, mask, pixels = _batch(4)
    features = with_images.vision_tower(pixels, select_layers=with_images.feature_layers)
    inputs = {"image_features": [f.detach() for f in features]} if from_features else {"images": pixels}
    with_images(image_ids, labels=image_ids.masked_fill(mask == 0, -100), attention_mask=mask, **inputs).backward()
    used = {n for n, p in with_images.named_parameters() if p.grad is not None and not n.startswith("language_model.")}
    assert used and any(n.startswith("multi_modal_projector.") for n in used)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if name.startswith("language_model."):
            assert torch.equal(p.grad, q.grad), name
        elif name in used:
            assert p.grad is not None and not p.grad.any(), name
        else:
            assert p.grad is None, name
    calls.clear()
    with torch.no_grad():  # evaluation: no gradient to keep in step, no image path
        model(ids, labels=labels)
    model.eval()
    model(ids, labels=labels)
    assert calls == []


def test_mismatch_and_bad_input_errors(tmp_path):
    hf = _hf_llava()
    hf.save_pretrained(tmp_path)
    model = VLM.from_pretrained(tmp_path)
    ids, mask, pixels = _batch(4)
    with pytest.raises(ValueError, match="^image_features: 1 images for 2"):
        model(ids, pixels[:1], attention_mask=mask)
    bad = ids.clone()
    bad[0, 2] = 5  # one image run now has 3 tokens for 4 features
    with pytest.raises(ValueError, match="^image_features: image 0 has 4 feature vectors"):
        model(bad, pixels, attention_mask=mask)
    with pytest.raises(ValueError, match="^images"):
        model(ids, None, attention_mask=mask)
    with pytest.raises(ValueError, match="^pixel_values"):
        model(ids, pixels[:, :1], attention_mask=mask)
    with pytest.raises(ValueError, match="^input_ids"):
        model(ids[0], pixels)
    with pytest.raises(ValueError, match="^attention_kind"):
        type(model.config)(model.config.vision, model.config.llm, IMG, attention_kind="sliding")
    long = torch.zeros(1, model.config.llm.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="^input_ids: sequence of"):
        model(long)


def test_benchmark_smoke(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "vlm.json"
    res = subprocess.run([sys.executable, "benchmarks/bench_vlm.py", "--smoke", "--out", str(out)],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    results = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in results] == ["fastvlm", "naive head", "dense-mask SDPA"]
    assert all(r["tokens_per_s"] > 0 for r in results)
