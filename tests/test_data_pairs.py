"""CaptionPairs: each item's caption ids are the tokenizer's, whether encoded per item or
taken from the ids lengths() keeps (the contrastive stage's path), also in a pickled copy
(what DataLoader workers receive); PairCollator pads them."""
import pickle
from dataclasses import replace

import pytest
import torch

from fastvlm.data import read_samples, synthetic_vqa, train_bpe_tokenizer
from fastvlm.data.pairs import CaptionPairs, PairCollator, caption_of
from fastvlm.models.preprocess import ImagePreprocessor


@pytest.fixture
def pairs(tmp_path, seed):
    splits = synthetic_vqa.write_dataset(tmp_path / "vqa", 24, 4, seed=seed % 1000, image_size=32)
    samples = [s for s in read_samples(splits.captions) if len(s.images) == 1]
    tokenizer = train_bpe_tokenizer([t["value"] for s in samples for t in s.conversations], vocab_size=300,
                                    seed=seed % 1000)
    # an empty caption: its ids are the pad id alone (a pair needs one token)
    samples[1] = replace(samples[1], conversations=[*samples[1].conversations[:-1],
                                                    {"from": "gpt", "value": ""}])
    make = lambda: CaptionPairs(samples, splits.image_folder, tokenizer,  # noqa: E731
                                ImagePreprocessor.for_family("siglip", 32))
    return make, samples, tokenizer


def test_caption_ids_are_the_tokenizers_before_and_after_lengths(pairs):
    make, samples, tokenizer = pairs
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    want = [tokenizer.encode(caption_of(s))[0] or [pad] for s in samples]
    assert want[1] == [pad] and len({len(w) for w in want}) > 1
    fresh, kept = make(), make()
    assert kept.lengths() == [len(w) for w in want]
    for dataset in (fresh, kept, pickle.loads(pickle.dumps(kept))):
        for i, ids in enumerate(want):
            item = dataset[i]
            assert item["input_ids"].dtype == torch.long and item["input_ids"].tolist() == ids
            assert dataset.caption_ids(i) == ids
    batch = PairCollator(pad)([kept[i] for i in range(len(want))])
    for i, ids in enumerate(want):
        assert batch["input_ids"][i, :len(ids)].tolist() == ids and int(batch["text_mask"][i].sum()) == len(ids)
        assert set(batch["input_ids"][i, len(ids):].tolist()) <= {pad}
