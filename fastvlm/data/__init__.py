"""Training data: conversation files, prompt templates and label masks, tokenizers, the
synthetic VQA dataset and DeepSpeed-VisualChat blending (owner A); image loading, datasets,
packing, sampling and collation (owner B, block at the end)."""
from fastvlm.data import synthetic_vqa
from fastvlm.data.blend import blend
from fastvlm.data.conversation import IGNORE_INDEX, EncodedSample, SampleTooLong, encode_conversation, encode_prompt
from fastvlm.data.formats import IMAGE_TAG, Sample, estimate_length, read_samples
from fastvlm.data.templates import TEMPLATES, ChatTemplate, LiteralTemplate, Template, get_template
from fastvlm.data.tokenizer import Tokenizer, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "IGNORE_INDEX", "IMAGE_TAG", "TEMPLATES", "ChatTemplate", "EncodedSample", "LiteralTemplate", "Sample",
    "SampleTooLong", "Template", "Tokenizer", "blend", "encode_conversation", "encode_prompt", "estimate_length",
    "get_template", "load_tokenizer", "read_samples", "synthetic_vqa", "train_bpe_tokenizer",
]

# --- owner B --- (append below; extend __all__ with `__all__ += [...]`)
from fastvlm.data.collate import PackedCollator, PaddedCollator, model_inputs  # noqa: E402
from fastvlm.data.dataset import VLMDataset, VLMLoader, make_loader  # noqa: E402
from fastvlm.data.images import BadImageCounter, BadImageError, load_image, open_image  # noqa: E402
from fastvlm.data.packing import PackedRows, pack  # noqa: E402
from fastvlm.data.sampler import PackedBatchSampler  # noqa: E402

__all__ += [
    "BadImageCounter", "BadImageError", "PackedBatchSampler", "PackedCollator", "PackedRows", "PaddedCollator",
    "VLMDataset", "VLMLoader", "load_image", "make_loader", "model_inputs", "open_image", "pack",
]

# preference pairs (shared-prompt rows)
from fastvlm.data.preference import PreferenceDataset, PreferencePair, encode_pair, read_preference  # noqa: E402

__all__ += ["PreferenceDataset", "PreferencePair", "encode_pair", "read_preference"]
