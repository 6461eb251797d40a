"""`fastvlm export RUN --format hf-llava|peft|fastvlm OUT`: a trained model in the formats people serve.

- ``hf-llava``: a directory ``transformers.LlavaForConditionalGeneration.from_pretrained``
  loads with the same logits (LoRA merged; fastvlm.models.hf_export holds the mapping),
  the tokenizer files, and a processor config (``AutoProcessor`` gives a ``LlavaProcessor``
  whose image processor produces fastvlm's pixel values and expands each image token as
  fastvlm does).
- ``peft``: the LoRA adapters in PEFT's format (``adapter_llm/``, ``adapter_vision/``)
  plus ``connector.safetensors`` (the connector's weights) and the fastvlm ``config.json``
  they belong to.
- ``fastvlm``: the native directory (``VLM.save_pretrained``), LoRA merged.

RUN is a run directory (its ``final/`` model, else its newest complete checkpoint), one
checkpoint directory (see fastvlm.train.checkpoint.load_for_inference), or a bare fastvlm /
HF LLaVA model directory such as RUN/final (its tokenizer read from tokenizer/ or beside it).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from fastvlm.models.hf_export import (
    added_token_ids,
    image_processor_config,
    merged_state_dict,
    processor_config,
    to_hf_llava,
)
from fastvlm.utils.io import atomic_write, atomic_write_text

FORMATS = ("hf-llava", "peft", "fastvlm")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def add_export_args(parser) -> None:
    parser.add_argument("run", help="run directory, checkpoint directory, or a model directory (e.g. RUN/final)")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--format", dest="format", choices=FORMATS, default="hf-llava",
                        help="hf-llava (transformers LLaVA dir), peft (adapters + connector), fastvlm (native)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="weight dtype of the export (default: the LLM's)")
    parser.add_argument("--allow-causal", action="store_true",
                        help="hf-llava: export a model trained with a non-causal attention layout anyway "
                             "(HF runs causal attention; logits differ)")


def cli_export(args) -> int:
    out = export(args.run, args.out, args.format, allow_causal=args.allow_causal,
                 dtype=DTYPES[args.dtype] if args.dtype else None)
    print(f"exported {args.run} as {args.format} to {out}")
    return 0


def export(run_or_checkpoint, out, format: str = "hf-llava", *, allow_causal: bool = False,
           dtype: torch.dtype | None = None) -> Path:
    """Export a run or checkpoint; returns the output directory."""
    from fastvlm.train.checkpoint import complete_checkpoints, load_for_inference
    from fastvlm.train.stage_data import preprocessor_for

    if format not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {format!r}")
    source = Path(run_or_checkpoint)
    adapter = source / "final" / "adapter"
    if format == "peft" and (source / "final").is_dir() and not adapter.is_dir():
        # final/ has its LoRA merged; the newest checkpoint still holds the adapters.
        found = complete_checkpoints(source / "checkpoints")
        source = found[-1] if found else source
    if (source / "config.json").is_file() and not (source / "recipe.toml").is_file() and \
            not (source / "meta.json").is_file():
        model, tokenizer = _load_model_dir(source)  # a bare model directory, e.g. RUN/final
    else:
        model, tokenizer, _ = load_for_inference(source)
    return export_model(model, out, format, tokenizer=tokenizer, preprocessor=preprocessor_for(model),
                        allow_causal=allow_causal, dtype=dtype,
                        saved_adapter=adapter if adapter.is_dir() else None)


def _load_model_dir(path: Path):
    """A fastvlm or HF LLaVA directory, with its tokenizer beside it (tokenizer/ or the dir itself) if any."""
    from fastvlm.data import load_tokenizer
    from fastvlm.models.vlm import VLM

    model = VLM.from_pretrained(path).eval()
    for folder in (path / "tokenizer", path):
        if (folder / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(folder)
            if tokenizer.image_token_id == model.config.image_token_id:
                return model, tokenizer
    return model, None


def export_model(model, out, format: str = "hf-llava", *, tokenizer=None, preprocessor=None,
                 allow_causal: bool = False, dtype: torch.dtype | None = None, saved_adapter=None) -> Path:
    """Export a live VLM. `tokenizer` (fastvlm.data Tokenizer) and `preprocessor`
    (ImagePreprocessor) go beside an hf-llava export; `saved_adapter` is a PEFT adapter
    directory written before the LoRA was merged (RUN/final/adapter)."""
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {format!r}")
    if dtype is not None and dtype not in HF_DTYPE_NAMES:
        raise ValueError(f"dtype: expected one of {sorted(map(str, HF_DTYPE_NAMES))}, got {dtype}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if format == "hf-llava":
        _export_hf_llava(model, out, tokenizer, preprocessor, allow_causal, dtype)
    elif format == "peft":
        _export_peft(model, out, saved_adapter)
    else:
        _export_fastvlm(model, out, dtype)
    return out


def _cast(state: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _save_tensors(path: Path, state: dict) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda p: save_file(state, p, metadata={"format": "pt"}))


def _write_json(path: Path, value: dict) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def _export_hf_llava(model, out: Path, tokenizer, preprocessor, allow_causal: bool, dtype) -> None:
    token_ids, vocab = {}, model.config.llm.vocab_size
    if tokenizer is not None:
        _check_tokenizer(model, tokenizer)
        token_ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id}
        vocab = max(vocab, tokenizer.vocab_size)
    vocab = max(vocab, model.config.image_token_id + 1)
    config, state = to_hf_llava(model, allow_causal=allow_causal, token_ids=token_ids, vocab_size=vocab)
    dtype = dtype or model.language_model.model.embed_tokens.weight.dtype
    config["dtype"] = HF_DTYPE_NAMES[dtype]
    _save_tensors(out / "model.safetensors", _cast(state, dtype))
    _write_json(out / "config.json", config)
    generation = {k: v for k, v in token_ids.items() if v is not None}
    added = added_token_ids(model, vocab)
    if added:  # their logits are 0, not -inf: never let generation pick them
        generation["suppress_tokens"] = added
    _write_json(out / "generation_config.json", generation)
    if tokenizer is not None:
        tokenizer.save(out)
        _write_json(out / "processor_config.json",
                    processor_config(model, tokenizer.image_token, tokenizer.chat_template))
    if preprocessor is not None:
        _write_json(out / "preprocessor_config.json", image_processor_config(preprocessor, model.config.vision.family))


def _check_tokenizer(model, tokenizer) -> None:
    if tokenizer.image_token_id != model.config.image_token_id:
        raise ValueError(f"tokenizer: its image token {tokenizer.image_token!r} has id {tokenizer.image_token_id}, "
                         f"the model's image_token_id is {model.config.image_token_id}")


def _export_fastvlm(model, out: Path, dtype) -> None:
    from fastvlm.models.vlm import VLM

    plain = VLM(model.config)
    state = {k: v for k, v in merged_state_dict(model).items() if not k.startswith("contrastive_heads.")}
    plain.load_state_dict(state)
    if dtype is not None:
        plain.to(dtype)
    plain.save_pretrained(out)


def _export_peft(model, out: Path, saved_adapter) -> None:
    from fastvlm.train.lora import save_adapter

    written = []
    for part, attr in (("llm", "language_model"), ("vision", "vision_tower")):
        module = getattr(model, attr)
        if getattr(module, "lora_config", None) is not None:
            save_adapter(module, str(out / f"adapter_{part}"))
            written.append(part)
    if "llm" not in written and saved_adapter is not None:
        target = out / "adapter_llm"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(saved_adapter, target)
        written.append("llm")
    if not written:
        raise ValueError("run: the model has no LoRA adapters (its last stage trained none, or they were merged "
                         "without a saved adapter); use --format fastvlm or hf-llava")
    _save_tensors(out / "connector.safetensors",
                  {f"multi_modal_projector.{k}": v.detach().contiguous().cpu()
                   for k, v in model.multi_modal_projector.state_dict().items()})
    _write_json(out / "config.json", {"model_type": "fastvlm_vlm", "config": model.config.to_dict(),
                                      "adapters": [f"adapter_{p}" for p in written]})
