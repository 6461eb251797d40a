"""Precision policy: one LoRA / QLoRA step in bf16, fp16, pure bf16 vs fp32; fp16 loss scaling."""
import pytest
import torch

from fastvlm.train.lora import apply_lora, lora_layers
from fastvlm.train.precision import MixedPrecision
from fastvlm.train.quant import apply_qlora

from tests.lora_models import TinyVLM

# Relative error of one step's update (SGD, so update = -lr * grad) vs the fp32 step.
# bf16 keeps 8 mantissa bits (2^-8 ~ 4e-3 per rounding), fp16 11; errors compound over
# a few layers forward and backward, hence the margins. NF4 models quantize the same
# fp32 weights in every precision, so the same bounds apply. fp16 starts at scale 2^10:
# GradScaler's default 2^16 overflows this model's first step (a skip, tested below). Pure bf16 also rounds
# the updated parameter to bf16 (half an ulp, 2^-9 relative, of the parameter itself):
# updates below that are lost, the known cost of dropping master weights.
BF16_STORAGE_ROUNDING = 2.0 ** -9
STEP_RTOL = {"bf16": 6e-2, "fp16": 1e-2, "pure_bf16": 6e-2}  # ~2x the worst of 25 seeds
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
    want_loss, want, _, _ = one_step(build(kind, "fp32", seed), MixedPrecision("fp32"), x, target)
    mp = MixedPrecision(**MODES[mode])
    model = build(kind, mp.precision, seed)
    loss, got, stepped, after = one_step(model, mp, x, target)
    assert stepped
    assert abs(loss - want_loss) / want_loss < STEP_RTOL[mode]
    for n in want:
        storage = BF16_STORAGE_ROUNDING * after[n].norm() if mp.pure_bf16 else 0.0
        err = (got[n] - want[n]).norm()
        assert err < STEP_RTOL[mode] * want[n].norm() + storage, f"{n}: update error {err:.3g}"
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

    def run(mp):
        torch.manual_seed(seed)
        model = build("qlora", mp.precision, seed, "cuda")
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        mp.prepare(model)
        before = {n: p.detach().float().clone() for n, p in params.items()}
        opt = torch.optim.SGD(params.values(), lr=0.1)
        with mp.autocast("cuda"):
            loss = (model(x.bfloat16() if mp.pure_bf16 else x).float() - target).square().mean()
        mp.backward(loss)
        assert mp.step(opt)
        return {n: p.detach().float() - before[n] for n, p in params.items()}

    want, got = run(MixedPrecision("fp32")), run(MixedPrecision(**MODES[mode]))
    for n in want:
        assert (got[n] - want[n]).norm() / want[n].norm() < STEP_RTOL[mode], n


def test_fp16_unscale_gives_true_gradients_before_clipping(seed):
    x, target = torch.randn(16, 12), torch.randn(16, 10)

    def grads(mp):
        model = build("lora", mp.precision, seed)
        mp.prepare(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        with mp.autocast("cpu"):
            loss = (model(x).float() - target).square().mean()
        mp.backward(loss)
        mp.unscale_(opt)  # where gradient clipping would go
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert mp.step(opt)
        return out

    want, got = grads(MixedPrecision("fp32")), grads(MixedPrecision("fp16", init_scale=2.0 ** 10))
    for n in want:
        assert (got[n] - want[n]).norm() < STEP_RTOL["fp16"] * want[n].norm(), n
