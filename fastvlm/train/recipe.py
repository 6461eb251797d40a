"""Training recipes: one TOML file = model + data + run settings + a list of stages.

Every key is a field of the dataclasses below (their comments are the reference);
``load_recipe(name_or_path, overrides)`` parses the file with ``tomllib``, applies
``--set section.key=value`` overrides (``stages.<name or index>.key`` for a stage),
checks key names, value types and impossible combinations, and raises a
``ValueError`` naming the offending key. A stage starts from the previous stage's
result; what a stage trains follows from its ``type`` and the groups of its
``lr`` table (a group without a learning rate stays frozen):

| type          | trains (groups allowed in ``lr``)                                   |
| ------------- | ------------------------------------------------------------------- |
| `contrastive` | vision tower + contrastive heads (``vision``, ``heads``)            |
| `lm`          | the whole LLM, text only (``llm``)                                  |
| `align`       | the connector; frozen vision tower (bf16, no autograd, feature cache) and LLM (``connector``) |
| `instruct`    | connector, LLM by LoRA / QLoRA / full FT, optional vision LoRA (``connector``, ``llm``, ``vision``) |
| `preference`  | as instruct, on preference pairs (``[stages.preference]``: DPO / SimPO / ORPO) |
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, packaged as tomli
    import tomli as tomllib

from fastvlm.data.templates import TEMPLATES
from fastvlm.nn.checkpointing import CheckpointPolicy
from fastvlm.ops import KINDS
from fastvlm.train.optim import OPTIMIZERS
from fastvlm.train.preference import LOSSES as PREFERENCE_LOSSES
from fastvlm.utils.config import check_known_keys

STAGE_TYPES = ("contrastive", "lm", "align", "instruct", "preference")
STAGE_GROUPS = {"contrastive": ("vision", "heads"), "lm": ("llm",), "align": ("connector",),
                "instruct": ("connector", "llm", "vision"), "preference": ("connector", "llm", "vision")}
TUNING_STAGES = ("instruct", "preference")  # LoRA / QLoRA / full fine-tuning of the LLM (and the tower)
REFERENCES = ("adapters_off", "precomputed")
SOURCES = ("tiny", "pretrained", "parts", "hf")
SCHEDULES = ("cosine", "constant")
FINETUNE = ("lora", "qlora", "full")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TinyModel:
    """The built-in configuration trained from scratch (source = "tiny")."""
    image_size: int = 32
    patch_size: int = 4
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_family: str = "siglip"
    llm_hidden: int = 128
    llm_layers: int = 2
    llm_heads: int = 4
    llm_intermediate: int = 256
    vocab_size: int = 512           # the byte-level BPE tokenizer trained on the dataset's text
    max_position_embeddings: int = 1024


@dataclass
class ModelSection:
    source: str = "tiny"            # tiny | pretrained (a HF LLaVA / fastvlm dir) | parts (vision + llm dirs)
                                    # | hf (a transformers VLM directory: fastvlm.integrations.hf_load)
    path: str = ""                  # pretrained / hf: the model directory
    vision: str = ""                # parts: CLIP / SigLIP / DINOv2 directory
    llm: str = ""                   # parts: Llama / Qwen2 / Mistral directory (holds the tokenizer)
    tokenizer: str = ""             # default: path (pretrained) or llm (parts); tiny: trained on the data
    image_token: str = "<image>"
    connector: str = "mlp"          # mlp | multilevel | resampler
    select_layer: int = -2          # encoder hidden state the connector reads
    select_layers: list[int] = field(default_factory=list)  # multilevel: several (empty = [select_layer])
    multilevel_mode: str = "concat"  # multilevel: concat | sum
    token_reduction: str = ""       # "" | pixel_shuffle | avg_pool (2x2, 4x fewer image tokens)
    resampler_queries: int = 64
    vision_feature: str = "patch"   # patch (LLaVA's default: no class token) | full
    attention_kind: str = "causal"  # default layout kind; a stage may override it
    tiny: TinyModel = field(default_factory=TinyModel)


@dataclass
class SyntheticData:
    n_train: int = 2000
    n_val: int = 200
    image_size: int = 32
    seed: int = 0


@dataclass
class DataSection:
    kind: str = "synthetic_vqa"     # synthetic_vqa (generated into RUN/data) | llava (JSON files)
    train: str = ""                 # llava: train conversations (JSON / JSON lines)
    val: str = ""                   # llava: validation conversations
    captions: str = ""              # llava: image-caption conversations for contrastive / align stages
    preference: str = ""            # llava: preference pairs of preference stages (fastvlm.data.preference)
    preference_val: str = ""        # llava: validation pairs (reward accuracy; optional)
    image_root: str = ""            # llava: folder the image paths are relative to
    template: str = "llava_v1"      # instruct / lm template: llava_v1 | vicuna_v1 (v1) | literal | chat_template
                                    # (align always uses "plain")
    max_length: int = 0             # tokens per sample (0 = no limit)
    eval_samples: int = 0           # validation samples evaluated (0 = all)
    # Samples that cannot be used (an image missing, corrupt or truncated; too long to keep a
    # turn) are skipped and counted; past this fraction of a split or a stage the run stops.
    max_skipped_fraction: float = 0.01
    num_workers: int = 2            # DataLoader processes decoding images (0 = in the training process)
    # model.source = "hf": the processor's pixel budget per image (Qwen-VL's dynamic resolution; 0 = its own)
    min_pixels: int = 0
    max_pixels: int = 0
    chat_template: str = ""         # model.source = "hf": a Jinja file used instead of the processor's template
    synthetic: SyntheticData = field(default_factory=SyntheticData)


@dataclass
class LoRASection:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    vision_blocks: int = 0          # LoRA on the last N vision blocks too (needs lr.vision)
    # the tower's Linears LoRA adapts; model.source = "hf": left at this default, the family's own
    # (every Linear of a tower layer, by the family's names: Qwen2.5-VL's qkv, proj, gate/up/down_proj)
    vision_targets: str = "q_proj,k_proj,v_proj,out_proj,fc1,fc2"


@dataclass
class ContrastiveSection:
    kind: str = "sigmoid"           # sigmoid (SigLIP) | softmax (CLIP)
    chunk: int = 256                # rows of the B x B logits held at once
    embed_dim: int = 64
    image_pool: str = "mean"        # mean | cls
    text_source: str = "embeddings"  # embeddings (LLM's token table) | llm (its hidden states)


@dataclass
class PreferenceSection:
    """A preference stage's loss (fastvlm.train.preference)."""
    loss: str = "dpo"               # dpo | simpo | orpo
    beta: float = 0.1               # dpo: KL strength (0.1); simpo: reward scale (2.0); orpo: odds-ratio weight
    label_smoothing: float = 0.0    # dpo: conservative DPO's label noise, in [0, 0.5)
    gamma: float = 0.5              # simpo: target reward margin
    # dpo's reference log-probs: adapters_off (the model with its LoRA / QLoRA adapters off, in the
    # same step, no second copy) | precomputed (one pass before training, RUN/reference; full FT)
    reference: str = "adapters_off"


@dataclass
class Stage:
    name: str = ""
    type: str = ""                  # contrastive | lm | align | instruct | preference
    epochs: float = 1.0             # passes over the stage's data (ignored when max_steps > 0)
    max_steps: int = 0              # optimizer steps (0 = from epochs)
    batch_size: int = 8             # per micro-batch: packed rows (or images for contrastive)
    packing: bool = True            # pack samples into rows of packing_budget tokens
    packing_budget: int = 512       # tokens per packed row (the padded length without packing)
    grad_accum: int = 1             # micro-batches per optimizer step
    lr: dict[str, float] = field(default_factory=dict)  # per group: connector | llm | vision | heads
    schedule: str = "cosine"        # cosine (to min_lr_ratio) | constant, after a linear warmup
    warmup_ratio: float = 0.03      # fraction of the stage's steps
    min_lr_ratio: float = 0.0
    optimizer: str = "adamw"        # adamw | adamw8bit | paged_adamw | paged_adamw8bit
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0       # never on norms and biases
    grad_clip: float = 1.0          # max global grad norm (0 = off)
    precision: str = "bf16"         # bf16 | fp16 (loss scaling) | fp32; bf16 falls back to fp32 without support
    checkpointing: dict[str, str] = field(default_factory=dict)  # per tower: vision | llm -> policy
    attention_kind: str = ""        # "" = the model's
    finetune: str = "lora"          # instruct / preference: lora | qlora | full
    lora: LoRASection = field(default_factory=LoRASection)
    contrastive: ContrastiveSection = field(default_factory=ContrastiveSection)
    preference: PreferenceSection = field(default_factory=PreferenceSection)
    feature_cache: bool = True      # align / instruct with a frozen tower: features from RUN/feature_cache
    train_on_prompt: bool = False
    eval_every: int = 0             # steps between evaluations (0 = only at the stage's end)
    checkpoint_every: int = 0       # steps between checkpoints (0 = only at the stage's end)
    max_bad_steps: int = 5          # non-finite losses in a row before the run stops


@dataclass
class RunSection:
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda
    keep_checkpoints: int = 2       # newest complete checkpoints kept
    log_every: int = 1              # steps between metrics.jsonl lines
    eval_max_new_tokens: int = 8
    evaluate: bool = True           # VQA evaluation of align / instruct stages (at their end, every eval_every)
    # none | ddp | fsdp: how `torchrun -m fastvlm train` spreads the run over its processes
    # (fastvlm.train.distributed); ddp / fsdp checkpoints are DCP and resume on any world size.
    distributed: str = "none"


@dataclass
class Recipe:
    name: str = ""
    description: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    run: RunSection = field(default_factory=RunSection)
    stages: list[Stage] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Hash of every setting that changes the trajectory (not logging / keeping)."""
        d = self.to_dict()
        d["run"] = {k: v for k, v in d["run"].items() if k not in ("keep_checkpoints", "log_every")}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---- parsing -------------------------------------------------------------------------------

def _convert(tp, value, where: str):
    """`value` as type `tp` (dataclass, list[...], dict[str, ...], scalars), or ValueError naming `where`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a table, got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a table, got {value!r}")
        _, item = typing.get_args(tp)
        return {k: _convert(item, v, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"{where}: union types are not used in recipes")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ValueError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, values: dict, where: str):
    check_known_keys(cls, values, where)
    hints = typing.get_type_hints(cls)
    return cls(**{k: _convert(hints[k], v, f"{where}.{k}") for k, v in values.items()})


def _parse_value(text: str):
    """A --set value as TOML (numbers, booleans, lists, quoted strings); anything else is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict, assignment: str) -> None:
    """``section.key=value`` into the raw TOML dict; ``stages.<name|index>.key`` picks a stage."""
    if "=" not in assignment:
        raise ValueError(f"--set: expected section.key=value, got {assignment!r}")
    dotted, text = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            pick = [s for j, s in enumerate(node) if str(j) == key or s.get("name") == key]
            if not pick:
                raise ValueError(f"--set {dotted}: no stage {key!r} (stages: {[s.get('name') for s in node]})")
            node = pick[0]
        else:
            node = node.setdefault(key, [] if key == "stages" else {})
            if not isinstance(node, (dict, list)):
                raise ValueError(f"--set {dotted}: {'.'.join(keys[:i + 1])} is not a table")
    if isinstance(node, list):
        raise ValueError(f"--set {dotted}: name a stage and a key (stages.<name>.key=value)")
    node[keys[-1]] = _parse_value(text.strip())


def recipe_path(name_or_path) -> Path:
    """A shipped recipe by name (``tiny-demo``), else a path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix != ".toml" and "/" not in str(name_or_path):
        shipped = resources.files("fastvlm") / "recipes" / f"{name_or_path}.toml"
        if shipped.is_file():
            return Path(str(shipped))
    if not path.is_file():
        raise ValueError(f"recipe: {name_or_path!r} is neither a shipped recipe ({', '.join(shipped_recipes())}) "
                         "nor an existing TOML file")
    return path


def shipped_recipes() -> list[str]:
    folder = resources.files("fastvlm") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_recipe(name_or_path, overrides=()) -> Recipe:
    path = recipe_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"recipe: {path} is not valid TOML: {err}") from None
    return parse_recipe(raw, overrides, default_name=path.stem)


def parse_recipe(raw: dict, overrides=(), default_name: str = "recipe") -> Recipe:
    raw = json.loads(json.dumps(raw))  # a deep copy that overrides may edit
    for assignment in overrides:
        apply_override(raw, assignment)
    raw.setdefault("name", default_name)
    recipe = _build(Recipe, raw, "recipe")
    validate(recipe)
    return recipe


# ---- validation of combinations -------------------------------------------------------------

def _one_of(value, allowed, where: str) -> None:
    if value not in allowed:
        raise ValueError(f"{where}: expected one of {', '.join(map(str, allowed))}, got {value!r}")


def _positive(value, where: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{where}: expected {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def validate(recipe: Recipe) -> None:
    m, d = recipe.model, recipe.data
    _one_of(m.source, SOURCES, "model.source")
    _one_of(m.connector, ("mlp", "multilevel", "resampler"), "model.connector")
    _one_of(m.token_reduction, ("", "pixel_shuffle", "avg_pool"), "model.token_reduction")
    _one_of(m.attention_kind, KINDS, "model.attention_kind")
    _one_of(m.vision_feature, ("patch", "full"), "model.vision_feature")
    if m.source == "pretrained" and not m.path:
        raise ValueError("model.path: source = 'pretrained' needs the model directory")
    if m.source == "hf":
        validate_hf(recipe)
    if m.source == "parts" and not (m.vision and m.llm):
        raise ValueError("model.vision / model.llm: source = 'parts' needs both directories")
    if len(m.select_layers) > 1 and m.connector != "multilevel":
        raise ValueError(f"model.select_layers: several layers need model.connector = 'multilevel', "
                         f"got {m.connector!r}")
    if m.token_reduction and m.connector == "resampler":
        raise ValueError("model.token_reduction: the resampler already fixes the token count")
    _one_of(d.kind, ("synthetic_vqa", "llava"), "data.kind")
    _one_of(d.template, sorted(TEMPLATES), "data.template")
    if not 0 <= d.max_skipped_fraction <= 1:
        raise ValueError(f"data.max_skipped_fraction: expected a fraction in [0, 1], got {d.max_skipped_fraction}")
    if isinstance(d.num_workers, bool) or not isinstance(d.num_workers, int) or d.num_workers < 0:
        raise ValueError(f"data.num_workers: expected an int >= 0 (DataLoader processes), got {d.num_workers!r}")
    if d.kind == "llava" and not (d.train and d.val):
        raise ValueError("data.train / data.val: data.kind = 'llava' needs both files")
    if not recipe.stages:
        raise ValueError("recipe.stages: a recipe needs at least one [[stages]] table")
    names = [s.name for s in recipe.stages]
    for i, stage in enumerate(recipe.stages):
        where = f"stages[{i}]" + (f" ({stage.name})" if stage.name else "")
        if not stage.name:
            raise ValueError(f"{where}.name: every stage needs a name")
        if names.count(stage.name) > 1:
            raise ValueError(f"{where}.name: {stage.name!r} names two stages")
        validate_stage(stage, where, recipe)
    _one_of(recipe.run.device, ("auto", "cpu", "cuda"), "run.device")
    _one_of(recipe.run.distributed, ("none", "ddp", "fsdp"), "run.distributed")
    _positive(recipe.run.keep_checkpoints, "run.keep_checkpoints")
    _positive(recipe.run.log_every, "run.log_every")


def validate_stage(s: Stage, where: str, recipe: Recipe) -> None:
    _one_of(s.type, STAGE_TYPES, f"{where}.type")
    allowed = STAGE_GROUPS[s.type]
    for group, lr in s.lr.items():
        if group not in allowed:
            raise ValueError(f"{where}.lr.{group}: a {s.type} stage trains only {', '.join(allowed)}")
        _positive(lr, f"{where}.lr.{group}")
    if not s.lr:
        raise ValueError(f"{where}.lr: the stage trains nothing; give a learning rate for at least one of "
                         f"{', '.join(allowed)}")
    if s.type == "contrastive" and "vision" not in s.lr and "heads" not in s.lr:
        raise ValueError(f"{where}.lr: a contrastive stage needs lr.vision or lr.heads")
    if s.type in TUNING_STAGES:
        _one_of(s.finetune, FINETUNE, f"{where}.finetune")
        if s.lora.vision_blocks and "vision" not in s.lr:
            raise ValueError(f"{where}.lora.vision_blocks: vision LoRA needs lr.vision")
        if "vision" in s.lr and not s.lora.vision_blocks and s.finetune != "full":
            raise ValueError(f"{where}.lr.vision: set lora.vision_blocks (vision LoRA) or finetune = 'full'")
        if s.finetune == "qlora" and recipe.model.source == "tiny" and s.precision == "fp32":
            raise ValueError(f"{where}.finetune: qlora computes in bf16/fp16; precision fp32 contradicts it")
    if s.type == "preference":
        validate_preference(s, where, recipe)
    if s.max_steps <= 0 and s.epochs <= 0:
        raise ValueError(f"{where}.epochs / max_steps: one of them must be positive")
    _positive(s.max_steps, f"{where}.max_steps", allow_zero=True)
    _positive(s.batch_size, f"{where}.batch_size")
    _positive(s.grad_accum, f"{where}.grad_accum")
    _positive(s.packing_budget, f"{where}.packing_budget")
    _one_of(s.schedule, SCHEDULES, f"{where}.schedule")
    if not 0 <= s.warmup_ratio < 1:
        raise ValueError(f"{where}.warmup_ratio: expected a fraction in [0, 1), got {s.warmup_ratio}")
    if not 0 <= s.min_lr_ratio <= 1:
        raise ValueError(f"{where}.min_lr_ratio: expected a fraction in [0, 1], got {s.min_lr_ratio}")
    _one_of(s.optimizer, OPTIMIZERS, f"{where}.optimizer")
    if len(s.betas) != 2 or not all(0 <= b < 1 for b in s.betas):
        raise ValueError(f"{where}.betas: expected two numbers in [0, 1), got {s.betas}")
    _positive(s.weight_decay, f"{where}.weight_decay", allow_zero=True)
    _positive(s.grad_clip, f"{where}.grad_clip", allow_zero=True)
    _one_of(s.precision, PRECISIONS, f"{where}.precision")
    for tower, policy in s.checkpointing.items():
        _one_of(tower, ("vision", "llm"), f"{where}.checkpointing key")
        try:
            CheckpointPolicy.parse(policy)
        except ValueError as err:
            raise ValueError(f"{where}.checkpointing.{tower}: {err}") from None
    if s.attention_kind:
        _one_of(s.attention_kind, KINDS, f"{where}.attention_kind")
    _one_of(s.contrastive.kind, ("sigmoid", "softmax"), f"{where}.contrastive.kind")
    _one_of(s.contrastive.image_pool, ("mean", "cls"), f"{where}.contrastive.image_pool")
    _one_of(s.contrastive.text_source, ("embeddings", "llm"), f"{where}.contrastive.text_source")
    _positive(s.contrastive.chunk, f"{where}.contrastive.chunk")
    _positive(s.eval_every, f"{where}.eval_every", allow_zero=True)
    _positive(s.checkpoint_every, f"{where}.checkpoint_every", allow_zero=True)
    _positive(s.max_bad_steps, f"{where}.max_bad_steps")


HF_STAGE_TYPES = ("align", "instruct")
HF_CHECKPOINTING = ("none", "full")


def validate_hf(recipe: Recipe) -> None:
    """What a Hugging Face VLM run (model.source = "hf") supports on top of the common checks."""
    m, d = recipe.model, recipe.data
    if not m.path:
        raise ValueError("model.path: source = 'hf' needs the transformers model directory")
    for key in ("min_pixels", "max_pixels"):
        if getattr(d, key) < 0:
            raise ValueError(f"data.{key}: expected pixels >= 0 (0 = the processor's own), got {getattr(d, key)}")
    policies = set()
    for i, s in enumerate(recipe.stages):
        where = f"stages[{i}] ({s.name})"
        if s.type not in HF_STAGE_TYPES:
            raise ValueError(f"{where}.type: model.source = 'hf' trains {' and '.join(HF_STAGE_TYPES)} stages, "
                             f"got {s.type!r}")
        if s.attention_kind and s.attention_kind != "causal":
            raise ValueError(f"{where}.attention_kind: a Hugging Face VLM keeps its own mask (causal), got "
                             f"{s.attention_kind!r}")
        llm = s.checkpointing.get("llm", "none")
        if llm not in HF_CHECKPOINTING:
            raise ValueError(f"{where}.checkpointing.llm: a Hugging Face LLM checkpoints each decoder layer "
                             f"(one of {', '.join(HF_CHECKPOINTING)}), got {llm!r}")
        policies.add(s.checkpointing.get("vision", "none"))
    if len(policies) > 1:
        raise ValueError(f"stages.checkpointing.vision: the patch sets one vision policy per run; the stages ask "
                         f"for {sorted(policies)}")


def validate_preference(s: Stage, where: str, recipe: Recipe) -> None:
    p = s.preference
    _one_of(p.loss, PREFERENCE_LOSSES, f"{where}.preference.loss")
    _one_of(p.reference, REFERENCES, f"{where}.preference.reference")
    _positive(p.beta, f"{where}.preference.beta")
    _positive(p.gamma, f"{where}.preference.gamma", allow_zero=True)
    if not 0 <= p.label_smoothing < 0.5:
        raise ValueError(f"{where}.preference.label_smoothing: expected a number in [0, 0.5), got {p.label_smoothing}")
    if recipe.data.kind == "llava" and not recipe.data.preference:
        raise ValueError(f"data.preference: stage {s.name!r} is a preference stage; data.kind = 'llava' needs "
                         "the pairs file")
    if p.loss != "dpo" or p.reference != "adapters_off":
        return
    # With adapters off the model must be the reference: everything it trains is an adapter.
    if s.finetune == "full":
        raise ValueError(f"{where}.preference.reference: finetune = 'full' has no adapters to switch off; "
                         "use reference = 'precomputed'")
    if "connector" in s.lr:
        raise ValueError(f"{where}.lr.connector: reference = 'adapters_off' needs every trained parameter to be "
                         "a LoRA adapter (the connector is trained in full); drop lr.connector or use "
                         "reference = 'precomputed'")
    if "llm" not in s.lr and not s.lora.vision_blocks:
        raise ValueError(f"{where}.lr: reference = 'adapters_off' needs LoRA / QLoRA adapters (lr.llm, or "
                         "lr.vision with lora.vision_blocks)")


def to_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML (written into the run directory)."""
    d = recipe.to_dict()
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, (dict, list))]
    for section in ("model", "data", "run"):
        lines += _toml_table(section, d[section])
    for stage in d["stages"]:
        lines += _toml_table("stages", stage, array=True)
    return "\n".join(lines) + "\n"


def _toml_table(name: str, table: dict, array: bool = False) -> list[str]:
    # lr and checkpointing are maps written inline; other dicts are sub-sections.
    def is_section(k, v):
        return isinstance(v, dict) and k not in ("lr", "checkpointing")

    lines = ["", f"[[{name}]]" if array else f"[{name}]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if not is_section(k, v)]
    for k, v in table.items():
        if is_section(k, v):
            lines += _toml_table(f"{name}.{k}", v)
    return lines


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
