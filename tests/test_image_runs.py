"""Two images written back to back as one run of placeholders are two images
(transformers' LLaVA accepts them when the run is a multiple of the image's token count)."""
import pytest
import torch

from fastvlm.models.splice import splice_image_features
from fastvlm.models.vlm import VLM
from tests.hf_models import IMG, TOKENS_PER_IMAGE, tiny_llava

transformers = pytest.importorskip("transformers")
T = TOKENS_PER_IMAGE


def test_back_to_back_images_match_hf_llava(tmp_path, seed):
    hf = tiny_llava()
    hf.save_pretrained(tmp_path)
    ours = VLM.from_pretrained(tmp_path).eval()
    row1 = [5, 6] + [IMG] * 2 * T + [7, 8] + [IMG] * T + [9]  # two images in one run, then a third
    row2 = [IMG] * 3 * T + [10]
    n = max(len(row1), len(row2))
    ids = torch.tensor([row1 + [0] * (n - len(row1)), row2 + [0] * (n - len(row2))])
    mask = (torch.arange(n)[None] < torch.tensor([[len(row1)], [len(row2)]])).long()
    pixels = torch.randn(6, 3, 28, 28)
    want = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    got = ours(ids, pixels, attention_mask=mask)
    live = mask.bool()
    torch.testing.assert_close(got[live], want[live], rtol=1e-4, atol=1e-5)
    # the layout sees two (three) images, not one, so image_bidirectional / mmca keep them apart
    image_ids = ours.layout(ids, mask, images=pixels).image_ids
    assert image_ids[0, :2 + 3 * T + 2].tolist() == [-1, -1] + [0] * T + [1] * T + [-1, -1] + [2] * T
    assert image_ids[1, :3 * T].tolist() == [0] * T + [1] * T + [2] * T


@pytest.mark.parametrize("runs,tokens,msg", [
    ([6], [4, 4], r"images 0\.\.1 have 8 feature vectors together but their placeholder run has 6"),
    ([8, 4], [4, 4], "2 images for 2 image placeholder runs"),
    ([4], [4, 4], "2 images for 1 image placeholder runs"),
])
def test_runs_that_split_an_image_are_errors(runs, tokens, msg):
    ids = torch.cat([torch.tensor([1] + [IMG] * r) for r in runs])[None]
    feats = [torch.randn(t, 8) for t in tokens]
    with pytest.raises(ValueError, match=f"^image_features: {msg}"):
        splice_image_features(torch.randn(1, ids.shape[1], 8), ids, IMG, feats)
