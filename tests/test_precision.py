"""Precision policy: one LoRA / QLoRA step in bf16, fp16, pure bf16 vs fp32; fp16 loss scaling."""
import copy

import pytest
import torch
from torch import nn

from fastvlm.train.lora import apply_lora, lora_layers
from fastvlm.train.precision import MixedPrecision
from fastvlm.train.quant import apply_qlora, dequantized_weight
from tests.lora_models import TinyVLM
from tests.utils import assert_close, error_bound, unit_roundoff

# One step's update (SGD: update = -lr * grad) in each precision vs the same step in float64
# (on a twin whose NF4 bases are the weights they multiply by, dequantized), bound by the
# fp32 step's error vs float64 rescaled to the precision's unit roundoff (tests/utils:
# rounding error scales with u for the same computation). fp16 starts at scale 2^10:
# GradScaler's default 2^16 overflows this model's first step (a skip, tested below). Pure
# bf16 also rounds the updated parameter to bf16 (half an ulp of the parameter itself):
# updates below that are lost, the known cost of dropping master weights.
PRECISION_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "pure_bf16": torch.bfloat16}
MODES = {"bf16": dict(precision="bf16"), "fp16": dict(precision="fp16", init_scale=2.0 ** 10),
         "pure_bf16": dict(precision="bf16", pure_bf16=True)}


def build(kind: str, precision: str, seed: int, device: str = "cpu"):
    torch.manual_seed(seed)
    model = TinyVLM().to(device)  # NF4 quantizes where the weights are
    if kind == "lora":
        apply_lora(model, "q_proj,down_proj,vision_tower.2", r=4, alpha=8, trainable="connector")
    else:
        apply_qlora(model, "q_proj,down_proj,vision_tower.2", r=4, alpha=8, trainable="connector",
                    compute_dtype="fp32" if precision == "fp32" else precision)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.normal_(0, 0.3)
    return model


def float64_twin(model: nn.Module) -> nn.Module:
    """The model (before its step) in float64, each NF4 base layer replaced by a frozen
    Linear holding the weight it multiplies by."""
    twin = copy.deepcopy(model)
    for layer in lora_layers(twin).values():
        if layer.quantized:
            base = layer.base_layer
            plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
            plain.weight.data = dequantized_weight(base).float()
            if base.bias is not None:
                plain.bias.data = base.bias.data.float()
            layer.base_layer = plain.requires_grad_(False)
    return twin.double()


def float64_step(twin: nn.Module, x, target, lr=0.1):
    """The loss and the SGD update of every trainable parameter, and the gradients, in float64."""
    params = {n: p for n, p in twin.named_parameters() if p.requires_grad}
    loss = (twin(x.double()) - target.double()).square().mean()
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    return loss.detach(), {n: -lr * g for n, g in grads.items()}, grads


def assert_step_close(got, ref64, fp32, dtype, name, stored=None):
    """Rescaled rule (see the top); `stored`: the bf16 parameters after a pure-bf16 step, whose
    rounding (at most u(bf16) of each parameter) the update also carries."""
    ratio = unit_roundoff(dtype) / unit_roundoff(torch.float32)
    if stored is None:
        assert_close(got, ref64, fp32, dtype, factor=4 * ratio, name=name)
        return
    err = float((got.double() - ref64).norm())
    bound = error_bound(fp32, ref64, dtype, factor=4 * ratio) + unit_roundoff(dtype) * float(stored.norm())
    assert torch.isfinite(got).all() and err <= bound, f"{name}: update error {err:.3g} > {bound:.3g}"


def one_step(model, mp: MixedPrecision, x, target, lr=0.1):
    mp.prepare(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().float().clone() for n, p in params.items()}
    opt = torch.optim.SGD(params.values(), lr=lr)
    x = x.bfloat16() if mp.pure_bf16 else x  # pure bf16: the caller feeds bf16 activations
    with mp.autocast("cpu"):
        loss = (model(x).float() - target).square().mean()
    mp.backward(loss)
    stepped = mp.step(opt)
    after = {n: p.detach().float() for n, p in params.items()}
    return loss.item(), {n: after[n] - before[n] for n in params}, stepped, after


@pytest.mark.parametrize("kind", ["lora", "qlora"])
@pytest.mark.parametrize("mode", list(MODES))
def test_one_step_matches_fp32(kind, mode, seed):
    x, target = torch.randn(16, 12), torch.randn(16, 10)
    fp32_model = build(kind, "fp32", seed)
    loss64, want64, _ = float64_step(float64_twin(fp32_model), x, target)
    want_loss, want, _, _ = one_step(fp32_model, MixedPrecision("fp32"), x, target)
    mp = MixedPrecision(**MODES[mode])
    model = build(kind, mp.precision, seed)
    loss, got, stepped, after = one_step(model, mp, x, target)
    assert stepped
    dtype = PRECISION_DTYPE[mode]
    assert_step_close(torch.tensor(loss), loss64, torch.tensor(want_loss), dtype, "loss")
    for n in want:
        assert_step_close(got[n], want64[n], want[n], dtype, n, after[n] if mp.pure_bf16 else None)
    lora = next(iter(lora_layers(model).values()))
    assert lora.lora_A.dtype == (torch.bfloat16 if mode == "pure_bf16" else torch.float32)  # master weights


def test_prepare_keeps_masters_and_norms_fp32():
    model = TinyVLM()
    apply_lora(model, "q_proj", r=2, alpha=2, trainable="connector")
    MixedPrecision("bf16").prepare(model)
    assert model.q_proj.base_layer.weight.dtype == torch.bfloat16  # frozen: compute dtype
    assert model.norm.weight.dtype == torch.float32
    assert model.connector[0].weight.dtype == torch.float32 and model.q_proj.lora_B.dtype == torch.float32


def test_fp16_overflow_skips_step_and_halves_scale(seed):
    model = TinyVLM()
    apply_lora(model, "q_proj,down_proj", r=4, alpha=8, trainable="connector")
    mp = MixedPrecision("fp16", init_scale=1024.0, growth_interval=2)
    mp.prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, target = torch.randn(8, 12), torch.randn(8, 10)

    def step(poison: bool):
        opt.zero_grad()
        with mp.autocast("cpu"):
            loss = (model(x).float() - target).square().mean()
        handle = model.q_proj.lora_A.register_hook(lambda g: torch.full_like(g, float("inf"))) if poison else None
        mp.backward(loss)
        if handle:
            handle.remove()
        return mp.step(opt)

    before = [p.detach().clone() for p in params]
    assert not step(poison=True)
    assert mp.skipped_steps == 1 and mp.loss_scale == 512.0
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # nothing moved
    assert step(poison=False) and step(poison=False)
    assert mp.skipped_steps == 1 and mp.loss_scale == 1024.0  # grew after growth_interval good steps
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.is_floating_point())
    assert any(not torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("kwargs, arg", [(dict(precision="fp8"), "precision:"),
                                         (dict(precision="fp16", pure_bf16=True), "pure_bf16:")])
def test_bad_precision(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        MixedPrecision(**kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(MODES))
def test_one_step_matches_fp32_cuda(mode, seed):
    x, target = torch.randn(64, 12, device="cuda"), torch.randn(64, 10, device="cuda")

    def run(mp, model):
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        mp.prepare(model)
        before = {n: p.detach().float().clone() for n, p in params.items()}
        opt = torch.optim.SGD(params.values(), lr=0.1)
        with mp.autocast("cuda"):
            loss = (model(x.bfloat16() if mp.pure_bf16 else x).float() - target).square().mean()
        mp.backward(loss)
        assert mp.step(opt)
        return {n: p.detach().float() for n, p in params.items()}, before

    fp32_model = build("qlora", "fp32", seed, "cuda")
    _, want64, _ = float64_step(float64_twin(fp32_model), x, target)
    after, before = run(MixedPrecision("fp32"), fp32_model)
    want = {n: after[n] - before[n] for n in after}
    mp = MixedPrecision(**MODES[mode])
    after, before = run(mp, build("qlora", mp.precision, seed, "cuda"))
    for n in want:
        assert_step_close(after[n] - before[n], want64[n], want[n], PRECISION_DTYPE[mode], n,
                          after[n] if mp.pure_bf16 else None)


def test_fp16_unscale_gives_true_gradients_before_clipping(seed):
    x, target = torch.randn(16, 12), torch.randn(16, 10)

    def grads(mp, model):
        mp.prepare(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        with mp.autocast("cpu"):
            loss = (model(x).float() - target).square().mean()
        mp.backward(loss)
        mp.unscale_(opt)  # where gradient clipping would go
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert mp.step(opt)
        return out

    fp32_model = build("lora", "fp32", seed)
    _, _, want64 = float64_step(float64_twin(fp32_model), x, target)
    want = grads(MixedPrecision("fp32"), fp32_model)
    got = grads(MixedPrecision("fp16", init_scale=2.0 ** 10), build("lora", "fp16", seed))
    for n in want:
        assert_step_close(got[n], want64[n], want[n], torch.float16, n)
