"""The README's "Train on your own data" works as written: its recipe and its four commands,
run verbatim on tiny models saved at the paths it names and a small dataset in its layout
(single-image, two-image, multi-turn and text-only samples; PNG and JPEG of several sizes)."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fastvlm.data import train_bpe_tokenizer

from .test_own_data import write_dataset

transformers = pytest.importorskip("transformers")
README = Path(__file__).resolve().parent.parent / "README.md"


def quickstart() -> tuple[str, list[str]]:
    """(the recipe, the commands) of the README's quickstart section."""
    text = README.read_text()
    section = text[text.index("## Train on your own data"):]
    section = section[:section.index("\n## ", 5)]
    (recipe,) = re.findall(r"```toml\n(.*?)```", section, re.S)
    (bash,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    commands = [line.split("#")[0].strip() for line in bash.splitlines() if line.strip()]
    return recipe, commands


def tiny_parts(root: Path, recipe: str) -> None:
    """A tiny CLIP and a tiny Llama (with a BPE tokenizer) where the recipe's paths point."""
    vision = root / re.search(r'^vision = "(.*?)"', recipe, re.M).group(1)
    llm = root / re.search(r'^llm = "(.*?)"', recipe, re.M).group(1)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
        patch_size=14, projection_dim=16)).save_pretrained(vision)
    texts = ["What colour is it?", "red green blue yellow", "And the shape?", "a square"] * 10
    tok = train_bpe_tokenizer(texts, vocab_size=280)
    tok.save(llm)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(llm)


def test_the_quickstart_runs_as_written(tmp_path):
    recipe, commands = quickstart()
    assert [c.split()[:2] for c in commands] == [["fastvlm", "train"]] * 2 + [["fastvlm", "eval"],
                                                                             ["fastvlm", "export"]]
    (tmp_path / "my-recipe.toml").write_text(recipe)
    data = re.search(r'^train = "(.*?)/train\.json"', recipe, re.M).group(1)
    write_dataset(tmp_path / data)
    tiny_parts(tmp_path, recipe)
    env = {**os.environ, "PYTHONPATH": str(README.parent)}
    outputs = []
    for command in commands:
        argv = [sys.executable, "-m", "fastvlm", *shlex.split(command)[1:], *(
            ["--no-progress"] if command.split()[1] == "train" and "--dry-run" not in command else [])]
        proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    assert "optimizer steps" in outputs[0] and "run written to runs/my-vqa" in outputs[1]
    assert "| **overall** |" in outputs[2]
    loaded = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "runs" / "my-vqa-hf")
    assert loaded.config.text_config.vocab_size == transformers.AutoConfig.from_pretrained(
        tmp_path / "models" / "vicuna-7b-v1.5").vocab_size
