"""QLoRA: NF4 (double-quant) frozen bases via bitsandbytes, LoRA on top, CPU and CUDA."""
import pytest
import torch
from torch import nn

from fastvlm.nn.lora import LoRALinear
from fastvlm.train.lora import lora_layers
from fastvlm.train.quant import apply_qlora, dequantized_weight, to_nf4
from tests.lora_models import ALL_PROJ, TinyVLM, tiny_llama

# NF4 has 16 levels per 64-weight block: a gaussian weight's quantization error is
# ~10% of its scale, which averages down over K products to a few % of the output.
NF4_OUTPUT_RTOL = 0.15


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("dtype_name, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_nf4_linear_close_to_fp32(seed, dtype_name, dtype):
    lin = nn.Linear(200, 72)
    q = to_nf4(lin, dtype)
    assert q.weight.dtype == torch.uint8 and q.weight.numel() == 200 * 72 // 2
    state = q.weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # double quantization of the absmax
    x = torch.randn(9, 200)
    y = q(x)
    assert rel_err(y, lin(x)) < NF4_OUTPUT_RTOL
    # it multiplies by exactly the dequantized NF4 weight, in the compute dtype
    want = nn.functional.linear(x.to(dtype), dequantized_weight(q).to(dtype), lin.bias.to(dtype))
    assert rel_err(y, want) < 2e-2


def test_qlora_model_close_to_unquantized_and_keeps_precision():
    model, ref = tiny_llama(seed=3), tiny_llama(seed=3)
    apply_qlora(model, ALL_PROJ, r=4, alpha=8, trainable="lm_head")
    ids = torch.randint(0, 128, (2, 11))
    assert rel_err(model(ids).logits, ref(ids).logits) < NF4_OUTPUT_RTOL
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


def test_transformers_checkpointing_reaches_qlora_adapters():
    model = tiny_llama(seed=4).train()
    apply_qlora(model, "q_proj,v_proj", r=4, alpha=8)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ids = torch.randint(0, 128, (2, 7))
    model(ids, labels=ids).loss.backward()
    grads = [m.lora_B.grad for m in lora_layers(model).values()]  # B = 0 at init, so A's grad is 0
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


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
def test_qlora_cuda_step():
    model = tiny_llama(seed=5).cuda()
    apply_qlora(model, ALL_PROJ, r=8, alpha=16)
    ref = tiny_llama(seed=5).cuda()
    ids = torch.randint(0, 128, (2, 33), device="cuda")
    assert rel_err(model(ids).logits, ref(ids).logits) < NF4_OUTPUT_RTOL
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    assert all(torch.isfinite(m.lora_A).all() for m in lora_layers(model).values())
