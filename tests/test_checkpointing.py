"""Checkpointing policies: same gradients as no checkpointing, less memory kept for backward."""
import copy

import pytest
import torch

from fastvlm.models.vision import VisionConfig, VisionEncoder
from fastvlm.nn.checkpointing import CheckpointPolicy
from fastvlm.utils.activation_memory import LiveTensorBytes
from tests.utils import assert_close

POLICIES = ["full", "selective", "every_k:2", "every_k:3", "offload", "full+offload"]


def tiny_encoder(family="clip", layers=4, image_size=28):
    config = getattr(VisionConfig, family)(image_size=image_size, patch_size=7, hidden_size=32,
                                           num_layers=layers, num_heads=4, intermediate_size=64)
    encoder = VisionEncoder(config)
    with torch.no_grad():  # no constant parameters: every gradient path matters
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return encoder


def gradients(encoder, pixels, select_layers=(-2, -1), autocast=False):
    encoder.zero_grad(set_to_none=True)
    pixels = pixels.detach().clone().requires_grad_(pixels.requires_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        features = encoder(pixels, select_layers=list(select_layers))
        # A random projection, so no gradient is accidentally symmetric.
        loss = sum((f.float() * torch.randn_like(f, dtype=torch.float32)).sum()
                   for f in features)
    loss.backward()
    grads = {n: p.grad for n, p in encoder.named_parameters() if p.requires_grad}
    if pixels.requires_grad:
        grads["pixels"] = pixels.grad
    return grads


def assert_same_gradients(policy, encoder, pixels, **kwargs):
    rng = torch.get_rng_state()
    reference = gradients(encoder.set_checkpointing("none"), pixels, **kwargs)
    torch.set_rng_state(rng)
    got = gradients(encoder.set_checkpointing(policy), pixels, **kwargs)
    assert reference.keys() == got.keys()
    for name, grad in reference.items():  # recomputation repeats the same ops on the same values
        assert grad is not None and grad.abs().sum() > 0, name
        assert torch.equal(got[name], grad), f"{policy}: {name}"


@pytest.mark.parametrize("family", ["clip", "siglip", "dinov2"])
@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "every_k:2"])  # every_k:3 covers it
def test_gradients_match_no_checkpointing(policy, family, seed):
    encoder = tiny_encoder(family)
    assert_same_gradients(policy, encoder, torch.randn(2, 3, 28, 28).requires_grad_())


@pytest.mark.parametrize("policy", POLICIES)
def test_with_frozen_blocks(policy, seed):
    encoder = tiny_encoder(layers=5)
    for block in encoder.blocks[:3]:
        block.requires_grad_(False)
    encoder.patch_embed.requires_grad_(False)
    assert_same_gradients(policy, encoder, torch.randn(2, 3, 28, 28))


@pytest.mark.parametrize("policy", POLICIES)
def test_with_lora_projections(policy, seed):
    from peft import LoraConfig, inject_adapter_in_model

    encoder = tiny_encoder()
    # init_lora_weights=False: B is random, so the adapters change the output.
    # Projections before attention, after it (kept by `selective`), widening and narrowing.
    targets = ["q_proj", "v_proj", "out_proj", "fc1", "fc2"]
    inject_adapter_in_model(LoraConfig(r=4, target_modules=targets, init_lora_weights=False), encoder)
    for name, p in encoder.named_parameters():
        p.requires_grad_("lora_" in name)
    assert sum(p.requires_grad for p in encoder.parameters()) == 4 * len(targets) * 2
    assert_same_gradients(policy, encoder, torch.randn(2, 3, 28, 28))


@pytest.mark.parametrize("policy", POLICIES)
def test_under_autocast(policy, seed):
    assert_same_gradients(policy, tiny_encoder(), torch.randn(2, 3, 28, 28), autocast=True)


def kept_bytes(encoder, policy, pixels):
    encoder.set_checkpointing(policy)
    with LiveTensorBytes() as tracker:
        loss = encoder(pixels)[0].square().mean()
    kept = tracker.live_bytes()
    loss.backward()
    return kept


def test_saved_activation_memory_shrinks(seed):
    encoder = tiny_encoder(layers=6, image_size=56)
    pixels = torch.randn(4, 3, 56, 56)
    kept = {p: kept_bytes(encoder, p, pixels) for p in ["none", "full", "selective", "every_k:2"]}
    # Per block (intermediate 2C here) `none` keeps ~14 [B, T, C]-sized tensors,
    # `selective` 5 (input, attention output, out_proj, fc1), `full` 1 (its input),
    # `every_k:2` alternately 1 and 14.
    assert kept["full"] < 0.1 * kept["none"]
    assert kept["full"] < kept["every_k:2"] < 0.6 * kept["none"]
    assert kept["full"] < kept["selective"] < 0.6 * kept["none"]


@pytest.mark.parametrize("family, intermediate", [("clip", 256), ("siglip", 240)])
def test_selective_keeps_at_most_half_of_none(family, intermediate, seed):
    """Issue 5's memory target, measured like bench_encoder: the MLP widths of
    CLIP-L (4x) and SigLIP-so400m (3.74x), where keeping every matmul output
    held `selective` at 0.5x and 0.63x of `none`."""
    config = getattr(VisionConfig, family)(image_size=56, patch_size=7, hidden_size=64, num_layers=6,
                                           num_heads=4, intermediate_size=intermediate)
    encoder = VisionEncoder(config)
    pixels = torch.randn(2, 3, 56, 56)
    kept = {p: kept_bytes(encoder, p, pixels) for p in ["none", "selective"]}
    assert kept["selective"] <= 0.5 * kept["none"], kept["selective"] / kept["none"]


def test_no_grad_forward_keeps_nothing(seed):
    encoder = tiny_encoder()
    with torch.no_grad(), LiveTensorBytes() as tracker:
        features = encoder(torch.randn(2, 3, 28, 28), select_layers=[-2])
    assert tracker.live_bytes() == sum(f.untyped_storage().nbytes() for f in features)


def test_policy_parsing():
    assert CheckpointPolicy.parse("every_k:3") == CheckpointPolicy("every_k", 3)
    assert CheckpointPolicy.parse("offload") == CheckpointPolicy("none", offload=True)
    assert CheckpointPolicy.parse("every_k:4+offload") == CheckpointPolicy("every_k", 4, offload=True)
    for text in ["none", "full", "selective", "every_k:3", "offload", "full+offload", "selective+offload"]:
        assert str(CheckpointPolicy.parse(text)) == text
    assert [CheckpointPolicy("every_k", 3).checkpoints(i) for i in range(4)] == [True, False, False, True]
    for bad in ["fulll", "full:2", "every_k:x", "every_k:0", "full+fast", "offload+full"]:
        with pytest.raises(ValueError, match="checkpointing"):
            CheckpointPolicy.parse(bad)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", POLICIES)
def test_gpu_gradients_and_memory(policy, seed):
    """On a GPU, offload moves saved activations off the device: live CUDA bytes shrink."""
    encoder = tiny_encoder(layers=4, image_size=112).cuda()
    pixels = torch.randn(8, 3, 112, 112, device="cuda")
    reference = copy.deepcopy(encoder).set_checkpointing("none")
    with LiveTensorBytes() as tracker:
        loss = reference(pixels)[0].square().mean()
    none_bytes = tracker.live_bytes("cuda")
    loss.backward()
    with LiveTensorBytes() as tracker:
        loss = encoder.set_checkpointing(policy)(pixels)[0].square().mean()
    policy_bytes = tracker.live_bytes("cuda")
    loss.backward()
    assert policy_bytes < 0.75 * none_bytes
    # GPU kernels may sum in another order on recompute (atomics): vs float64, bound by `none`
    encoder64 = copy.deepcopy(reference).double()
    encoder64.zero_grad()
    encoder64(pixels.double())[0].square().mean().backward()
    for (name, p), q, r in zip(encoder.named_parameters(), reference.parameters(), encoder64.parameters()):
        assert_close(p.grad, r.grad, q.grad, name=name)


def test_selective_keeps_fused_attention_outputs_including_fastvlms_own_op():
    """The Triton attention op is matched by name (it exists only where Triton imports):
    a rename would silently make `selective` recompute attention."""
    import types

    from torch.utils.checkpoint import CheckpointPolicy as OpPolicy

    import fastvlm.ops.attention  # noqa: F401  (registers torch.ops.fastvlm.*)
    from fastvlm.nn.checkpointing import _selective_policy

    ctx = types.SimpleNamespace(is_recompute=False)
    for op in (torch.ops.fastvlm.mm_attention_fwd.default,
               torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default):
        assert _selective_policy(64)(ctx, op) == OpPolicy.MUST_SAVE, op
    # q/k/v before attention: recomputed; out_proj after it: kept; fc2 (narrowing): recomputed
    policy = _selective_policy(64)
    x, w_in, w_down = torch.empty(4, 64), torch.empty(64, 64), torch.empty(64, 256)
    assert policy(ctx, torch.ops.aten.mm.default, x, w_in) == OpPolicy.PREFER_RECOMPUTE
    policy(ctx, torch.ops.fastvlm.mm_attention_fwd.default)
    assert policy(ctx, torch.ops.aten.mm.default, x, w_in) == OpPolicy.MUST_SAVE
    assert policy(ctx, torch.ops.aten.mm.default, torch.empty(4, 256), w_down) == OpPolicy.PREFER_RECOMPUTE


def test_selective_keeps_every_fastvlm_attention_and_lora_op():
    """Every custom forward op the attention and LoRA backends register is seen whole by the
    checkpoint: an unlisted one is silently recomputed, with everything after it (the CPU
    attention op was, so `selective` on CPU recomputed attention, o_proj, gate_proj, up_proj)."""
    import types

    from torch.utils.checkpoint import CheckpointPolicy as OpPolicy

    import fastvlm.ops.attention  # noqa: F401  (registers torch.ops.fastvlm.*)
    import fastvlm.ops.lora_linear  # noqa: F401
    from fastvlm.nn.checkpointing import _selective_policy
    from fastvlm.ops.backend import REGISTRY

    def forward_ops(op_name):
        names = [n for ops in REGISTRY[op_name].custom_ops.values() for n in ops if n.endswith("_fwd")]
        return [getattr(torch.ops.fastvlm, n.split("::")[1]).default for n in names]

    ctx = types.SimpleNamespace(is_recompute=False)
    attention_ops = forward_ops("multimodal_attention")
    assert len(attention_ops) >= 2
    for op in attention_ops:
        assert _selective_policy(64)(ctx, op) == OpPolicy.MUST_SAVE, op
    lora_ops = forward_ops("lora_linear")
    assert len(lora_ops) >= 2
    x, w_in, w_up, w_down = torch.empty(4, 64), torch.empty(64, 64), torch.empty(256, 64), torch.empty(64, 256)
    for op in lora_ops:
        policy = _selective_policy(64)
        assert policy(ctx, op, x, w_in) == OpPolicy.PREFER_RECOMPUTE, op  # q/k/v: before attention
        policy(ctx, attention_ops[0])
        assert policy(ctx, op, x, w_in) == OpPolicy.MUST_SAVE, op       # o_proj
        assert policy(ctx, op, x, w_up) == OpPolicy.MUST_SAVE, op       # gate / up
        assert policy(ctx, op, torch.empty(4, 256), w_down) == OpPolicy.PREFER_RECOMPUTE, op  # down: narrows
