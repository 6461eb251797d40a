"""A tiny transformers LLaVA with random weights, and the same weights as a fastvlm.VLM
(no downloads): the pair the adapter and merge tests compare."""
import warnings

import torch

IMG = 119  # image token id (inside the vocabulary, as in llava-hf checkpoints)
TOKENS_PER_IMAGE = 4  # 28x28 pixels, 14x14 patches, class token dropped ("default" strategy)


def tiny_hf_llava(seed: int):
    import transformers

    torch.manual_seed(seed)
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, image_size=28, patch_size=14, projection_dim=16)
    tc = transformers.LlamaConfig(vocab_size=120, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMG, vision_feature_layer=-2,
                                   vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = transformers.LlavaForConditionalGeneration(cfg).float().eval()
    with torch.no_grad():  # HF initialises biases to 0 and norms to 1: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.5 if "norm" in name else 0.0, 0.1)
    return model


def llava_pair(seed: int, directory):
    """(transformers LLaVA, fastvlm.VLM with the same weights), both in eval mode."""
    from fastvlm.models.vlm import VLM

    hf = tiny_hf_llava(seed)
    hf.save_pretrained(directory)
    return hf, VLM.from_pretrained(directory).eval()


def llava_batch(batch: int = 2):
    """input_ids [B, N] with one image each (text, image, text) and pixels [B, 3, 28, 28]."""
    text = torch.randint(0, IMG, (batch, 5))
    ids = torch.cat([text[:, :2], torch.full((batch, TOKENS_PER_IMAGE), IMG), text[:, 2:]], dim=1)
    return ids, torch.randn(batch, 3, 28, 28)


def peft_load(hf, directory):
    """peft.PeftModel.from_pretrained(hf, directory) in eval mode, refusing an adapter whose
    keys do not fit (PEFT only warns then, and leaves the unmatched LoRA weights at init)."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(hf, str(directory)).eval()
    missing = [str(w.message) for w in caught if "missing" in str(w.message).lower()]
    assert not missing, missing
    return model
