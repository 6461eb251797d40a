"""VQA evaluation: greedy answers with the KV cache, exact match after normalisation,
accuracy per question type next to its chance level, and the validation loss.

Every question turn of a conversation is one question: the prompt is the conversation
up to that turn (earlier turns with their reference answers), rendered by the
template exactly as training rendered it (fastvlm.data.encode_prompt), with the
images whose ``<image>`` tags it contains. ``VLM.generate`` decodes greedily; an
answer ends at EOS or at the first newline (the ``literal`` template ends answers with
"\\n"). Answers and references are compared after ``normalize_answer``: lower case,
punctuation dropped, articles dropped, number words to digits ("two" -> "2").

The validation loss is the teacher-forced next-token loss of the full conversations
(labels from fastvlm.data.encode_conversation), averaged over all supervised tokens.

``fastvlm eval RUN_OR_CHECKPOINT [--split validation]`` runs it on a run's data and
writes RUN/eval/<name>.json and .md.
"""
from __future__ import annotations

import contextlib
import functools
import json
import re
import string
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from fastvlm.data import Sample, encode_conversation, encode_prompt, load_tokenizer
from fastvlm.data.images import BadImageCounter, BadImageError, open_image
from fastvlm.integrations.hf_trainable import HFVLM
from fastvlm.train import distributed
from fastvlm.train.hf_evaluation import generate_hf_answers, hf_validation_loss, prompt_text
from fastvlm.train.preference_eval import evaluate_preference
from fastvlm.train.recipe import Recipe
from fastvlm.train.stage_data import RunData, check_skipped, prepare_data, preprocessor_for
from fastvlm.utils.io import atomic_write_text

ARTICLES = {"a", "an", "the"}
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
     "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"))}
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
IMAGE_TAG = "<image>"


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles dropped, number words as digits, single spaces.
    A decimal point between digits is kept ("1.5"), other punctuation becomes a space."""
    text = text.lower().strip()
    text = re.sub(r"(?<=\d)\.(?=\d)", "\0", text)
    text = _PUNCTUATION.sub(" ", text).replace("\0", ".")
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


def first_answer(text: str) -> str:
    """The answer a generation holds: up to its first newline."""
    return text.split("\n", 1)[0]


def _turn_types(sample, question_types, n_questions: int) -> list[str]:
    """Per question turn: from `question_types` (id -> type or list), the record's own
    fields (dict records from the synthetic dataset), or "all"."""
    sid = _field(sample, "id")
    types = None
    if question_types is not None and sid in question_types:
        types = question_types[sid]
    elif _field(sample, "question_types") is not None:
        types = _field(sample, "question_types")
    elif _field(sample, "question_type") is not None:
        types = _field(sample, "question_type")
    if types is None:
        return ["all"] * n_questions
    if isinstance(types, str):  # one type for the sample: its last question's (the record's question_type)
        return ["all"] * (n_questions - 1) + [types] if n_questions > 1 else [types]
    if len(types) != n_questions:
        raise ValueError(f"question_types: sample {sid!r} has {n_questions} questions but {len(types)} types")
    return list(types)


def _field(sample, name):
    return sample.get(name) if isinstance(sample, dict) else getattr(sample, name, None)


def _as_sample(sample):

    if isinstance(sample, Sample):
        return sample
    if isinstance(sample, dict):
        images = sample.get("images") or ([sample["image"]] if sample.get("image") else [])
        return Sample(id=str(sample.get("id", "")), images=list(images), conversations=list(sample["conversations"]))
    raise ValueError(f"samples: expected fastvlm.data.Sample objects or LLaVA dict records, "
                     f"got {type(sample).__name__}")


def questions_of(samples: Sequence, tokenizer, template: str, image_tokens: int, question_types=None,
                 system: str | None = None, prompt_of=None) -> list[dict]:
    """One entry per question turn: id, turn, type, prompt ids, reference answer, image paths.
    `prompt_of(turns)`: the prompt of the turns before an answer instead of its ids (a
    Hugging Face VLM's rendered text: fastvlm.train.hf_evaluation.prompt_text)."""

    questions = []
    for raw in samples:
        sample = _as_sample(raw)
        turns = sample.conversations
        answers = [k for k, t in enumerate(turns) if t.get("from", t.get("role")) in ("gpt", "assistant")]
        types = _turn_types(raw, question_types, len(answers))
        first_prompt = None
        for turn, (k, qtype) in enumerate(zip(answers, types)):
            prefix = turns[:k]
            used = sum(_text(t).count(IMAGE_TAG) for t in prefix)
            prompt = (prompt_of(prefix) if prompt_of is not None
                      else encode_prompt(prefix, tokenizer, template, image_tokens, system=system))
            first_prompt = first_prompt or prompt
            # prefix_lm's bidirectional prefix, as in training: what precedes the first answer.
            questions.append({"id": sample.id, "turn": turn, "type": qtype, "answer": _text(turns[k]),
                              "images": sample.images[:used], "prompt": prompt, "prefix_len": len(first_prompt)})
    return questions


def _text(turn: dict) -> str:
    value = turn.get("value", turn.get("content", ""))
    if isinstance(value, list):  # messages-style content parts
        return "".join(IMAGE_TAG if p.get("type") == "image" else p.get("text", "") for p in value)
    return value


def _prefix_lm(model) -> bool:
    return model.config.attention_kind == "prefix_lm"


def _pixels(preprocessor, image_root: Path, paths: list[str]):
    if not paths:
        return None
    return preprocessor([Path(image_root) / p for p in paths])


@torch.no_grad()
def generate_answers(model, tokenizer, questions: list[dict], *, image_root, preprocessor, max_new_tokens: int = 16,
                     batch_size: int = 32) -> list[str]:
    """Greedy answers (KV cache), batched over prompts of similar length, left-padded."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(questions)), key=lambda i: len(questions[i]["prompt"]))
    answers: list[str | None] = [None] * len(questions)
    for start in range(0, len(order), batch_size):
        batch = [questions[i] for i in order[start:start + batch_size]]
        width = max(len(q["prompt"]) for q in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        prefix = torch.zeros(len(batch), width, dtype=torch.bool)
        for row, q in enumerate(batch):
            start_at = width - len(q["prompt"])
            ids[row, start_at:] = torch.tensor(q["prompt"])
            mask[row, start_at:] = 1
            prefix[row, start_at:start_at + q["prefix_len"]] = True
        pixels = _pixels(preprocessor, image_root, [p for q in batch for p in q["images"]])
        extra = {"prefix_mask": prefix.to(device)} if _prefix_lm(model) else {}
        tokens = model.generate(ids.to(device), pixels.to(device) if pixels is not None else None,
                                attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, **extra)
        for row, index in enumerate(order[start:start + batch_size]):
            out = tokens[row].tolist()
            if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in out:
                out = out[:out.index(tokenizer.eos_token_id)]
            answers[index] = first_answer(tokenizer.decode(out, skip_special_tokens=True))
    return answers


@torch.no_grad()
def validation_loss(model, tokenizer, samples: Sequence, *, image_root, preprocessor, template: str,
                    image_tokens: int, batch_size: int = 32, system: str | None = None) -> tuple[float, int]:
    """(mean teacher-forced loss over every supervised token, number of those tokens)."""

    device = next(model.parameters()).device
    image_id = model.config.image_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [(_as_sample(s), encode_conversation(_as_sample(s), tokenizer, template, image_tokens, system=system))
               for s in samples]
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        width = max(len(e.input_ids) for _, e in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        prefix = torch.zeros(len(batch), width, dtype=torch.bool)
        for row, (_, e) in enumerate(batch):
            n = len(e.input_ids)
            ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
            prefix[row, :e.prefix_len] = True
        # The targets the model's mean runs over: next tokens that are labelled, not image tokens.
        targets = int(((labels[:, 1:] != -100) & (ids[:, 1:] != image_id) & (mask[:, 1:] > 0)).sum())
        if targets == 0:
            continue
        pixels = _pixels(preprocessor, image_root, [p for s, _ in batch for p in s.images])
        loss = model(ids.to(device), pixels.to(device) if pixels is not None else None, labels.to(device),
                     attention_mask=mask.to(device), prefix_mask=prefix.to(device) if _prefix_lm(model) else None)
        total += float(loss.float()) * targets
        count += targets
    if count == 0:
        raise ValueError("samples: no supervised token to compute a validation loss on")
    return total / count, count


def evaluate(model, tokenizer, samples: Sequence, *, image_root, preprocessor, template: str, image_tokens: int,
             chance: dict | None = None, question_types: dict | None = None, max_new_tokens: int = 16,
             batch_size: int = 32, loss: bool = True, system: str | None = None, skipped=None) -> dict:
    """Accuracy per question type and overall, and the validation loss.

    `model`: a fastvlm.VLM, or a Hugging Face VLM (HFVLM, `tokenizer` its run's processor:
    fastvlm.train.hf_build.RunProcessor; `preprocessor`, `template` and `image_tokens` are
    unused) evaluated through its processor and its own generate (fastvlm.train.hf_evaluation).
    `samples`: fastvlm.data Samples or LLaVA dict records (a record's ``question_types``
    / ``question_type`` fields give the types, as the synthetic dataset writes them;
    `question_types` maps sample id -> per-turn list or one type instead; otherwise
    every question is of type "all"). `chance`: type -> chance accuracy (meta.json).

    Returns ``{"overall": float, "n": int, "per_type": {type: {"accuracy": float, "n": int,
    "correct": int, "chance": float | None, "vs_chance": accuracy / chance | None}},
    "val_loss": float | None, "val_tokens": int, "predictions": [{"id", "turn", "type",
    "answer", "prediction", "correct"}]}``, and ``"skipped"``: `skipped` (a BadImageCounter
    of samples left out before evaluating, e.g. with a corrupt image) as a dict.
    """

    if not len(samples):
        raise ValueError("samples: nothing to evaluate")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    hf = isinstance(model, HFVLM)
    if not hf:
        tokenizer = load_tokenizer(tokenizer)
        if tokenizer.image_token_id != model.config.image_token_id:
            raise ValueError(f"tokenizer: image token id {tokenizer.image_token_id} differs from the model's "
                             f"image_token_id {model.config.image_token_id}")
    was_training = model.training
    model.eval()
    try:
        if hf:
            questions = questions_of(samples, None, None, None, question_types, system,
                                     functools.partial(prompt_text, tokenizer, system=system))
            predictions = [first_answer(text) for text in generate_hf_answers(
                model, tokenizer, questions, image_root=image_root, max_new_tokens=max_new_tokens,
                batch_size=batch_size)]
            val = (hf_validation_loss(model, tokenizer, [_as_sample(s) for s in samples], image_root=image_root,
                                      batch_size=batch_size, system=system) if loss else (None, 0))
        else:
            questions = questions_of(samples, tokenizer, template, image_tokens, question_types, system)
            predictions = generate_answers(model, tokenizer, questions, image_root=image_root,
                                           preprocessor=preprocessor, max_new_tokens=max_new_tokens,
                                           batch_size=batch_size)
            val = (validation_loss(model, tokenizer, samples, image_root=image_root, preprocessor=preprocessor,
                                   template=template, image_tokens=image_tokens, batch_size=batch_size,
                                   system=system) if loss else (None, 0))
    finally:
        model.train(was_training)
    return score(questions, predictions, chance) | {"val_loss": val[0], "val_tokens": val[1],
                                                    "skipped": skipped.as_dict() if skipped is not None else None}


def score(questions: list[dict], predictions: list[str], chance: dict | None = None) -> dict:
    """Exact match after normalisation, per type and overall (see evaluate)."""
    per_type = defaultdict(lambda: [0, 0])
    records = []
    for q, prediction in zip(questions, predictions, strict=True):
        correct = normalize_answer(prediction) == normalize_answer(q["answer"])
        per_type[q["type"]][0] += correct
        per_type[q["type"]][1] += 1
        records.append({"id": q["id"], "turn": q["turn"], "type": q["type"], "answer": q["answer"],
                        "prediction": prediction, "correct": correct})
    table = {}
    for qtype in sorted(per_type):
        right, n = per_type[qtype]
        level = (chance or {}).get(qtype)
        table[qtype] = {"accuracy": right / n, "n": n, "correct": right, "chance": level,
                        "vs_chance": right / n / level if level else None}
    right = sum(r["correct"] for r in records)
    return {"overall": right / len(records), "n": len(records), "per_type": table, "predictions": records}


def format_table(result: dict) -> str:
    """A markdown table: type, questions, accuracy, chance, accuracy / chance; then overall and loss."""
    lines = ["| question type | n | accuracy | chance | x chance |", "| --- | ---: | ---: | ---: | ---: |"]
    for qtype, row in result["per_type"].items():
        chance = f"{row['chance']:.1%}" if row["chance"] is not None else "-"
        ratio = f"{row['vs_chance']:.2f}x" if row["vs_chance"] is not None else "-"
        lines.append(f"| {qtype} | {row['n']} | {row['accuracy']:.1%} | {chance} | {ratio} |")
    lines.append(f"| **overall** | {result['n']} | **{result['overall']:.1%}** | | |")
    if result.get("val_loss") is not None:
        lines.append(f"\nvalidation loss: {result['val_loss']:.4f} over {result['val_tokens']} supervised tokens")
    if (result.get("skipped") or {}).get("total"):
        skipped = result["skipped"]
        examples = ", ".join(e for names in skipped["examples"].values() for e in names[:2])
        lines.append(f"\n{skipped['total']} samples not evaluated (their images cannot be used: "
                     f"{', '.join(f'{r} {n}' for r, n in skipped['counts'].items())}; e.g. {examples})")
    return "\n".join(lines)


def write_results(result: dict, run_dir, name: str) -> tuple[Path, Path]:
    """RUN/eval/<name>.json (everything, predictions included) and <name>.md (the table)."""
    if not name or "/" in name:
        raise ValueError(f"name: expected a file stem without '/', got {name!r}")
    folder = Path(run_dir) / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"{name}.json", folder / f"{name}.md"
    atomic_write_text(json_path, json.dumps(result, indent=1) + "\n")
    atomic_write_text(md_path, f"# evaluation: {name}\n\n{format_table(result)}\n")
    return json_path, md_path


def read_question_types(path) -> dict[str, list[str]]:
    """Sample id -> per-turn question types from a dataset JSON whose records carry them
    (``question_types``, or ``question_type`` for single-question records)."""
    records = json.loads(Path(path).read_text())
    out = {}
    for r in records:
        types = r.get("question_types") or ([r["question_type"]] if r.get("question_type") else None)
        if types is not None:
            out[str(r.get("id", ""))] = list(types)
    return out


def usable_for_evaluation(samples: list, image_root) -> tuple[list, BadImageCounter]:
    """`samples` whose images all decode (validation images are opened once, up front, so
    a corrupt file costs its sample, not the run), and the count of the others."""
    kept, bad = [], BadImageCounter()
    for sample in samples:
        try:
            for rel in sample.images:
                open_image(Path(image_root) / rel)
        except BadImageError as err:
            bad.add(err.reason, err.path)
        else:
            kept.append(sample)
    return kept, bad


def eval_inputs(recipe: Recipe, run_dir: Path, model, split: str = "validation", data: RunData | None = None) -> dict:
    """Keyword arguments of fastvlm.train.evaluation.evaluate for a run's split."""
    data = data or prepare_data(recipe, Path(run_dir))
    samples = {"validation": data.val, "train": data.train}.get(split)
    if samples is None:
        raise ValueError(f"split: expected 'validation' or 'train', got {split!r}")
    if recipe.data.eval_samples:
        samples = samples[:recipe.data.eval_samples]
    key = (split, len(samples))
    if key not in data.evaluable:  # each evaluation of a run reads the same images: check them once
        data.evaluable[key] = usable_for_evaluation(samples, data.image_root)
    samples, bad = data.evaluable[key]
    check_skipped(bad, len(samples) + bad.total, data.max_skipped_fraction, f"evaluation on the {split} split")
    if not samples:
        raise ValueError(f"evaluation on the {split} split: no sample to evaluate")
    try:  # records may carry their question types (the synthetic dataset's do)
        types = read_question_types(data.files[split])
    except (ValueError, AttributeError):  # JSON lines, or records of another shape
        types = {}
    # The evaluation scores every question turn of the evaluated samples, so chance is the
    # majority answer's share over exactly those questions (meta.json's split-wide "types"
    # level counts only last turns, of the whole validation split).
    chance = majority_chance(samples, types) if data.chance is not None and types else data.chance
    hf = isinstance(model, HFVLM)  # evaluated through its processor (data.tokenizer): no preprocessor here
    return dict(samples=samples, image_root=data.image_root, preprocessor=None if hf else preprocessor_for(model),
                template=recipe.data.template, image_tokens=None if hf else model.image_tokens, chance=chance,
                question_types=types or None, skipped=bad)


def majority_chance(samples: list, types: dict) -> dict:
    """Question type -> share of its most frequent reference answer, over every question
    turn of `samples` (`types`: sample id -> per-turn question types): the accuracy of a
    model that ignores the image and always gives a type's most common answer."""
    counts: dict[str, Counter] = {}
    for sample in samples:
        answers = [t["value"] for t in sample.conversations if t["from"] == "gpt"]
        for qtype, answer in zip(types[sample.id], answers, strict=True):
            counts.setdefault(qtype, Counter())[normalize_answer(answer)] += 1
    return {qtype: max(c.values()) / sum(c.values()) for qtype, c in sorted(counts.items())}


def evaluate_stage(model, stage, index: int, step: int, global_step: int, recipe: Recipe, data: RunData,
                   run_dir: Path, log, mp, dist) -> dict | None:
    """The trainer's evaluation of a stage that produces answers (align, instruct, preference):
    VQA accuracy per question type + validation loss (a preference stage: its validation
    rewards too, fastvlm.train.preference_eval), on rank 0, written to RUN/eval and the
    metrics log; on every rank in lockstep while the model is FSDP-sharded (its forward
    gathers). Under the stage's autocast (frozen weights may be stored in bf16), with the
    RNG forked (evaluation must not shift the training run's random stream)."""
    if stage.type not in ("align", "instruct", "preference") or not recipe.run.evaluate:
        return None
    sharded = dist.active and distributed.is_sharded(model)
    if not (dist.is_main or sharded):
        dist.barrier()
        return None
    device = next(model.parameters()).device
    with dist.gathered() if sharded else contextlib.nullcontext(), torch.random.fork_rng(), \
            mp.autocast(device.type):
        model.eval()

        def vqa() -> dict:
            return evaluate(model, data.tokenizer, max_new_tokens=recipe.run.eval_max_new_tokens,
                            **eval_inputs(recipe, run_dir, model, data=data))

        result = vqa()
        if stage.type == "preference":  # its rewards on data.preference_val, VQA before it too
            result["preference"] = evaluate_preference(model, stage, index, recipe, data, run_dir, mp, vqa)
        model.train()
        if getattr(model.vision_tower, "frozen", False):
            model.vision_tower.eval()
    if dist.is_main:
        write_results(result, run_dir, f"{stage.name}-step{step}")
        log.write({"event": "eval", "stage": stage.name, "stage_index": index, "step": step,
                   "global_step": global_step, "accuracy": result["overall"], "val_loss": result.get("val_loss"),
                   **{f"val_{k}": v for k, v in (result.get("preference") or {}).items() if k != "vqa_before"}})
        log.plot()
    if not sharded:
        dist.barrier()  # the other ranks wait for rank 0's evaluation
    return result

