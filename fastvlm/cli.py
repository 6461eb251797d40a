"""`fastvlm` command line: `fastvlm info | demo | train | eval | export | bench`."""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

from fastvlm.train import evaluation
from fastvlm.train.checkpoint import NAME
from fastvlm.train.export import ADAPTER_CONFIG, DTYPES, FORMATS, export, load_for_inference
from fastvlm.utils.io import read_json

OPTIONAL_PACKAGES = ("torch", "triton", "bitsandbytes", "flash-attn", "xformers", "transformers", "peft",
                     "safetensors", "numpy")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """What `fastvlm info` reports, as data."""
    import torch

    import fastvlm
    from fastvlm import _ext
    from fastvlm.ops.backend import REGISTRY, why_unavailable

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "capability": f"{props.major}.{props.minor}",
               "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count()}
    ops = {}
    for name, spec in sorted(REGISTRY.items()):
        ops[name] = {}
        for dev in ("cpu", "cuda"):
            chosen = next((b for b in spec.preference.get(dev, ())
                           if why_unavailable(name, b, torch.device(dev)) is None), None)
            ops[name][dev] = chosen
        ops[name]["unavailable"] = {b: why_unavailable(name, b, torch.device(dev))
                                    for b in spec.backends for dev in ("cpu", "cuda")
                                    if why_unavailable(name, b, torch.device(dev)) is not None
                                    and dev in spec.preference and b in spec.preference[dev]}
    return {
        "fastvlm": fastvlm.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in OPTIONAL_PACKAGES},
        "torch_cuda": torch.version.cuda,
        "extension": {"built": _ext.available(), "error": _ext.load_error,
                      "cuda_kernels": _ext.cuda_built(), "cuda_archs": _ext.cuda_archs()},
        "gpu": gpu,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "ops": ops,
    }


def print_info(env: dict) -> None:
    print(f"fastvlm {env['fastvlm']}  (python {env['python']}, {env['platform']})")
    pk = env["packages"]
    for name in OPTIONAL_PACKAGES:
        extra = f" (CUDA {env['torch_cuda']})" if name == "torch" and env["torch_cuda"] else ""
        print(f"  {name:13s} {pk[name] or 'not installed'}{extra}")
    ext = env["extension"]
    if ext["built"]:
        cuda = f"CUDA kernels for archs {ext['cuda_archs']}" if ext["cuda_kernels"] else "no CUDA kernels"
        print(f"  fastvlm._C    built: C++ CPU ops, {cuda}")
    else:
        print(f"  fastvlm._C    NOT built ({ext['error']}); compiled ops fall back to the reference")
    gpu = env["gpu"]
    print(f"  GPU           {gpu['name']} (sm {gpu['capability']}, {gpu['memory_gib']} GiB) x{gpu['count']}"
          if gpu else "  GPU           none (CUDA not available to torch)")
    print(f"  TRITON_INTERPRET {'on' if env['triton_interpret'] else 'off'}")
    print("backend chosen by backend='auto':")
    print(f"  {'op':24s} {'on cpu tensors':16s} {'on cuda tensors'}")
    for name, row in env["ops"].items():
        cuda = row["cuda"] or "-"
        if not gpu:
            cuda += " (no GPU here)"
        print(f"  {name:24s} {row['cpu'] or '-':16s} {cuda}")
        for backend, why in row["unavailable"].items():
            print(f"      {backend}: unavailable: {why}")


def run_demo(seq_len: int, seed: int) -> dict:
    """The default job until training lands: build the block maps of a realistic
    packed VLM batch with every backend, check they agree, and run the reference
    attention (memory-bounded blockwise path) against the dense path."""
    import torch

    from fastvlm.ops import KINDS
    from fastvlm.ops.attention import attention_reference
    from fastvlm.synthetic import vlm_layout

    print(f"packed multi-image conversations (4 x 576-token images each), N={seq_len} tokens, "
          "tiles of 128x128")
    print(f"{'kind':22s} {'tiles visited':>14s} {'full':>6s} {'partial':>8s} {'layout':>9s} "
          f"{'dense mask':>11s} {'block map (ms)':>15s}")
    results = {"seq_len": seq_len, "kinds": {}}
    for kind in KINDS:
        layout = vlm_layout(seq_len, kind, "multi_image", seed=seed)
        t0 = time.perf_counter()
        bm = layout.block_map(128, backend="auto")
        ms = (time.perf_counter() - t0) * 1e3
        if not bm.equal(layout.block_map(128, backend="reference")):
            raise SystemExit(f"block maps disagree for {kind}")
        total = bm.num_q_blocks * bm.num_kv_blocks
        full, part = int(bm.full_kv_num_blocks.sum()), int(bm.kv_num_blocks.sum())
        print(f"{kind:22s} {bm.visited_tiles() / total:>13.1%} {full:>6d} {part:>8d} "
              f"{layout.nbytes() / 2**10:>7.0f}KiB {seq_len * seq_len / 2**20:>8.0f}MiB {ms:>15.2f}")
        results["kinds"][kind] = {"visited_fraction": bm.visited_tiles() / total, "full": full,
                                  "partial": part, "block_map_ms": ms}
    n, heads, dim = min(seq_len, 2048), 4, 64
    layout = vlm_layout(n, "mmca", "multi_image", seed=seed, split_softmax=True)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, dim, generator=gen, requires_grad=True) for _ in range(3))
    t0 = time.perf_counter()
    out = attention_reference(q, k, v, layout, impl="blockwise")
    out.square().sum().backward()
    secs = time.perf_counter() - t0
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    dense = attention_reference(q, k, v, layout, impl="dense")
    dense.square().sum().backward()
    pairs = zip(grads + [out.detach()], [t.grad for t in (q, k, v)] + [dense.detach()])
    err = max(float((a - b).abs().max()) for a, b in pairs)
    print(f"mmca split-softmax attention, N={n}, {heads} heads x {dim}: blockwise reference fwd+bwd "
          f"{secs:.2f}s on CPU, max |blockwise - dense| over output and grads = {err:.2e}")
    if not err < 1e-3:
        raise SystemExit("blockwise and dense reference attention disagree")
    results["attention"] = {"seq_len": n, "fwd_bwd_s": secs, "max_abs_diff": err}
    return results


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def _add_train_args(parser) -> None:
    parser.add_argument("recipe", help="a shipped recipe's name (tiny-demo, llava-1.5-7b-stage1, ...) or a TOML path")
    parser.add_argument("--out", default=None,
                        help="run directory (default: the current one if it is a run directory, else runs/<name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set stages.instruct.max_steps=10 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--dry-run", action="store_true",
                        help="print parameter counts, memory estimate and steps per stage; load no weights")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.add_argument("--world-size", type=_positive_int, default=None,
                        help="--dry-run: memory per process for this many ranks under run.distributed "
                             "(default: torchrun's WORLD_SIZE, else 1)")


def cli_train(args) -> int:
    from pathlib import Path

    from fastvlm.train.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        from fastvlm.train.dryrun import dry_run

        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        print(dry_run(recipe, Path(args.out) if args.out else None, world_size=world))
        return 0
    from fastvlm.train.trainer import Interrupted, train

    # Inside a run directory, the same command continues that run.
    out = Path(args.out or ("." if Path("recipe.json").is_file() else Path("runs") / recipe.name))
    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        result = train(recipe, out, resume=args.resume, progress=not args.no_progress)
    except Interrupted as stop:
        if main_rank:
            print(f"{stop}; continue with: fastvlm train {args.recipe} --out {out} --resume", file=sys.stderr)
        return _leave(130)
    if main_rank:
        print(f"run written to {out} (model: {result['final']}, plots: {result['plots']})")
    from fastvlm.train.distributed import finish

    finish(result["distributed"])
    return _leave(0)


def _leave(code: int) -> int:
    """A torchrun rank ends here without the interpreter's teardown: after
    destroy_process_group, gloo's threads abort ("terminate called without an active
    exception", SIGABRT) in a fraction of exits, which torchrun reports as a failed run
    of a finished one. Everything is written and flushed by now."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def benchmarks_dir():
    """benchmarks/ of a source checkout: beside the package directory (the scripts are not
    part of the installed package; an editable install runs them from the checkout)."""
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "benchmarks"


def cli_bench(args) -> int:
    """`fastvlm bench all`: benchmarks/run_all.py in a child process, options passed through."""
    import subprocess

    script = benchmarks_dir() / "run_all.py"
    if not script.is_file():
        print(f"fastvlm bench: no benchmark scripts at {script.parent} (they ship with the source, not with "
              "the installed package): clone the fastvlm repository and run `fastvlm bench all` from an "
              "editable install of it (pip install -e .), or `python benchmarks/run_all.py` there", file=sys.stderr)
        return 2
    flags = ["--quick"] if args.quick else ["--smoke"] if args.smoke else []
    if args.only:
        flags += ["--only", *args.only]
    if args.out:
        flags += ["--out", args.out]
    if args.timeout is not None:
        flags += ["--timeout", str(args.timeout)]
    return subprocess.run([sys.executable, str(script), *flags]).returncode


def _add_bench_args(parser) -> None:
    parser.add_argument("suite", choices=["all"], help="all: every benchmark (benchmarks/run_all.py)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="CPU, small sizes (minutes)")
    mode.add_argument("--smoke", action="store_true", help="seconds per benchmark")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="a subset of the benchmarks (run_all's names)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>-<date>)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per benchmark")


def _add_eval_args(parser) -> None:
    parser.add_argument("target", help="run directory (its final model or newest checkpoint) or a checkpoint")
    parser.add_argument("--split", default="validation", choices=("validation", "train"))
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="answer length limit (default: the recipe's run.eval_max_new_tokens)")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    parser.add_argument("--no-loss", action="store_true", help="skip the validation loss")


def cli_eval(args) -> int:
    """`fastvlm eval`: VQA accuracy per question type of a run or checkpoint, written to RUN/eval/."""
    target = Path(args.target)
    if not target.exists():
        raise ValueError(f"target: {target} does not exist (expected a run directory or one of its checkpoints)")
    model, tokenizer, recipe = load_for_inference(target)
    run_dir = target.parent.parent if NAME.match(target.name) else target
    max_new = args.max_new_tokens or recipe.run.eval_max_new_tokens
    result = evaluation.evaluate(model, tokenizer, max_new_tokens=max_new, batch_size=args.batch_size,
                                 loss=not args.no_loss,
                                 **evaluation.eval_inputs(recipe, run_dir, model, split=args.split))
    name = f"eval-{args.split}-{target.name if NAME.match(target.name) else 'latest'}"
    json_path, md_path = evaluation.write_results(result, run_dir, name)
    print(evaluation.format_table(result))
    print(f"results: {json_path} and {md_path}")
    return 0


def _add_export_args(parser) -> None:
    parser.add_argument("run", help="run directory, checkpoint directory, or a model directory (e.g. RUN/final)")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--format", dest="format", choices=FORMATS, default="hf-llava",
                        help="hf-llava (LlavaForConditionalGeneration dir), peft (PEFT adapter for it, or "
                             "for a model.source = 'hf' run's family class), fastvlm (native); hf: a "
                             "model.source = 'hf' run as its family's own save_pretrained dir")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="weight dtype of the export. Default: hf (and peft's OUT/base) of a "
                             "model.source = 'hf' run: the base model's own, the dtype (or torch_dtype) of "
                             "model.path's config.json (float32 where none or gone); hf-llava (and its peft "
                             "OUT/base): the LLM's; a peft adapter: float32 for an hf run, else as trained; "
                             "fastvlm: as trained")
    parser.add_argument("--allow-causal", action="store_true",
                        help="hf-llava: export a model trained with a non-causal attention layout anyway "
                             "(HF runs causal attention; logits differ)")


def cli_export(args) -> int:
    """`fastvlm export`: a run as a Hugging Face LLaVA, PEFT or fastvlm directory."""
    try:
        out = export(args.run, args.out, args.format, allow_causal=args.allow_causal,
                     dtype=DTYPES[args.dtype] if args.dtype else None)
    except ValueError as err:  # a bad path or an unexportable model: the message names it
        print(f"fastvlm export: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.run} as {args.format} to {out}")
    if args.format == "peft":
        print(f"base model: {read_json(out / ADAPTER_CONFIG)['base_model_name_or_path']}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastvlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, compiled extension, GPU, backend per op")
    info.add_argument("--json", action="store_true", help="print JSON")
    demo = sub.add_parser("demo", help="train the tiny-demo recipe from scratch on synthetic VQA (CPU, minutes)")
    demo.add_argument("--out", default=None, help="run directory (default: runs/tiny-demo)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a tiny-demo recipe key")
    demo.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    demo.add_argument("--masks", action="store_true",
                      help="instead: the attention block-map demo of a packed N-token batch (the former default)")
    demo.add_argument("--seq-len", type=_positive_int, default=None,
                      help="block-map demo length (implies --masks; 8192)")
    demo.add_argument("--seed", type=int, default=0)
    train = sub.add_parser("train", help="run a training recipe (stages, checkpoints, metrics, plots)")
    _add_train_args(train)
    evaluation = sub.add_parser("eval", help="VQA accuracy per question type of a run or checkpoint")
    export = sub.add_parser("export", help="export a run as a Hugging Face (LLaVA or its own family), PEFT or "
                                           "fastvlm directory")
    _add_bench_args(sub.add_parser("bench", help="run the benchmark suite (source checkout: benchmarks/run_all.py)"))
    _add_eval_args(evaluation)
    _add_export_args(export)
    args = parser.parse_args(argv)
    if args.command == "info":
        env = environment()
        print(json.dumps(env, indent=2)) if args.json else print_info(env)
    elif args.command == "demo":
        if args.masks or args.seq_len is not None:
            run_demo(args.seq_len or 8192, args.seed)
        else:
            from fastvlm.train.demo import run_training_demo
            from fastvlm.train.trainer import Interrupted

            try:
                return run_training_demo(args.out, args.overrides, progress=not args.no_progress)
            except Interrupted as stop:
                print(stop, file=sys.stderr)
                return 130
    elif args.command == "train":
        try:
            return cli_train(args)
        except ValueError as err:  # a bad recipe, path or run directory: the message names it
            print(f"fastvlm train: {err}", file=sys.stderr)
            return 2
    elif args.command == "bench":
        return cli_bench(args)
    elif args.command == "eval":
        try:
            return cli_eval(args)
        except ValueError as err:  # a bad path or run directory: the message names it
            print(f"fastvlm eval: {err}", file=sys.stderr)
            return 2
    else:
        return cli_export(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
