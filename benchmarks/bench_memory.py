"""Training memory of full fine-tuning vs LoRA vs QLoRA on a LLaVA-shaped VLM.

Two parts, one run:
- analytic: bytes of weights, gradients and optimizer state for LLaVA-1.5-7B
  (CLIP ViT-L/14-336 -> 2-layer MLP connector -> Vicuna-7B), from the parameter
  inventory and the storage rules below (activations depend on batch, sequence
  and checkpointing and are not modelled);
- measured: the same model family built at a small shape (transformers configs,
  no download), set up by fastvlm.train (apply_lora / apply_qlora, MixedPrecision
  bf16, AdamW or bitsandbytes AdamW8bit), two training steps; bytes counted from
  the live tensors, and the peak of live tensor bytes during the second step
  (CUDA: torch.cuda.max_memory_allocated; CPU: storages tracked through a
  dispatch mode, so allocator slack and kernel scratch are not included). The
  analytic rules are applied to the small shape too, so the two can be compared.

Storage rules (mixed-precision bf16, as fastvlm.train.precision sets it up):
trainable params fp32 (master) + fp32 grads; frozen params bf16 except norms (fp32);
QLoRA's targeted LLM Linears NF4 with double quantization; AdamW 8 B/param (+ a
4-byte step per tensor), AdamW8bit 2 B/param + two fp32 absmax per 256-block
(tensors under 4096 elements keep fp32 state, as bitsandbytes does).

    python benchmarks/bench_memory.py            # 7B analytic + measured at a small shape
    python benchmarks/bench_memory.py --small    # tiny measured shape (what the test runs)
"""
from __future__ import annotations

import argparse
import math
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastvlm.train.lora import apply_lora
from fastvlm.train.optim import build_optimizer
from fastvlm.train.precision import MixedPrecision
from fastvlm.train.quant import NF4_BLOCKSIZE, apply_qlora

from common import environment, print_header, save_results

LLM_TARGETS = r"language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
NF4_CODE_BYTES = 16 * 4 + 256 * 4 + 4  # per tensor: NF4 code, nested 8-bit code, nested offset (fp32)
NESTED_BLOCK = 256  # blocks of absmax quantized together by double quantization
BNB_MIN_8BIT = 4096  # bitsandbytes keeps fp32 state for smaller tensors
BNB_OPT_BLOCK = 256
BNB_QMAP_BYTES = 2 * 256 * 4  # the two quantization maps, shared by all params
METHODS = ("full", "lora", "qlora")


@dataclass(frozen=True)
class VLMShape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    enc_hidden: int
    enc_intermediate: int
    enc_layers: int
    enc_heads: int
    patch: int
    image: int


LLAVA_7B = VLMShape(vocab=32000, hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32,
                    enc_hidden=1024, enc_intermediate=4096, enc_layers=24, enc_heads=16, patch=14, image=336)
SMALL = VLMShape(vocab=2048, hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=8,
                 enc_hidden=256, enc_intermediate=1024, enc_layers=4, enc_heads=4, patch=14, image=112)
TINY = VLMShape(vocab=512, hidden=128, intermediate=352, layers=2, heads=4, kv_heads=4,
                enc_hidden=64, enc_intermediate=256, enc_layers=2, enc_heads=2, patch=14, image=56)


@dataclass(frozen=True)
class Tensor_:
    numel: int
    part: str  # encoder | connector | llm
    kind: str  # target (a LoRA/NF4-targeted Linear weight) | norm | other


def inventory(s: VLMShape) -> list[Tensor_]:
    """Every parameter tensor of the LLaVA-1.5 architecture (CLIP ViT + MLP + Llama)."""
    out = []
    d, i = s.enc_hidden, s.enc_intermediate
    positions = (s.image // s.patch) ** 2 + 1
    out += [Tensor_(3 * s.patch ** 2 * d, "encoder", "other"), Tensor_(d, "encoder", "other"),
            Tensor_(positions * d, "encoder", "other")]
    out += [Tensor_(d, "encoder", "norm")] * 4  # pre- and post-layernorm, weight + bias
    for _ in range(s.enc_layers):
        out += [Tensor_(d * d, "encoder", "other"), Tensor_(d, "encoder", "other")] * 4  # q k v out
        out += [Tensor_(d * i, "encoder", "other"), Tensor_(i, "encoder", "other"),
                Tensor_(i * d, "encoder", "other"), Tensor_(d, "encoder", "other")]
        out += [Tensor_(d, "encoder", "norm")] * 4
    h, kv = s.hidden, s.kv_heads * (s.hidden // s.heads)
    out += [Tensor_(d * h, "connector", "other"), Tensor_(h, "connector", "other"),
            Tensor_(h * h, "connector", "other"), Tensor_(h, "connector", "other")]
    out += [Tensor_(s.vocab * h, "llm", "other")] * 2  # embeddings, untied LM head
    out += [Tensor_(h, "llm", "norm")]
    for _ in range(s.layers):
        out += [Tensor_(n, "llm", "target") for n in (h * h, h * kv, h * kv, h * h,
                                                      h * s.intermediate, h * s.intermediate,
                                                      s.intermediate * h)]
        out += [Tensor_(h, "llm", "norm")] * 2
    return out


def lora_tensors(s: VLMShape, r: int) -> list[int]:
    """Element counts of the LoRA A and B tensors on every targeted LLM Linear."""
    h, kv, f = s.hidden, s.kv_heads * (s.hidden // s.heads), s.intermediate
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]  # (in, out)
    return [n for _ in range(s.layers) for k, o in shapes for n in (r * k, o * r)]


def nf4_bytes(n: int) -> int:
    blocks = math.ceil(n / NF4_BLOCKSIZE)
    return n // 2 + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + NF4_CODE_BYTES


def adam_state_bytes(sizes: list[int], optimizer: str) -> int:
    if optimizer == "adamw":
        return sum(8 * n + 4 for n in sizes)
    total = BNB_QMAP_BYTES
    for n in sizes:
        total += 2 * n + 8 * math.ceil(n / BNB_OPT_BLOCK) if n >= BNB_MIN_8BIT else 8 * n
    return total


def analytic(s: VLMShape, method: str, optimizer: str, r: int) -> dict:
    """Bytes of weights, grads and optimizer state under the storage rules in the docstring."""
    weights, trainable = 0, []
    for t in inventory(s):
        trains = method == "full" and t.part != "encoder" or method != "full" and t.part == "connector"
        if trains:
            trainable.append(t.numel)
            weights += 4 * t.numel
        elif t.kind == "norm":
            weights += 4 * t.numel
        elif method == "qlora" and t.kind == "target":
            weights += nf4_bytes(t.numel)
        else:
            weights += 2 * t.numel
    if method != "full":
        adapters = lora_tensors(s, r)
        trainable += adapters
        weights += 4 * sum(adapters)
    return {"weights_bytes": weights, "grads_bytes": 4 * sum(trainable),
            "optimizer_bytes": adam_state_bytes(trainable, optimizer), "trainable_params": sum(trainable)}


class MiniLLaVA(nn.Module):
    """CLIP vision tower -> MLP connector -> Llama, LLaVA-1.5's wiring (transformers modules)."""

    def __init__(self, s: VLMShape):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

        self.vision_tower = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=s.enc_hidden, intermediate_size=s.enc_intermediate, num_hidden_layers=s.enc_layers,
            num_attention_heads=s.enc_heads, patch_size=s.patch, image_size=s.image))
        self.connector = nn.Sequential(nn.Linear(s.enc_hidden, s.hidden), nn.GELU(), nn.Linear(s.hidden, s.hidden))
        self.language_model = LlamaForCausalLM(LlamaConfig(
            vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
            num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, tie_word_embeddings=False))

    def forward(self, pixel_values, input_ids):
        feats = self.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        image = self.connector(feats)
        text = self.language_model.get_input_embeddings()(input_ids)
        embeds = torch.cat([image, text], 1)
        labels = torch.cat([torch.full(image.shape[:2], -100, device=input_ids.device), input_ids], 1)
        return self.language_model(inputs_embeds=embeds, labels=labels).loss


def build(s: VLMShape, method: str, r: int, device) -> nn.Module:
    model = MiniLLaVA(s).to(device)
    if method == "full":
        model.requires_grad_(True)
        model.vision_tower.requires_grad_(False)
    elif method == "lora":
        apply_lora(model, LLM_TARGETS, r=r, alpha=2 * r, trainable="connector")
    else:
        apply_qlora(model, LLM_TARGETS, r=r, alpha=2 * r, trainable="connector")
    return MixedPrecision("bf16").prepare(model)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def weight_tensors(model: nn.Module):
    for p in model.parameters():
        yield p
        state = getattr(p, "quant_state", None)
        if state is not None:  # NF4: packed codes + double-quantized absmax
            yield from (state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the region and still alive."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, key):
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key = id(st)
                if key not in self.live and st.nbytes():
                    self.live[key] = st.nbytes()
                    self.current += st.nbytes()
                    weakref.finalize(st, self._release, key)  # storages keep their Python object alive
        self.peak = max(self.peak, self.current)
        return out


def measure(s: VLMShape, method: str, optimizer: str, r: int, device, batch: int = 2, text: int = 32) -> dict:
    torch.manual_seed(0)
    model = build(s, method, r, device)
    opt = build_optimizer([{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-4}], optimizer)
    mp = MixedPrecision("bf16")
    pixels = torch.randn(batch, 3, s.image, s.image, device=device)
    ids = torch.randint(0, s.vocab, (batch, text), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with mp.autocast(torch.device(device).type):
            loss = model(pixels, ids)
        mp.backward(loss)
        mp.step(opt)

    step()  # creates the optimizer state
    static = storage_bytes(weight_tensors(model)) + storage_bytes(tree_flatten(list(opt.state.values()))[0])
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        opt.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated()
    else:
        opt.zero_grad(set_to_none=True)
        with LiveBytes() as tracker:
            step()
        peak = static + tracker.peak
    return {"weights_bytes": storage_bytes(weight_tensors(model)),
            "grads_bytes": storage_bytes(p.grad for p in model.parameters() if p.grad is not None),
            "optimizer_bytes": storage_bytes(tree_flatten(list(opt.state.values()))[0]),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "peak_bytes": peak}


def human(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.2f} MiB"


def markdown(rows: list[dict]) -> str:
    lines = ["| shape | method | optimizer | source | trainable params | weights | grads | optimizer state "
             "| weights+grads+opt | peak |", "|" + "---|" * 10]
    for row in rows:
        static = row["weights_bytes"] + row["grads_bytes"] + row["optimizer_bytes"]
        peak = human(row["peak_bytes"]) if "peak_bytes" in row else "n/a (activations not modelled)"
        lines.append(f"| {row['shape']} | {row['method']} | {row['optimizer']} | {row['source']} | "
                     f"{row['trainable_params']:,} | {human(row['weights_bytes'])} | {human(row['grads_bytes'])} | "
                     f"{human(row['optimizer_bytes'])} | {human(static)} | {peak} |")
    return "\n".join(lines) + "\n"


def run(small: bool, r: int, device: str) -> list[dict]:
    rows = []
    cases = [(m, "adamw") for m in METHODS] + [("qlora", "adamw8bit")]
    if not small:
        rows += [{"shape": "llava-1.5-7b", "method": m, "optimizer": o, "source": "analytic",
                  **analytic(LLAVA_7B, m, o, r)} for m, o in cases]
    name, shape = ("tiny", TINY) if small else ("small", SMALL)
    for m, o in cases:
        rows.append({"shape": name, "method": m, "optimizer": o, "source": "analytic",
                     **analytic(shape, m, o, r)})
        rows.append({"shape": name, "method": m, "optimizer": o, "source": f"measured ({device})",
                     **measure(shape, m, o, r, device)})
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny measured shape, no 7B rows (the test)")
    ap.add_argument("--rank", type=int, default=128, help="LoRA rank (LLaVA-1.5's LoRA recipe: 128)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = ap.parse_args(argv)
    env = environment(args.device)
    print_header("training memory: full vs LoRA vs QLoRA (bench_memory.py)", env)
    rows = run(args.small, args.rank, args.device)
    table = markdown(rows)
    print(table)
    payload = {"benchmark": "bench_memory", "env": env, "rank": args.rank,
               "shapes": {"llava-1.5-7b": asdict(LLAVA_7B), "small": asdict(SMALL), "tiny": asdict(TINY)},
               "rows": rows}
    if args.out or not args.small:
        save_results("bench_memory", env, payload, table, args.out)
    return rows


if __name__ == "__main__":
    main()
