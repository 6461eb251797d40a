"""VQA evaluation of a Hugging Face VLM run (``model.source = "hf"``) with the model's own
``generate``: what fastvlm.train.evaluation does for ``fastvlm.VLM``, through the run's
processor instead of a fastvlm template.

- ``prompt_text``: a question's prompt, the conversation up to that question (earlier turns
  with their reference answers) as transformers chat messages
  (fastvlm.data.hf_processor.to_messages, as training renders them), rendered by the
  processor's chat template (or ``data.chat_template``) with ``add_generation_prompt=True``;
- ``generate_hf_answers``: the prompts and their images through the processor (its image
  processor, the placeholders expanded, left padding, no special tokens added: the template
  writes them, as in training), then ``generate`` greedily (the KV cache), batched over
  prompts with the same number of images and of similar length; each answer is the decoded
  new tokens up to the first EOS (the tokenizer's and the generation config's);
- ``hf_validation_loss``: the teacher-forced loss of the full conversations, each through
  fastvlm.data.hf_processor (labels: the assistant turns, as in training) in padded
  batches, averaged over every supervised token.

Scoring (exact match after normalisation, per question type, chance) is evaluation's.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fastvlm.data.hf_collate import HFPaddedCollator
from fastvlm.data.hf_processor import (
    HFProcessorDataset,
    end_answers,
    image_token_ids,
    message_spans,
    special_texts,
    to_messages,
)
from fastvlm.data.images import open_image
from fastvlm.integrations.hf_trainable import HFVLM
from fastvlm.train.hf_build import RunProcessor


def prompt_text(processor: RunProcessor, turns: list[dict], system: str | None = None) -> str:
    """The chat template's render of `turns` (LLaVA-form, ending on a user turn) followed by
    the generation prompt: what the model continues with its answer. Earlier answers end as
    in training (an EOS where the template renders no end of turn: hf_processor.end_answers)."""
    proc = processor.processor
    messages = to_messages(turns, system)

    def render(messages):
        return proc.apply_chat_template(messages, chat_template=processor.chat_template, tokenize=False,
                                        add_generation_prompt=True)
    if not any(m["role"] == "assistant" for m in messages):
        return render(messages)
    text, spans = message_spans(render, messages, "(an evaluation prompt)")
    answers = [s for s, m in zip(spans, messages) if m["role"] == "assistant" and s is not None]
    return end_answers(text, answers, proc.tokenizer, special_texts(proc.tokenizer, image_token_ids(proc)))[0]


def _eos_ids(model: HFVLM, processor: RunProcessor) -> list[int]:
    ids = model.hf.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    eos = processor.processor.tokenizer.eos_token_id
    return ids + ([eos] if eos is not None and eos not in ids else [])


def processor_inputs(model: HFVLM, processor: RunProcessor, texts: list[str], images: list[list] | None) -> dict:
    """The processor's batch of `texts` (left-padded) and their images (one list per text),
    on the model's device, floating inputs in the vision tower's dtype."""
    out = processor.processor(text=texts, images=images, add_special_tokens=False, padding=True,
                              padding_side="left", return_tensors="pt")
    device = next(model.parameters()).device
    dtype = next(model.vision_tower.parameters()).dtype
    return {k: v.to(device, dtype if v.is_floating_point() else None) for k, v in out.items()}


@torch.no_grad()
def generate_hf_answers(model: HFVLM, processor: RunProcessor, questions: list[dict], *, image_root,
                        max_new_tokens: int = 16, batch_size: int = 32) -> list[str]:
    """Greedy generations (decoded new tokens, special tokens dropped) of `questions`
    (``prompt``: text from prompt_text, ``images``: paths under `image_root`)."""
    tokenizer = processor.processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(model, processor)
    # a batch holds prompts with one number of images (a processor takes one list per text)
    order = sorted(range(len(questions)), key=lambda i: (len(questions[i]["images"]), len(questions[i]["prompt"])))
    batches, current = [], []
    for i in order:
        if current and (len(current) == batch_size or
                        len(questions[i]["images"]) != len(questions[current[0]]["images"])):
            batches.append(current)
            current = []
        current.append(i)
    batches += [current] if current else []
    answers: list[str | None] = [None] * len(questions)
    for batch in batches:
        images = [[open_image(Path(image_root) / p) for p in questions[i]["images"]] for i in batch]
        inputs = processor_inputs(model, processor, [questions[i]["prompt"] for i in batch],
                                  images if images[0] else None)
        tokens = model.hf.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                   eos_token_id=eos, pad_token_id=pad)
        width = inputs["input_ids"].shape[1]
        for row, i in enumerate(batch):
            out = tokens[row, width:].tolist()
            cut = next((k for k, t in enumerate(out) if t in eos), len(out))
            answers[i] = tokenizer.decode(out[:cut], skip_special_tokens=True)
    return answers


@torch.no_grad()
def hf_validation_loss(model: HFVLM, processor: RunProcessor, samples, *, image_root, batch_size: int = 32,
                       system: str | None = None) -> tuple[float, int]:
    """(mean teacher-forced loss over every supervised token, number of those tokens); a
    sample the processor cannot use is an error naming it (the evaluated samples' images were
    checked before)."""
    dataset = HFProcessorDataset(samples, image_root, processor.processor, chat_template=processor.chat_template,
                                 system=system, strict=True)
    collate = HFPaddedCollator(processor.pad_token_id if processor.pad_token_id is not None else 0)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        n = batch["supervised_tokens"]
        if n:
            total += float(model(**model.batch_inputs(batch, device))) * n  # in the loss dtype (float64 stays so)
            count += n
    if count == 0:
        raise ValueError("samples: no supervised token to compute a validation loss on")
    return total / count, count
