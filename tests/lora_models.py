"""Small models shared by the LoRA / QLoRA / precision tests (no downloads)."""
import torch
from torch import nn

from fastvlm.train.lora import lora_layers

ALL_PROJ = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def tiny_llama(seed: int):
    """The same seed gives the same weights (a model and its reference twin), without
    touching the caller's random stream; tests pass their `seed` fixture."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).eval()


class TinyVLM(nn.Module):
    """Stand-in: encoder -> connector -> decoder, names as a LLaVA model has them."""

    def __init__(self):
        super().__init__()
        self.vision_tower = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 16))
        self.connector = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 24))
        self.norm = nn.LayerNorm(24)
        self.q_proj = nn.Linear(24, 24)
        self.down_proj = nn.Linear(24, 10)

    def forward(self, x):
        h = self.norm(self.connector(self.vision_tower(x)))
        return self.down_proj(torch.tanh(self.q_proj(h)))


def randomize_adapters(model):
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.normal_(0, 0.2)
