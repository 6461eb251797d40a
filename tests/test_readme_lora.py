"""Every Python example of the README's LoRA section runs, as written, on a tiny LLaVA."""
import copy
import re
from pathlib import Path

import torch

from fastvlm.models.vlm import VLM
from tests.llava_models import IMG, llava_batch, tiny_hf_llava
from tests.utils import assert_close

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## LoRA, QLoRA, mixed precision"
CHECKPOINT = "llava-1.5-7b-hf"  # the directory name the examples load


def lora_examples() -> list[str]:
    text = README.read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", len(SECTION))]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_lora_examples_run(tmp_path, monkeypatch, seed):
    examples = lora_examples()
    assert len(examples) >= 3 and any("apply_qlora" in e for e in examples)
    monkeypatch.chdir(tmp_path)
    tiny_hf_llava(seed).save_pretrained(CHECKPOINT)
    input_ids, pixel_values = llava_batch()
    labels = input_ids.masked_fill(input_ids == IMG, -100)
    scope = {"input_ids": input_ids, "pixel_values": pixel_values, "labels": labels}
    for code in examples:
        exec(compile(code, f"README.md ({SECTION})", "exec"), scope)
        if "apply_qlora" in code:  # the QLoRA model trains
            scope["model"](input_ids, pixel_values, labels).backward()
    assert torch.isfinite(scope["loss"])
    merged = scope["merged"].eval()
    again = VLM.from_pretrained("llava-merged").eval()
    assert torch.equal(again(input_ids, pixel_values), merged(input_ids, pixel_values))
    # the adapter went to PEFT on transformers and back: fastvlm's logits are PEFT's
    with torch.no_grad():
        theirs = scope["hf"](input_ids=input_ids, pixel_values=pixel_values).logits
        theirs64 = copy.deepcopy(scope["hf"]).double()(input_ids=input_ids, pixel_values=pixel_values.double()).logits
        ours = scope["ours"].eval()(input_ids, pixel_values)
    assert_close(ours, theirs64, baseline=theirs, name="logits after PEFT and back")
