"""A Hugging Face model named by the recipe (model.hf), read without torch or transformers.

Light side: `check` and the dry run read the directory's config.json, tokenizer
files and safetensors headers as plain files, so a typo, a missing tokenizer or
a vocabulary the embeddings cannot hold is one line before any worker starts.

The task decides the Auto class the workers build (launcher.worker.models):

    causal-lm, sft            AutoModelForCausalLM
    masked-lm                 AutoModelForMaskedLM
    sequence-classification   AutoModelForSequenceClassification (num_labels)

data.task auto takes the task from the config's `architectures` (…ForCausalLM,
…LMHeadModel, …ForMaskedLM, …ForSequenceClassification).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from launcher.plan.vocab import TOKENIZER_FILE, Vocab, tokenizer_size
from launcher.recipe.files import RECIPES_DIR

CONFIG_FILE = "config.json"
AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "sft": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
}
# Architecture name endings and the task they are made for, in the order they are tried.
_ARCHITECTURE_TASKS = (
    ("ForSequenceClassification", "sequence-classification"),
    ("ForMaskedLM", "masked-lm"),
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
)
# The Hugging Face file names, one table for the plan, the recipe check of model.init_from, the
# worker's model setup and export.
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"
WEIGHT_FILES = (SAFETENSORS_FILE, f"{SAFETENSORS_FILE}.index.json", TORCH_FILE, f"{TORCH_FILE}.index.json")
# What model.init_from may hold: unsharded weights, or a safetensors index (what export writes).
INIT_WEIGHT_FILES = WEIGHT_FILES[:3]
# Files any transformers tokenizer can be loaded from (fast tokenizer, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = (TOKENIZER_FILE, "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")
# Config keys that size the weights: with weights pretrained an override of one no longer fits them.
SHAPE_KEYS = frozenset(
    {
        "vocab_size", "hidden_size", "n_embd", "d_model", "intermediate_size", "n_inner",
        "num_attention_heads", "n_head", "num_key_value_heads", "head_dim", "num_hidden_layers",
        "n_layer", "max_position_embeddings", "n_positions", "type_vocab_size",
    }
)  # fmt: skip
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# The tiny models the fine-tuning recipes name (model.hf: models/tiny-llama), which make_tiny.py saves
# into its own folder (recipes/models of a clone), or into the folder it is given.
MAKE_TINY = RECIPES_DIR / "models" / "make_tiny.py"
TINY_MODELS = ("tiny-bert", "tiny-llama", "tiny-gpt2")


@dataclass(frozen=True)
class HfModel:
    """What the plan knows of model.hf before any worker starts."""

    source: str  # an absolute directory, or a hub id
    local: bool
    config: dict[str, Any]  # config.json with the recipe's model.config applied ({} for a hub id)
    has_tokenizer: bool
    num_params: int | None  # from the safetensors headers; None when unknown

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "unknown"))

    @property
    def architecture(self) -> str | None:
        names = self.config.get("architectures")
        return str(names[0]) if isinstance(names, list) and names else None

    @property
    def vocab_size(self) -> int | None:
        size = self.config.get("vocab_size")
        return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None

    @property
    def max_positions(self) -> int | None:
        for key in ("max_position_embeddings", "n_positions"):
            value = self.config.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None


def locate(name: str, recipe_source: str) -> tuple[str, bool]:
    """model.hf as the workers load it: (absolute directory, True), or (hub id, False).

    A name is a folder when it is one, when it is written as a path (./x, /x, ~/x), when it cannot be
    a hub id, when its first part is a folder beside the recipe (`models/` in `models/my-bert`), or
    when it names a tiny model make_tiny.py saves (models/tiny-llama); else it is a hub id (org/name).
    """
    base = Path(recipe_source).parent if recipe_source else Path()
    path = (base / name).expanduser()
    first = Path(name).parts[0] if Path(name).parts else ""
    folder = (base / first).is_dir() or (
        Path(name).parent.name == "models" and Path(name).name in TINY_MODELS
    )
    if path.is_dir() or name.startswith((".", "/", "~")) or not _HUB_ID.match(name) or folder:
        return str(path.resolve()), True
    return name, False


def tiny_maker(directory: Path) -> Path | None:
    """The make_tiny.py beside a tiny model's folder (a clone's recipes/models), which saves it there."""
    script = directory.parent / MAKE_TINY.name
    return script if directory.name in TINY_MODELS and script.is_file() else None


def missing_dir(directory: Path) -> str:
    """The line for a model.hf folder that is not there; a tiny model's says how to make it."""
    if directory.name not in TINY_MODELS:
        return f"model.hf: directory not found: {directory} (a hub id is written as org/name)"
    script = tiny_maker(directory) or MAKE_TINY
    shown = script.relative_to(Path.cwd()) if script.is_relative_to(Path.cwd()) else script
    out = "" if script.parent == directory.parent else f" {directory.parent}"
    return f"model.hf: directory not found: {directory} (make it with: python {shown}{out})"


def read(name: str, recipe_source: str, overrides: dict[str, Any]) -> tuple[HfModel | None, list[str]]:
    """The model directory's description, and its problems (one line each, naming model.hf)."""
    source, local = locate(name, recipe_source)
    if not local:
        return HfModel(source, False, dict(overrides), True, None), []
    directory = Path(source)
    if not directory.is_dir():
        return None, [missing_dir(directory)]
    config, problem = _config(directory)
    if problem:
        return None, [problem]
    weights = [f for f in WEIGHT_FILES if (directory / f).is_file()]
    model = HfModel(
        source=source,
        local=True,
        config={**config, **overrides},
        has_tokenizer=any((directory / f).is_file() for f in TOKENIZER_FILES),
        num_params=_safetensors_params(directory) if weights else None,
    )
    return model, []


def problems(model: HfModel, weights: str, overrides: dict[str, Any], tokenizer_given: bool) -> list[str]:
    """What the workers would fail on, found from the files: missing weights, a config override that no
    longer fits them, a tokenizer larger than the embeddings."""
    out: list[str] = []
    if not model.local:
        return out
    where = model.source
    if weights == "pretrained" and not any((Path(where) / f).is_file() for f in WEIGHT_FILES):
        out.append(
            f"model.hf: {where} has no weights ({', '.join(WEIGHT_FILES[::2])}); "
            "set model.weights=random to train its architecture from scratch"
        )
    changed = sorted(SHAPE_KEYS & overrides.keys())
    if weights == "pretrained" and changed:
        out.append(
            f"model.config.{changed[0]}: changes the shape of the pretrained weights in {where}; "
            "use model.weights=random to build a resized model"
        )
    if model.vocab_size is None:
        out.append(f"model.hf: {where}/{CONFIG_FILE} has no vocab_size")
    if not tokenizer_given and not model.has_tokenizer:
        out.append(
            f"model.hf: {where} has no tokenizer ({', '.join(TOKENIZER_FILES)}); "
            "set data.tokenizer to the tokenizer's directory"
        )
    return out


def task_of(model: HfModel) -> str | None:
    """The task the config's architecture is made for; None when it says none (a bare encoder)."""
    arch = model.architecture or ""
    return next((task for end, task in _ARCHITECTURE_TASKS if arch.endswith(end)), None)


def num_labels(model: HfModel | None) -> int:
    """The classes a sequence classifier built from model.hf gets without model.num_labels: the
    config's num_labels (or its id2label's size), else 2 as transformers' default."""
    config = model.config if model is not None else {}
    id2label = config.get("id2label")
    given = config.get("num_labels") or (len(id2label) if isinstance(id2label, dict) else None)
    return int(given) if isinstance(given, int) and given > 0 else 2


def tokenizer_rows(directory: Path) -> int | None:
    """Embedding rows the directory's tokenizer needs (tokenizer.json, or a vocab.txt's lines)."""
    size = tokenizer_size(directory)
    if size is None and (directory / "vocab.txt").is_file():
        with open(directory / "vocab.txt", encoding="utf-8") as f:
            size = sum(1 for _ in f)
    return size


@lru_cache(maxsize=16)
def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _config(directory: Path) -> tuple[dict[str, Any], str | None]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        return {}, f"model.hf: {directory} has no {CONFIG_FILE}; expected a directory save_pretrained wrote"
    try:
        config = _read_json(path)
    except (OSError, ValueError) as exc:
        return {}, f"model.hf: {path} is not valid JSON ({exc})"
    if not isinstance(config, dict) or "model_type" not in config:
        return {}, f"model.hf: {path} has no model_type; expected a transformers config"
    return dict(config), None


def _safetensors_params(directory: Path) -> int | None:
    """Elements of every tensor in the directory's safetensors files, read from their headers."""
    shapes = weight_shapes(directory)
    if shapes is None:
        return None
    return sum(math.prod(shape) for shape in shapes.values())


def weight_shapes(directory: Path) -> dict[str, tuple[int, ...]] | None:
    """Every tensor's name and shape in the directory's safetensors files, from their headers; None
    without such files or when one cannot be read."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with open(file, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(min(length, 100_000_000)))
            for name, entry in header.items():
                if name != "__metadata__" and isinstance(entry, dict):
                    shapes[name] = tuple(int(dim) for dim in entry.get("shape", []))
        except (OSError, ValueError, TypeError, AttributeError, struct.error):
            return None
    return shapes


def lora_params(model: HfModel, rank: int, targets: Sequence[str], num_labels: int | None) -> int | None:
    """The parameters that train when launcher.worker.lora adapts model.hf, from its safetensors headers:
    rank x (in + out) per adapted linear weight, plus a sequence classifier's head, which trains in
    full. None when the headers cannot be read or, with no targets named, the model_type has no
    default here.

    Args:
        model: the model directory.
        rank: model.lora.rank.
        targets: model.lora.target_modules (module-name suffixes); empty: peft's default for the type.
        num_labels: the classifier's classes for sequence-classification, else None.
    """
    shapes = weight_shapes(Path(model.source)) if model.local else None
    chosen = tuple(targets) or PEFT_TARGETS.get(model.model_type)
    if shapes is None or chosen is None:
        return None
    linear = _linear_weights(shapes)
    adapters = sum(rank * (a + b) for name, (a, b) in linear.items() if any(_suffix(name, t) for t in chosen))
    if num_labels is None:
        return adapters
    head = [n for n in shapes if any(part in _HEADS for part in n.split(".")[:-1])]
    if head:  # a classifier directory: its head as saved
        return adapters + sum(math.prod(shapes[n]) for n in head)
    # A new head: transformers gives decoders a `score` without bias and encoders a `classifier` with one.
    hidden = int(model.config.get("hidden_size") or model.config.get("n_embd") or 0)
    bias = task_of(model) != "causal-lm"
    return adapters + (hidden + bias) * num_labels


def lora_unmatched(model: HfModel, targets: Sequence[str]) -> list[str]:
    """The target modules that match no linear weight of model.hf (`lora.apply` refuses them)."""
    shapes = weight_shapes(Path(model.source)) if model.local else None
    if shapes is None:
        return []
    linear = _linear_weights(shapes)
    return [t for t in targets if not any(_suffix(name, t) for name in linear)]


def lora_problems(model: HfModel, targets: Sequence[str], names: Sequence[str] | None = None) -> list[str]:
    """The lines for the target modules `lora.apply` refuses: one that matches no linear layer of
    model.hf, or that also matches a module that is not one (each prefix of a weight's name is a module).

    Args:
        names: the model's linear layers (from a meta-device build); None: the safetensors headers'.
    """
    shapes = weight_shapes(Path(model.source)) if model.local and names is None else None
    linear = set(names if names is not None else _linear_weights(shapes) if shapes else ())
    if not linear or not targets:
        return []
    if model.config.get("tie_word_embeddings", True):  # a tied output head is not saved, yet it is linear
        linear.add("lm_head")
    modules = {n.rsplit(".", i)[0] for n in linear for i in range(n.count(".") + 1)}
    shown = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linear}))
    out = []
    for t in targets:
        hits = [m for m in sorted(modules) if _suffix(m, t)]
        if not any(m in linear for m in hits):
            out.append(
                f"{t!r} matches no linear layer of {model.source}; its linear layers are named {shown}"
            )
        elif any(m not in linear for m in hits):
            other = next(m for m in hits if m not in linear)
            out.append(
                f"{t!r} also matches {other}, which is not a linear layer; name the linear layers in it"
            )
    return [f"model.lora.target_modules: {line}" for line in out]


# peft's default LoRA targets by model_type (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING),
# for the planner, which runs without peft; tests/e2e/test_lora.py holds them equal to the installed peft's.
PEFT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "gpt2": ("c_attn",),
    "gpt_neox": ("query_key_value",),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"),
}
_HEADS = frozenset({"classifier", "score"})  # peft's SEQ_CLS modules_to_save


def _linear_weights(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    """Module name -> the two sides of each 2-D `.weight`, embeddings left out (by name, as
    transformers calls them: embeddings, embed_tokens, wte, wpe)."""
    out = {}
    for name, shape in shapes.items():
        module, _, leaf = name.rpartition(".")
        last = module.rsplit(".", 1)[-1]
        if leaf == "weight" and len(shape) == 2 and "embed" not in last and last not in ("wte", "wpe"):
            out[module] = (shape[0], shape[1])
    return out


def _suffix(name: str, target: str) -> bool:
    # peft's rule for a list of names (check_target_module_exists); names here are the file's, which
    # may carry the base model's prefix the built model has too.
    return name == target or name.endswith("." + target)


def vocab_of(model: HfModel, data_vocab: Vocab, tokenizer_dir: str | None) -> tuple[Vocab, list[str]]:
    """The run's vocabulary with model.hf: its embedding rows (config vocab_size), which must hold
    every id of the tokenizer the data is read with."""
    rows = model.vocab_size
    if rows is None:
        return data_vocab, []
    key = "vocab_size (model.config)"
    needed = tokenizer_rows(Path(tokenizer_dir)) if tokenizer_dir else None
    if needed is not None and needed > rows:
        return data_vocab, [
            f"model.hf: the tokenizer in {tokenizer_dir} has {needed} tokens but {model.source}'s {key} is "
            f"{rows}: ids past {rows - 1} have no embedding; use a matching tokenizer (data.tokenizer) or "
            f"model.weights=random with model.config.vocab_size={needed}"
        ]
    return Vocab(rows, f"{model.source} config vocab_size"), []
