"""Image-feature splicing at placeholder runs: order, expansion, mismatch errors."""
import pytest
import torch

from fastvlm.models.splice import expand_placeholders, placeholder_runs, splice_image_features

IMG = 7


def test_runs_and_splice_in_reading_order():
    ids = torch.tensor([[1, 7, 7, 2, 7, 7, 7, 3], [7, 7, 4, 5, 6, 0, 0, 0]])
    assert placeholder_runs(ids, IMG) == [[(1, 2), (4, 3)], [(0, 2)]]
    emb = torch.randn(2, 8, 4, requires_grad=True)
    feats = [torch.randn(2, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True),
             torch.randn(2, 4, requires_grad=True)]
    out = splice_image_features(emb, ids, IMG, feats)
    torch.testing.assert_close(out[0, 1:3], feats[0])
    torch.testing.assert_close(out[0, 4:7], feats[1])
    torch.testing.assert_close(out[1, 0:2], feats[2])
    text = ids != IMG
    torch.testing.assert_close(out[text], emb[text])
    out.sum().backward()  # gradients reach features and text embeddings only
    assert torch.all(emb.grad[~text] == 0) and torch.all(emb.grad[text] == 1)
    assert all(torch.all(f.grad == 1) for f in feats)


def test_expand_single_placeholders():
    ids = torch.tensor([[1, 7, 2], [7, 3, 4]])
    labels = torch.tensor([[1, -100, 2], [-100, 3, 4]])
    out, lab, mask = expand_placeholders(ids, IMG, 3, labels)
    assert out.tolist() == [[1, 7, 7, 7, 2], [7, 7, 7, 3, 4]]
    assert lab.tolist() == [[1, -100, -100, -100, 2], [-100, -100, -100, 3, 4]]
    assert mask.tolist() == [[1] * 5, [1] * 5]


@pytest.mark.parametrize("feats,msg", [
    ([torch.randn(2, 4)], "1 images for 2"),
    ([torch.randn(2, 4), torch.randn(2, 4)], "has 2 feature vectors but its placeholder run has 3"),
    ([torch.randn(2, 4), torch.randn(3, 5)], r"must be \[tokens, 4\]"),
])
def test_mismatch_is_an_error(feats, msg):
    ids = torch.tensor([[1, 7, 7, 2, 7, 7, 7]])
    with pytest.raises(ValueError, match=f"^image_features: .*{msg}"):
        splice_image_features(torch.randn(1, 7, 4), ids, IMG, feats)
