"""Parameter groups with their own LRs; torch AdamW, bitsandbytes AdamW8bit and paged AdamW."""
import pytest
import torch
from torch import nn

from fastvlm.train.lora import apply_lora
from fastvlm.train.optim import build_optimizer, param_groups
from tests.lora_models import TinyVLM
from tests.utils import assert_close

LRS = {"connector": 1e-3, "encoder_adapters": 2e-5, "llm_adapters": 2e-4}


def lora_vlm():
    model = TinyVLM()
    apply_lora(model, r"vision_tower\.[02]|q_proj|down_proj", r=4, alpha=8, trainable="connector")
    return model


def test_groups_split_by_part_with_own_lr():
    model = lora_vlm()
    groups = {g["name"]: g for g in param_groups(model, LRS, weight_decay=0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {g: sorted(names[id(p)] for p in grp["params"]) for g, grp in groups.items()}
    assert members == {
        "connector": ["connector.0.weight", "connector.2.weight"],
        "connector_no_decay": ["connector.0.bias", "connector.2.bias"],
        "encoder_adapters": sorted(f"vision_tower.{i}.lora_{ab}" for i in (0, 2) for ab in "AB"),
        "llm_adapters": sorted(f"{m}.lora_{ab}" for m in ("q_proj", "down_proj") for ab in "AB"),
    }
    assert groups["connector"]["lr"] == 1e-3 and groups["encoder_adapters"]["lr"] == 2e-5
    assert groups["connector_no_decay"]["weight_decay"] == 0.0 and groups["llm_adapters"]["weight_decay"] == 0.1
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == n_trainable


@pytest.mark.parametrize("lrs, patterns, arg", [
    ({"connector": 1e-3, "llm_adapters": 1e-4}, None, "lrs:.*encoder_adapters"),
    ({**LRS, "vision": 1.0}, None, "lrs:.*vision"),
    ({"connector": 1e-3}, {"connector": r"connector\..*"}, "patterns:.*lora_"),
])
def test_group_config_errors(lrs, patterns, arg):
    with pytest.raises(ValueError, match=arg):
        param_groups(lora_vlm(), lrs, patterns)


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="name:"):
        build_optimizer(param_groups(lora_vlm(), LRS), "sgd")


def one_adam_step(name, seed, device="cpu", dtype=torch.float32):
    """Three steps on a fresh Linear (the same weights and inputs for the same seed, in any
    dtype: drawn in fp32, then cast); the weight's total update and the optimizer."""
    torch.manual_seed(seed)
    # 8-bit state only kicks in for tensors of >= 4096 elements (bitsandbytes' min_8bit_size)
    model = nn.Linear(96, 64, device=device).to(dtype)
    groups = param_groups(model, {"llm_adapters": 1e-2}, {"llm_adapters": r".*"})
    opt = build_optimizer(groups, name)
    before = model.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 96, device=device).to(dtype)).square().mean().backward()
        opt.step()
    return model.weight.detach() - before, opt


def quantized_adam_step(seed, device="cpu"):
    """The weight's update under the 8-bit format itself, by hand: AdamW whose moments are
    stored through bitsandbytes' blockwise dynamic quantisation (256-value blocks, signed map
    for m, unsigned for v) between steps, as its 8-bit AdamW does. Its error against exact
    AdamW is the format's own; the optimizer may add rounding, not more."""
    import bitsandbytes.functional as F
    codes = {True: F.create_dynamic_map(signed=True), False: F.create_dynamic_map(signed=False)}

    def stored(t, signed):
        q, state = F.quantize_blockwise(t.reshape(-1), code=codes[signed], blocksize=256)
        return F.dequantize_blockwise(q, state).reshape(t.shape)

    torch.manual_seed(seed)
    model = nn.Linear(96, 64, device=device)
    before, (b1, b2), lr, eps = model.weight.detach().clone(), (0.9, 0.999), 1e-2, 1e-8
    moments = {p: (torch.zeros_like(p), torch.zeros_like(p)) for p in model.parameters()}
    for t in range(1, 4):
        model.zero_grad()
        model(torch.randn(8, 96, device=device)).square().mean().backward()
        with torch.no_grad():
            for p, (m, v) in moments.items():
                m, v = b1 * m + (1 - b1) * p.grad, b2 * v + (1 - b2) * p.grad.square()
                p -= lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
                eight_bit = p.numel() >= 4096  # bitsandbytes' min_8bit_size
                moments[p] = (stored(m, True), stored(v, False)) if eight_bit else (m, v)
    return model.weight.detach() - before


@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw"])
def test_bnb_optimizers_on_cpu_track_torch_adamw(name, seed, recwarn):
    want, _ = one_adam_step("adamw", seed)
    got, opt = one_adam_step(name, seed)
    state = opt.state[opt.param_groups[0]["params"][0]]
    if name == "adamw8bit":
        assert state["state1"].dtype == torch.uint8  # really 8-bit
    else:  # bitsandbytes cannot page host memory: plain 32-bit state, and it says so
        assert any("not supported on CPU" in str(w.message) for w in recwarn)
    if name == "adamw8bit":  # 8-bit blockwise state: bounded by the format's own error
        exact = one_adam_step("adamw", seed, dtype=torch.float64)[0]
        assert_close(got, exact, quantized_adam_step(seed))
    else:  # plain 32-bit AdamW by bitsandbytes: vs torch's in float64, bound by torch's in fp32
        assert_close(got, one_adam_step("adamw", seed, dtype=torch.float64)[0], want)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw", "paged_adamw8bit"])
def test_bnb_optimizers_cuda(name, seed):
    want, _ = one_adam_step("adamw", seed, "cuda")
    got, opt = one_adam_step(name, seed, "cuda")
    exact = one_adam_step("adamw", seed, "cuda", dtype=torch.float64)[0]
    assert_close(got, exact, quantized_adam_step(seed, "cuda") if "8bit" in name else want)


@pytest.mark.gpu
def test_paged_adamw_pages_large_state_on_cuda():
    p = nn.Parameter(torch.randn(512, 512, device="cuda"))  # > 1e5 elements: bitsandbytes pages it
    opt = build_optimizer([{"params": [p], "lr": 1e-3}], "paged_adamw")
    p.grad = torch.randn_like(p)
    opt.step()
    assert getattr(opt.state[p]["state1"], "is_paged", False)


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_qlora_bf16_training_with_groups_reduces_loss(name):
    """The pieces together: NF4 + LoRA, bf16 autocast with fp32 masters, per-part LRs."""
    from fastvlm.train.precision import MixedPrecision
    from fastvlm.train.quant import apply_qlora

    # A fixed, known case: a convergence check (loss below 0.75x in 30 steps), not a numerical
    # comparison with an error bound; how fast a random tiny model trains varies by seed.
    torch.manual_seed(0)
    model = TinyVLM()
    apply_qlora(model, r"vision_tower\.[02]|q_proj|down_proj", r=8, alpha=16, trainable="connector")
    mp = MixedPrecision("bf16")
    mp.prepare(model)
    opt = build_optimizer(param_groups(model, {"connector": 1e-2, "encoder_adapters": 3e-3,
                                               "llm_adapters": 1e-2}), name)
    x, target = torch.randn(64, 12), torch.randn(64, 10)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        with mp.autocast("cpu"):
            loss = (model(x).float() - target).square().mean()
        mp.backward(loss)
        mp.step(opt)
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]  # reaches ~0.68x here; a frozen or diverging setup would not
