"""One rank of a distributed test run: `fastvlm train` as a function, then a report of what
this rank holds (digests of every parameter before and after training) in OUT/rank-<r>.json."""
import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def main() -> None:
    from fastvlm.data import load_tokenizer
    from fastvlm.train.build import build_model
    from fastvlm.train.distributed import finish
    from fastvlm.train.recipe import load_recipe
    from fastvlm.train.trainer import train

    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    recipe, out = load_recipe(args.recipe), Path(args.out)
    result = train(recipe, out, progress=False)
    dist, model = result["distributed"], result["model"]
    tokenizer = load_tokenizer(out / "tokenizer", image_token=recipe.model.image_token)  # the run saved it
    initial = dict(build_model(recipe, tokenizer, recipe.run.seed).named_parameters())
    final = dict(model.named_parameters())
    report = {"rank": dist.rank, "world": dist.world,
              "final": {k: digest(p) for k, p in final.items()},
              # in the final dtype: a frozen tower is stored in bf16 where the CPU has it
              "initial": {k: digest(initial[k].to(p.dtype)) for k, p in final.items() if k in initial}}
    (out / f"rank-{dist.rank}.json").write_text(json.dumps(report))
    finish(dist)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
