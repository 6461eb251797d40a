"""QLoRA across evaluation passes: a no-grad eval forward must not change what later
training steps compute (bitsandbytes repacks Linear4bit weights on CPU for inference,
into a format that has no backward), and layers of any width run in eval mode."""
import pytest
import torch
from torch import nn

from fastvlm.nn.lora import LoRALinear
from fastvlm.train.lora import lora_layers
from fastvlm.train.quant import apply_qlora, dequantized_weight, to_nf4
from tests.lora_models import ALL_PROJ, tiny_llama


class WideVLM(nn.Module):
    """encoder -> connector -> decoder with widths bitsandbytes' CPU inference format
    accepts (out % 32 == 0, in % 64 == 0), so on today's bitsandbytes the repacking
    really happens where the CPU has AVX512-BF16."""

    def __init__(self, width=64):
        super().__init__()
        self.vision_tower = nn.Sequential(nn.Linear(64, width), nn.GELU(), nn.Linear(width, width))
        self.connector = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.q_proj = nn.Linear(width, width)
        self.down_proj = nn.Linear(width, 32)

    def forward(self, x):
        return self.down_proj(torch.tanh(self.q_proj(self.connector(self.vision_tower(x)))))


def _qlora_vlm(seed, width=64):
    torch.manual_seed(seed)
    model = WideVLM(width)
    apply_qlora(model, r"vision_tower\.[02]|q_proj|down_proj", r=4, alpha=8, trainable="connector",
                compute_dtype="fp32")
    for m in lora_layers(model).values():
        m.lora_B.data.normal_(0, 0.1)
    return model


def _grads(model, run):
    model.train()
    model.zero_grad()
    run(model).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _eval_pass(model, run_eval):
    model.eval()
    with torch.no_grad():
        run_eval(model)


def _assert_same_grads(after_eval, fresh):
    assert after_eval.keys() == fresh.keys()
    for name, g in fresh.items():
        # the same quantized weights, inputs and ops: bit-identical, not merely close
        assert torch.equal(after_eval[name], g), f"{name}: gradient changed by an eval pass"


def test_vlm_grads_after_eval_pass_equal_fresh_model(seed):
    x = torch.randn(6, 64)
    fresh = _grads(_qlora_vlm(seed), lambda m: m(x).square().mean())
    model = _qlora_vlm(seed)
    _eval_pass(model, lambda m: m(torch.randn(3, 64)))
    _assert_same_grads(_grads(model, lambda m: m(x).square().mean()), fresh)
    assert fresh["connector.0.weight"].norm() > 0


def test_llama_grads_after_eval_pass_equal_fresh_model(seed):
    ids = torch.randint(0, 128, (2, 9))

    def build():
        torch.manual_seed(seed)  # the adapters' init below draws from the global stream: the same in both
        model = tiny_llama(seed=seed % 1000)
        apply_qlora(model, ALL_PROJ, r=4, alpha=8, trainable="lm_head", compute_dtype="fp32")
        for m in lora_layers(model).values():
            m.lora_B.data.normal_(0, 0.1)
        return model

    def loss(m):
        return m(ids, labels=ids).loss

    fresh = _grads(build(), loss)
    model = build()
    _eval_pass(model, lambda m: m(ids[:1]))
    _assert_same_grads(_grads(model, loss), fresh)


@pytest.mark.parametrize("in_features, out_features", [(40, 29), (64, 24), (24, 10)])
def test_odd_widths_run_in_eval_mode(seed, in_features, out_features):
    """Widths bitsandbytes' CPU inference format refuses (not multiples of 32) run
    the same NF4 matmul in eval mode as in training."""
    lin = nn.Linear(in_features, out_features)
    x = torch.randn(5, in_features)
    q = to_nf4(lin, torch.float32)
    want = nn.functional.linear(x, dequantized_weight(q), lin.bias)
    q.eval()
    with torch.no_grad():
        got = q(x)
    assert torch.equal(got, want)
    layer = LoRALinear(to_nf4(lin, torch.float32), r=2, alpha=4).eval()
    with torch.no_grad():
        assert torch.equal(layer(x), want)  # B = 0: the adapter adds nothing


def test_already_repacked_base_is_refused(seed):
    """A Linear4bit that bitsandbytes already switched to its CPU inference format cannot
    be trained; wrapping it must say so instead of giving wrong gradients."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(nn.Linear(64, 64).state_dict())
    q = q.to("cpu").eval()
    if not q.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    with torch.no_grad():
        q(torch.randn(2, 64))
    with pytest.raises(ValueError, match="base_layer:.*inference format"):
        LoRALinear(q, r=2, alpha=4)


def test_foreign_linear4bit_wrapped_by_lora_keeps_training_format(seed):
    """A Linear4bit fastvlm did not make (transformers' BitsAndBytesConfig loads these)
    gets the same protection once LoRALinear wraps it."""
    import bitsandbytes as bnb

    lin = nn.Linear(64, 64)

    def build():
        q = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
        q.load_state_dict(lin.state_dict())
        torch.manual_seed(seed)
        layer = LoRALinear(q.to("cpu"), r=2, alpha=4)
        layer.lora_B.data.normal_()
        return layer

    x = torch.randn(3, 64, requires_grad=True)

    def run(m):
        return m(x).square().sum()

    fresh = _grads(build(), run)
    layer = build()
    _eval_pass(layer, lambda m: m(torch.randn(2, 64)))
    _assert_same_grads(_grads(layer, run), fresh)
