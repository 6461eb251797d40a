"""Tiny random transformers LLaVA models, built from configs (nothing downloaded)."""
import torch

IMG = 119  # image token id (inside the vocabulary, as in llava-hf checkpoints)
TOKENS_PER_IMAGE = 4  # 28 px, 14 px patches, class token dropped


def tiny_llava_config(text_overrides=None, vision_overrides=None, **overrides):
    import transformers

    vc = transformers.CLIPVisionConfig(**{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                                          "num_attention_heads": 4, "image_size": 28, "patch_size": 14,
                                          "projection_dim": 16, **(vision_overrides or {})})
    tc = transformers.LlamaConfig(**{"vocab_size": 120, "hidden_size": 48, "intermediate_size": 96,
                                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                     **(text_overrides or {})})
    return transformers.LlavaConfig(**{"vision_config": vc, "text_config": tc, "image_token_id": IMG,
                                       "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
                                       "projector_hidden_act": "gelu", **overrides})


def randomize(model):
    """Biases and norm weights away from their 0 / 1 init, so that a dropped one shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.5 if "norm" in name else 0.0, 0.1)
    return model


def tiny_llava(**kwargs):
    import transformers

    return randomize(transformers.LlavaForConditionalGeneration(tiny_llava_config(**kwargs)).float().eval())
