"""QLoRA: NF4 (double-quant) frozen bases via bitsandbytes, LoRA on top, CPU and CUDA.

What quantization costs is checked where it happens, on the weights, with a bound that
follows from the format; what the layers and models compute is checked against the
dequantized weights in float64, with the rule of tests/utils.
"""
import copy
import sys

import pytest
import torch
from torch import nn

from fastvlm.nn.lora import LoRALinear
from fastvlm.train.lora import lora_layers
from fastvlm.train.quant import NF4_BLOCKSIZE, apply_qlora, dequantized_weight, quantized_state_keys, to_nf4
from tests.lora_models import ALL_PROJ, TinyVLM, tiny_llama
from tests.utils import assert_close, assert_close_rescaled, unit_roundoff


def assert_nf4_error_bounded(w: torch.Tensor, w_dq: torch.Tensor):
    """Every dequantized weight within what NF4 allows. A block of 64 weights is scaled by
    its absmax A (to [-1, 1]) and each weight rounded to the nearest of the 16 NF4 levels;
    the absmax is stored 8-bit quantized (double quant) as A'. Dequantizing gives level * A'
    rounded to the storage dtype, so elementwise
        |w_dq - w| <= (max level gap / 2) * max(A, A') + |A' - A| + u(dtype) * |w_dq|
    (the first term also covers a weight clipped at +-A' when A' < A). A' is read off the
    dequantized block itself: its absmax weight sits on level +-1."""
    import bitsandbytes.functional as bnbf

    levels = bnbf.get_4bit_type("nf4", device="cpu").double()
    half_gap = float(levels.diff().max()) / 2  # 0.152, between -1 and the next level
    blocks = w.detach().double().flatten().unflatten(0, (-1, NF4_BLOCKSIZE))
    blocks_dq = w_dq.detach().double().flatten().unflatten(0, (-1, NF4_BLOCKSIZE))
    a, a_dq = blocks.abs().amax(1, keepdim=True), blocks_dq.abs().amax(1, keepdim=True)
    bound = half_gap * torch.maximum(a, a_dq) + (a_dq - a).abs() + unit_roundoff(w_dq.dtype) * blocks_dq.abs()
    excess = (blocks_dq - blocks).abs() - bound
    assert (excess <= 0).all(), f"NF4 error past its bound by up to {float(excess.max()):.3e}"


def dequantized_twin(model: nn.Module, reference: nn.Module) -> nn.Module:
    """`reference` (the unquantized model) with every quantized layer's weight replaced by the
    weight that layer actually multiplies by; each weight's NF4 error is checked on the way
    where in_features is a multiple of the block (bitsandbytes' CPU path lays out blocks of
    rows of 96 otherwise than in 64-weight runs of the flattened weight, which the bound
    assumes; real models' widths are multiples of 64)."""
    twin = copy.deepcopy(reference)
    modules = dict(twin.named_modules())
    checked = 0
    for name, layer in lora_layers(model).items():
        w_dq = dequantized_weight(layer.base_layer)
        if modules[name].in_features % NF4_BLOCKSIZE == 0:
            assert_nf4_error_bounded(modules[name].weight, w_dq)
            checked += 1
        modules[name].weight.data = w_dq.to(modules[name].weight.dtype)
    assert checked > 0
    return twin


@pytest.mark.parametrize("dtype_name, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_nf4_linear_close_to_fp32(seed, dtype_name, dtype):
    lin = nn.Linear(200, 72)
    q = to_nf4(lin, dtype)
    assert q.weight.dtype == torch.uint8 and q.weight.numel() == 200 * 72 // 2
    state = q.weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # double quantization of the absmax
    x = torch.randn(9, 200)
    y = q(x)
    w_dq = dequantized_weight(q)
    assert_nf4_error_bounded(lin.weight, w_dq)  # the quantization error, weight by weight
    # it multiplies by exactly the dequantized NF4 weight, in the compute dtype: vs float64 on
    # the same values, bound by F.linear in the compute dtype
    xs, ws, bs = x.to(dtype), w_dq.to(dtype), lin.bias.detach().to(dtype)
    want = nn.functional.linear(xs, ws, bs)
    assert_close(y, xs.double() @ ws.double().T + bs.double(), want)


def check_against_dequantized(model, ref, ids, compute_dtype):
    """The QLoRA model (fresh adapters: B = 0) computes the unquantized model with each NF4
    layer's dequantized weights: vs that twin in float64, bound by the twin in fp32 (its
    error rescaled to the compute dtype, which only the NF4 layers run in: a safe overestimate)."""
    twin = dequantized_twin(model, ref)
    with torch.no_grad():
        got, base = model(ids).logits, twin(ids).logits
        want = copy.deepcopy(twin).double()(ids).logits
    assert_close_rescaled(got, want, base, compute_dtype, name="logits")


def test_qlora_model_close_to_unquantized_and_keeps_precision(seed):
    model, ref = tiny_llama(seed), tiny_llama(seed)
    apply_qlora(model, ALL_PROJ, r=4, alpha=8, trainable="lm_head")
    ids = torch.randint(0, 128, (2, 11))
    check_against_dequantized(model, ref, ids, torch.bfloat16)
    assert all(m.quantized for m in lora_layers(model).values())
    for name, p in model.named_parameters():
        if "norm" in name or name.startswith("lm_head") or "lora_" in name:
            assert p.dtype == torch.float32, name


def test_qlora_training_step_updates_only_adapters(seed):
    model = TinyVLM()
    apply_qlora(model, "q_proj,down_proj", r=4, alpha=8, trainable="connector")
    model.q_proj.lora_B.data.normal_(0, 0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randn(6, 12)).square().mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable
    assert any("lora_A" in n for n in changed) and "connector.0.weight" in changed


class CheckpointedLM(nn.Module):
    """Frozen embedding -> re-entrant-checkpointed block -> head, no transformers help."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.q_proj = nn.Linear(32, 32)
        self.down_proj = nn.Linear(32, 50)

    def forward(self, ids):
        h = torch.utils.checkpoint.checkpoint(lambda t: torch.relu(self.q_proj(t)), self.embed(ids),
                                              use_reentrant=True)
        return self.down_proj(h)


@pytest.mark.parametrize("input_grads", [True, False])
@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_checkpointing_with_frozen_embeddings_reaches_adapters(input_grads):
    model = CheckpointedLM()
    apply_qlora(model, "q_proj", r=4, alpha=8, input_grads=input_grads)
    model.q_proj.lora_B.data.normal_()
    loss = model(torch.randint(0, 50, (3, 5))).square().mean()
    if not input_grads:  # the failure enable_input_require_grads exists to prevent
        assert not loss.requires_grad
        return
    loss.backward()
    assert model.q_proj.lora_A.grad.abs().sum() > 0


def test_transformers_checkpointing_reaches_qlora_adapters(seed):
    model = tiny_llama(seed).train()
    apply_qlora(model, "q_proj,v_proj", r=4, alpha=8)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ids = torch.randint(0, 128, (2, 7))
    model(ids, labels=ids).loss.backward()
    grads = [m.lora_B.grad for m in lora_layers(model).values()]  # B = 0 at init, so A's grad is 0
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_nf4_state_keys_without_bitsandbytes_imported(monkeypatch):
    """Every checkpoint asks which keys are NF4; a process that never imported bitsandbytes
    holds no NF4 layer, and must not pay that import (~2 s of CPU per training process)."""
    model = nn.Sequential(nn.Linear(4, 64), nn.Linear(64, 4))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # an import of it now raises
    assert quantized_state_keys(model, model.state_dict()) == set()
    monkeypatch.undo()
    model[1] = to_nf4(model[1], torch.float32)
    keys = quantized_state_keys(model, model.state_dict())
    assert "1.weight" in keys and "1.bias" not in keys and all(k.startswith("1.weight") for k in keys)


def test_merge_into_nf4_is_refused():
    model = TinyVLM()
    apply_qlora(model, "q_proj", r=2, alpha=2)
    with pytest.raises(ValueError, match="merge:.*quantized"):
        model.q_proj.merge()


@pytest.mark.parametrize("kwargs, arg", [
    (dict(targets="connector"), "targets:.*nn.Linear"),
    (dict(targets="q_proj", compute_dtype="int8"), "compute_dtype:"),
    (dict(targets="q_proj", r=0), "r:"),
    (dict(targets="nonexistent"), "targets:.*nonexistent"),
    (dict(targets="q_proj", trainable="no_such_module"), "trainable:"),
    (dict(targets="q_proj", alpha=-1), "alpha:"),
])
def test_qlora_bad_config(kwargs, arg):
    model = TinyVLM()
    with pytest.raises(ValueError, match=arg):
        apply_qlora(model, **kwargs)
    assert all(type(m) is not LoRALinear and m.weight.is_floating_point()  # left untouched
               for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.gpu
def test_qlora_cuda_step(seed):
    model = tiny_llama(seed).cuda()
    apply_qlora(model, ALL_PROJ, r=8, alpha=16)
    ref = tiny_llama(seed).cuda()
    ids = torch.randint(0, 128, (2, 33), device="cuda")
    check_against_dequantized(model, ref, ids, torch.bfloat16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    assert all(torch.isfinite(m.lora_A).all() for m in lora_layers(model).values())
