"""A new user's own data through `fastvlm train`: a LLaVA-format folder with PNG and JPEG
images of several sizes and single-image, multi-turn, two-image and text-only samples side
by side; empty files, missing, corrupt and truncated images; a corrected command after a
failed start; dry-run step counts; every sample once per epoch."""
import json
import logging
import re
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastvlm.cli import main as cli_main
from fastvlm.data import get_template, load_tokenizer, train_bpe_tokenizer
from fastvlm.train.build import build_model
from fastvlm.train.dryrun import dry_run
from fastvlm.train.recipe import load_recipe, parse_recipe
from fastvlm.train.stage_data import StageBatches, TooManySkipped, prepare_data
from fastvlm.train.trainer import train

from .train_recipes import TINY_MODEL, tiny_recipe

SIZES = [(64, 64), (96, 48), (48, 80), (40, 40)]


def _image(path: Path, size, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path.name


def write_dataset(root: Path, n: int = 24) -> dict:
    """LLaVA JSON train / val files under root, images in root/images: every fourth sample is
    text-only, every fourth has two images, every fourth two turns; PNG and JPEG of four sizes."""
    images = root / "images"
    images.mkdir(parents=True)
    colours = ["red", "green", "blue", "yellow"]

    def sample(i: int, split: str) -> dict:
        names = [_image(images / f"{split}{i}_{k}.{'png' if (i + k) % 2 else 'jpg'}", SIZES[(i + k) % 4], 7 * i + k)
                 for k in range({0: 0, 1: 1, 2: 2, 3: 1}[i % 4])]
        tags = "".join("<image>\n" for _ in names)
        turns = [{"from": "human", "value": f"{tags}What colour is it?"},
                 {"from": "gpt", "value": colours[i % 4]}]
        if i % 4 == 3:
            turns += [{"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "a square"}]
        record = {"id": f"{split}{i}", "conversations": turns}
        if len(names) == 1:
            record["image"] = names[0]
        elif names:
            record["images"] = names
        return record

    files = {}
    for split, count in (("train", n), ("val", 8)):
        files[split] = root / f"{split}.json"
        files[split].write_text(json.dumps([sample(i, split) for i in range(count)]))
    return files


def own_raw(root: Path, files: dict, stages=("align", "instruct"), **data) -> dict:
    common = {"epochs": 1.0, "batch_size": 2, "packing_budget": 128, "precision": "fp32", "warmup_ratio": 0.0}
    table = {"align": {"name": "align", "type": "align", "lr": {"connector": 1e-3}, **common},
             "instruct": {"name": "instruct", "type": "instruct", "lr": {"connector": 1e-3, "llm": 1e-3}, **common,
                          "grad_accum": 2, "lora": {"r": 4, "alpha": 8}}}
    return {"name": "own-data",
            "model": {"source": "tiny", "select_layer": -1, "tiny": TINY_MODEL},
            "data": {"kind": "llava", "train": str(files["train"]), "val": str(files["val"]),
                     "image_root": str(root / "images"), "template": "literal", **data},
            "run": {"eval_max_new_tokens": 2, "device": "cpu"},
            "stages": [table[s] for s in stages]}


@pytest.fixture
def own(tmp_path):
    root = tmp_path / "data"
    return root, write_dataset(root)


def quiet_train(recipe, out, **kw):
    lines = []
    result = train(recipe, out, progress=False, echo=lines.append, **kw)
    return result, lines


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- 1. empty files ----------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["train", "captions"])
def test_an_empty_file_is_an_error_at_start_and_in_dry_run(own, tmp_path, which):
    root, files = own
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    raw = own_raw(root, files, **({"train": str(empty)} if which == "train" else {"captions": str(empty)}))
    recipe = parse_recipe(raw)
    for run in (lambda: quiet_train(recipe, tmp_path / "run"), lambda: dry_run(recipe)):
        with pytest.raises(ValueError, match=rf"data\.{which}: {re.escape(str(empty))} holds no samples"):
            run()


def test_the_sampler_refuses_an_empty_dataset():
    from fastvlm.data import PackedBatchSampler

    with pytest.raises(ValueError, match="lengths: no samples"):
        PackedBatchSampler([], 64, seed=0)


# ---- 2. align on mixed data --------------------------------------------------------------------

@pytest.mark.parametrize("cache", [True, False])
def test_align_trains_on_the_image_samples_of_mixed_data(own, tmp_path, cache):
    """No captions file: align reads the train file's image samples (two-image ones with both
    images), counts the text-only ones as filtered out, and logs each step's own rates."""
    root, files = own
    raw = own_raw(root, files, stages=("align",))
    raw["stages"][0]["feature_cache"] = cache
    recipe = parse_recipe(raw)
    result, lines = quiet_train(recipe, tmp_path / "run")
    text_only = sum(1 for r in json.loads(files["train"].read_text()) if "image" not in r and "images" not in r)
    summary = result["stages"][0]
    assert summary["samples"]["filtered"]["counts"] == {"no_image": text_only}
    assert f"{text_only} samples filtered" in lines[-1]
    steps = [r for r in records(tmp_path / "run") if r["event"] == "step"]
    assert steps and all(r["lr_connector"] == r["lr"] for r in steps)  # the step's rate, not the next one's


def test_align_batches_hold_every_image_of_a_two_image_sample(own, tmp_path, seed):
    root, files = own
    recipe = parse_recipe(own_raw(root, files, stages=("align",)))
    data = prepare_data(recipe, tmp_path / "run")
    model = build_model(recipe, data.tokenizer, seed)
    batches = StageBatches(recipe.stages[0], recipe, data, model, seed)
    steps = batches.steps()
    seen = Counter()
    for _ in range(batches.steps_per_epoch()):
        for b in next(steps):
            assert b["images"].shape[0] == len(b["image_files"]) == int(b["image_ids"].max()) + 1
            seen.update(f.name for f in b["image_files"])
    want = Counter(Path(p).name for s in data.train for p in s.images)
    assert seen == want and max(len(s.images) for s in data.train) == 2


# ---- 3 / 4. missing, corrupt and truncated images -------------------------------------------------

def _break(root: Path, files: dict, how: str, count: int = 1) -> list[str]:
    """Damage the first `count` train images: delete, overwrite with junk, or cut short."""
    records_ = json.loads(files["train"].read_text())
    names = [n for r in records_ for n in r.get("images", [r.get("image")]) if n][:count]
    for name in names:
        path = root / "images" / name
        if how == "missing":
            path.unlink()
        elif how == "corrupt":
            path.write_bytes(b"not an image at all" * 20)
        else:
            blob = path.read_bytes()
            path.write_bytes(blob[:len(blob) // 3])
    return names


def test_missing_images_are_found_before_training(own, tmp_path):
    root, files = own
    (name,) = _break(root, files, "missing")
    recipe = parse_recipe(own_raw(root, files))
    with pytest.raises(TooManySkipped, match=rf"data\.train .*1 of \d+ samples cannot be used.*missing 1 .*{name}"):
        quiet_train(recipe, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "recipe.json").exists()
    recipe = parse_recipe(own_raw(root, files, max_skipped_fraction=0.1))
    _, lines = quiet_train(recipe, tmp_path / "run")
    assert any(line.startswith("data.train: 1 samples skipped before training") and name in line for line in lines)
    assert sum("skipped before training" in line for line in lines) == 1  # not again for the captions (the same)


def test_every_image_missing_says_so(own, tmp_path):
    root, files = own
    for path in (root / "images").iterdir():
        path.unlink()
    recipe = parse_recipe(own_raw(root, files))
    with pytest.raises(TooManySkipped, match=r"data\.train .* \(every sample with an image: is data\.image_root = "
                                             r".* cannot be used.*missing 18"):
        quiet_train(recipe, tmp_path / "run")


def test_a_missing_validation_image_stops_the_run_before_training(own, tmp_path):
    root, files = own
    val = json.loads(files["val"].read_text())
    name = next(r["image"] for r in val if "image" in r)
    (root / "images" / name).unlink()
    with pytest.raises(TooManySkipped, match=rf"data\.val .*{name}"):
        quiet_train(parse_recipe(own_raw(root, files)), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("how", ["corrupt", "truncated"])
def test_unusable_images_are_counted_and_reported(own, tmp_path, how):
    root, files = own
    names = _break(root, files, how, count=2)
    recipe = parse_recipe(own_raw(root, files, stages=("instruct",), max_skipped_fraction=0.2))
    result, lines = quiet_train(recipe, tmp_path / "run")
    report = result["stages"][0]["samples"]["skipped"]
    assert report["total"] == 2 and sum(report["counts"].values()) == 2
    assert sorted(Path(p).name for ps in report["examples"].values() for p in ps) == sorted(names)
    assert "2 samples skipped (could not be used" in lines[-1] and all(n in lines[-1] for n in names)
    logged = records(tmp_path / "run")
    assert [r for r in logged if r["event"] == "step"][-1]["skipped_samples"] == 2
    assert next(r for r in logged if r["event"] == "samples")["skipped"]["total"] == 2
    # the default bound (1%) stops the run, naming the files
    recipe = parse_recipe(own_raw(root, files, stages=("instruct",)))
    with pytest.raises(TooManySkipped, match=rf"stages\.instruct: [12] of \d+ samples cannot be used.*{how}"):
        quiet_train(recipe, tmp_path / "run2")


def test_a_corrupt_validation_image_costs_its_sample(own, tmp_path):
    root, files = own
    val = json.loads(files["val"].read_text())
    name = next(r["image"] for r in val if "image" in r)
    (root / "images" / name).write_bytes(b"junk" * 50)
    recipe = parse_recipe(own_raw(root, files, stages=("align",), max_skipped_fraction=0.2))
    result, _ = quiet_train(recipe, tmp_path / "run")
    evaluation = result["stages"][0]["eval"]
    assert evaluation["skipped"]["total"] == 1 and name in json.dumps(evaluation["skipped"])


# ---- 6. a failed start ---------------------------------------------------------------------------

def test_a_failed_start_leaves_out_usable(own, tmp_path):
    root, files = own
    raw = own_raw(root, files, stages=("align",))
    typo = json.loads(json.dumps(raw))
    typo["data"]["val"] = str(root / "vall.json")
    with pytest.raises(ValueError, match=r"data\.val: .*vall\.json does not exist"):
        quiet_train(parse_recipe(typo), tmp_path / "run")
    quiet_train(parse_recipe(raw), tmp_path / "run")  # the corrected command is not refused
    assert json.loads((tmp_path / "run" / "recipe.json").read_text())["digest"] == parse_recipe(raw).digest()


def test_a_corrected_recipe_does_not_reuse_a_stale_tokenizer(own, tmp_path):
    root, files = own
    raw = own_raw(root, files, stages=("align",))
    raw["model"]["tiny"] = {**TINY_MODEL, "vocab_size": 270}  # fewer merges than this small data allows
    first = prepare_data(parse_recipe(raw), tmp_path / "run").tokenizer
    raw["model"]["tiny"] = TINY_MODEL
    second = prepare_data(parse_recipe(raw), tmp_path / "run").tokenizer
    assert second.vocab_size != first.vocab_size


# ---- 8. eval on a path that does not exist --------------------------------------------------------

def test_eval_of_a_missing_path_is_a_message(tmp_path, capsys):
    assert cli_main(["eval", str(tmp_path / "no-such-run")]) == 2
    err = capsys.readouterr().err
    assert "fastvlm eval: target: " in err and "does not exist" in err and "Traceback" not in err


# ---- 9 / 10. step counts, every sample once per epoch ---------------------------------------------

def test_dry_run_counts_the_steps_the_run_takes(own, tmp_path):
    root, files = own
    recipe = parse_recipe(own_raw(root, files))
    planned = [int(n) for n in re.findall(r"\): (\d+) optimizer steps", dry_run(recipe))]
    result, _ = quiet_train(recipe, tmp_path / "run")
    assert planned == [s["steps"] for s in result["stages"]]
    assert not (tmp_path / "run2").exists()


@pytest.mark.parametrize("stage_index", [0, 1, 2, 3])
@pytest.mark.parametrize("packing", [True, False])
def test_one_epoch_sees_every_sample_once(tmp_path_factory, stage_index, packing, seed):
    """Every stage type, packed rows or padded batches, grad_accum 3: the steps of one epoch
    hold each sample exactly once (the last micro-batch and the last step may be short)."""
    recipe = tiny_recipe([f"stages.{stage_index}.packing={str(packing).lower()}",
                          f"stages.{stage_index}.grad_accum=3", f"stages.{stage_index}.batch_size=4"])
    data = _synthetic_data(recipe, tmp_path_factory)
    model = build_model(recipe, data.tokenizer, seed)
    stage = recipe.stages[stage_index]
    batches = StageBatches(stage, recipe, data, model, seed)
    steps = batches.steps()
    seen = Counter(i for _ in range(batches.steps_per_epoch()) for b in next(steps) for i in b["ids"])
    want = Counter(s.id for s in batches.samples)
    assert seen == want
    assert batches.sampler.state_dict()["position"] == len(batches.sampler)  # the epoch is over, exactly


_DATA = {}


def _synthetic_data(recipe, factory):
    if "data" not in _DATA:
        _DATA["data"] = prepare_data(recipe, factory.mktemp("synthetic"))
    return _DATA["data"]


def test_ranks_split_a_short_step_and_top_up_with_weightless_fillers(tmp_path_factory, seed):
    recipe = tiny_recipe(["stages.instruct.grad_accum=4", "stages.instruct.batch_size=1"])
    data = _synthetic_data(recipe, tmp_path_factory)
    model = build_model(recipe, data.tokenizer, seed)
    stage = recipe.stages[3]
    one = StageBatches(stage, recipe, data, model, seed)
    ranks = [StageBatches(stage, recipe, data, model, seed) for _ in range(2)]
    for r, b in enumerate(ranks):
        b.shard(r, 2)
    streams = [one.steps()] + [b.steps() for b in ranks]
    for _ in range(one.steps_per_epoch()):
        whole, *shares = (next(s) for s in streams)
        assert len(shares[0]) == len(shares[1]) == -(-len(whole) // 2)
        real = [b for share in shares for b in share if b["num_samples"]]
        fillers = [b for share in shares for b in share if not b["num_samples"]]
        assert sorted(i for b in real for i in b["ids"]) == sorted(i for b in whole for i in b["ids"])
        assert all(b["supervised_tokens"] == 0 == b["real_tokens"] for b in fillers)
        assert sum(b["supervised_tokens"] for b in real) == sum(b["supervised_tokens"] for b in whole)


# ---- 12. the key that named a directory -----------------------------------------------------------

def test_a_missing_llm_directory_names_model_llm(own, tmp_path):
    root, files = own
    raw = own_raw(root, files)
    raw["model"] = {"source": "parts", "vision": str(root), "llm": str(tmp_path / "no-llm")}
    with pytest.raises(ValueError, match=r"^model\.llm: .*no-llm does not exist"):
        prepare_data(parse_recipe(raw), tmp_path / "run")
    (tmp_path / "no-llm").mkdir()
    with pytest.raises(ValueError, match=r"^model\.llm: tokenizer: .*no-llm has no tokenizer\.json"):
        prepare_data(parse_recipe(raw), tmp_path / "run")


# ---- 13. bitsandbytes' fallback notice -----------------------------------------------------------

def test_bitsandbytes_fallback_notice_stays_out_of_the_output():
    proc = subprocess.run([sys.executable, "-c", "import fastvlm, peft, bitsandbytes"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "gemm_4bit_forward" not in proc.stderr + proc.stdout
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    notice = logger.makeRecord(logger.name, logging.WARNING, "ops.py", 1,
                               "Failed to load CPU gemm_4bit_forward from kernels-community: %s", ("x",), None)
    real = logger.makeRecord(logger.name, logging.ERROR, "ops.py", 1, "a real failure", (), None)
    assert not logger.filter(notice) and logger.filter(real)


# ---- 14 / 15. the LLaVA-1.5 recipes ----------------------------------------------------------------

VICUNA_V1 = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the user's questions.")


def test_vicuna_v1_renders_llava_conv_vicuna_v1():
    tok = train_bpe_tokenizer(["what is it", "a cat"], vocab_size=300)
    turns = [{"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A cat."},
             {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]
    text = get_template("vicuna_v1").render(turns, load_tokenizer(tok)).text
    assert text == (f"<s>{VICUNA_V1} USER: <image>\nWhat is it? ASSISTANT: A cat.</s>"
                    "USER: Sure? ASSISTANT: Yes.</s>")
    assert get_template("v1") is get_template("vicuna_v1")
    assert "curious human" in get_template("llava_v1").render(turns, tok).text


@pytest.mark.parametrize("name", ["llava-1.5-7b-stage1", "llava-1.5-7b-stage2-lora", "llava-1.5-7b-stage2-qlora"])
def test_llava_recipes_train_in_vicuna_v1_and_name_every_path(name):
    recipe = load_recipe(name)
    assert recipe.data.template == "vicuna_v1"
    header = "".join(line for line in Path(recipe_file(name)).read_text().splitlines(keepends=True)
                     if line.startswith("#"))
    paths = [f"{section}.{key}" for section in ("model", "data")
             for key, value in getattr(recipe, section).__dict__.items()
             if isinstance(value, str) and ("/" in value) and key not in ("image_token",)]
    missing = [p for p in paths if p not in header]
    assert paths and not missing, f"{name}: the header does not say to set {missing}"


def recipe_file(name):
    from fastvlm.train.recipe import recipe_path

    return recipe_path(name)


def test_skip_counts_survive_a_resume(own, tmp_path, seed):
    """The sampler state a checkpoint stores carries the stage's skip count: a resumed stage
    reports what the uninterrupted one does."""
    root, files = own
    broken = set(_break(root, files, "corrupt", count=3))
    hit = sum(1 for r in json.loads(files["train"].read_text()) if broken & set(r.get("images", [r.get("image")])))
    recipe = parse_recipe(own_raw(root, files, stages=("instruct",), max_skipped_fraction=0.5))
    data = prepare_data(recipe, tmp_path / "run")
    model = build_model(recipe, data.tokenizer, seed)
    stage = recipe.stages[0]
    through = StageBatches(stage, recipe, data, model, seed)
    stream, k = through.steps(), 0
    while not through.skipped.total:
        next(stream)
        k += 1
    resumed = StageBatches(stage, recipe, data, model, seed)
    resumed.load_state_dict(json.loads(json.dumps(through.state_dict())))
    assert resumed.skipped.as_dict() == through.skipped.as_dict()
    rest = resumed.steps()
    for _ in range(2 * through.steps_per_epoch() - k):
        assert [b["ids"] for b in next(rest)] == [b["ids"] for b in next(stream)]
    assert resumed.skipped.as_dict() == through.skipped.as_dict() and through.skipped.total == hit


class _ThreadGather:
    """Distributed.all_gather for ranks run as threads of one process."""

    def __init__(self, world: int):
        self.barrier, self.slots = threading.Barrier(world), [None] * world

    def for_rank(self, rank: int):
        def gather(obj):
            self.slots[rank] = obj
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()
            return out
        return gather


def test_ranks_keep_one_record_of_skipped_samples(own, tmp_path, seed):
    """Two ranks over two epochs: each rank holds the job's record (each unusable sample once,
    whichever rank met it, in whichever epoch), equal to one process's, and a checkpoint of it
    resumes on any rank."""
    root, files = own
    _break(root, files, "corrupt", count=3)
    recipe = parse_recipe(own_raw(root, files, stages=("instruct",), max_skipped_fraction=0.5))
    data = prepare_data(recipe, tmp_path / "run")
    model = build_model(recipe, data.tokenizer, seed)
    stage = recipe.stages[0]
    one = StageBatches(stage, recipe, data, model, seed)
    steps = one.steps()
    for _ in range(2 * one.steps_per_epoch()):
        next(steps)
    ranks, gather = [StageBatches(stage, recipe, data, model, seed) for _ in range(2)], _ThreadGather(2)
    for r, b in enumerate(ranks):
        b.shard(r, 2, gather.for_rank(r))

    def run(b):
        stream = b.steps()
        for _ in range(2 * b.steps_per_epoch()):
            next(stream)

    threads = [threading.Thread(target=run, args=(b,)) for b in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert one.skipped.total > 0
    assert ranks[0].skipped.counts == ranks[1].skipped.counts == one.skipped.counts
    resumed = StageBatches(stage, recipe, data, model, seed)
    resumed.load_state_dict(json.loads(json.dumps(ranks[1].state_dict())))
    assert resumed.skipped.as_dict() == ranks[0].skipped.as_dict()


def test_epochs_count_each_epochs_own_plan(own, tmp_path):
    """Packed in windows, epochs may differ by a row: total_steps ends exactly at the last
    epoch's end. (A fixed sampler seed and windows of 2 samples: these rows differ by epoch.)"""
    root, files = own
    raw = own_raw(root, files, stages=("instruct",))
    raw["stages"][0].update(epochs=3.0, batch_size=1, grad_accum=1, packing_budget=96)
    recipe = parse_recipe(raw)
    data = prepare_data(recipe, tmp_path / "run")
    batches = StageBatches(recipe.stages[0], recipe, data, build_model(recipe, data.tokenizer, 0), seed=2)
    batches.sampler.window = 2
    batches.sampler._plans = {}
    rows = [len(batches.sampler.plan(e)) for e in range(3)]
    assert len(set(rows)) > 1, rows
    total, stream = batches.total_steps(), batches.steps()
    for _ in range(total):
        next(stream)
    assert total == sum(rows) and batches.sampler.epoch == 2 and batches.sampler.position == rows[2]


def test_a_started_run_keeps_its_tokenizer_when_the_data_changes(own, tmp_path):
    root, files = own
    recipe = parse_recipe(own_raw(root, files, stages=("align",)))
    run = tmp_path / "run"
    quiet_train(recipe, run)
    before = (run / "tokenizer" / "tokenizer.json").read_bytes()
    records_ = json.loads(files["train"].read_text())
    files["train"].write_text(json.dumps(records_ + [{**records_[0], "id": "new"}]))
    prepare_data(recipe, run)  # what `fastvlm eval RUN` and --resume do
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == before


def test_dry_run_never_rewrites_a_runs_data(tmp_path):
    run = tmp_path / "run"
    prepare_data(tiny_recipe(), run)
    meta = (run / "data" / "meta.json").read_bytes()
    dry_run(tiny_recipe(["data.synthetic.n_train=30"]), out=run)
    assert (run / "data" / "meta.json").read_bytes() == meta
