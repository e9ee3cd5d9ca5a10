"""Cross-field rules of a recipe: combinations the schema's field types cannot express.

They need no knowledge of the machine (that is launcher.plan.resolve's); each broken
rule is one line naming its dotted key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.errors import UserError
from launcher.recipe import tasks
from launcher.recipe.errors import reads
from launcher.recipe.families import FAMILIES
from launcher.recipe.files import read_chain, read_file
from launcher.recipe.shapes import Shape, shape_of

if TYPE_CHECKING:
    from launcher.recipe.sections import Recipe


def check_rules(recipe: Recipe, failed: Collection[str] = ()) -> list[str]:
    """Rules that span fields and need no knowledge of the machine; one line per broken rule.

    Args:
        recipe: the validated recipe, or one with defaults standing in for the keys in `failed`.
        failed: dotted keys whose values failed the schema: a group of rules that reads one is skipped
            (`skipped_rules`), since it would judge the default standing in for it.
    """
    skipped = skipped_rules(failed)
    return [line for rule, name, _ in RULES if name not in skipped for line in rule(recipe)]


def skipped_rules(failed: Collection[str]) -> list[str]:
    """The names of the groups of RULES that read one of the `failed` keys."""
    return [name for _, name, keys in RULES if any(reads(keys, key) for key in failed)]


def _zero_rules(recipe: Recipe) -> list[str]:
    z = recipe.zero
    problems: list[str] = []
    if z.offload_optimizer and z.stage < 1:
        problems.append(f"zero.offload_optimizer: needs zero.stage >= 1, got stage {z.stage}")
    if z.offload_params and z.stage != 3:
        problems.append(f"zero.offload_params: needs zero.stage 3, got stage {z.stage}")
    if recipe.backend == "accelerate" and z.offload_optimizer and not z.offload_params:
        problems.append(
            "zero.offload_optimizer: FSDP2 under accelerate offloads parameters, gradients and optimizer "
            "state together (CPUOffloadPolicy); set zero.offload_params=true too, or use backend=deepspeed"
        )
    return problems


# The built-in model's keys besides model.name (its preset, each dimension of its Shape that the
# recipe may override, its dropout): a model.target ignores them all.
BUILT_IN_MODEL_KEYS = ("size", *(f.name for f in fields(Shape) if f.name != "family"), "dropout")


def _model_rules(recipe: Recipe) -> list[str]:
    m = recipe.model
    problems = _hf_keys(recipe)
    if m.target is None and m.name is None and m.hf is None:
        return [
            "model: set model.name to a built-in model, model.hf to a Hugging Face model, or model.target"
        ]
    if m.target is not None and m.hf is not None:
        return [*problems, "model.hf: a model is either model.hf or model.target; remove one"]
    if m.target is not None or m.hf is not None:
        if m.hf is not None and m.kwargs:
            problems.append(
                "model.kwargs: only used with model.target (model.config overrides model.hf's config)"
            )
        return problems + _beside_target(recipe)
    if m.kwargs:
        problems.append("model.kwargs: only used with model.target")
    assert m.name is not None
    transformer = FAMILIES[m.name].transformer
    if not transformer and recipe.train.activation_checkpointing:
        problems.append(f"train.activation_checkpointing: {m.name} has no transformer layers to recompute")
    shape = shape_of(m)
    if transformer and shape.hidden_size % shape.num_heads:
        problems.append(
            f"model.num_heads: {shape.num_heads} does not divide model.hidden_size {shape.hidden_size}"
            f" (the {m.size} preset's, unless set)"
        )
    if transformer and recipe.data.seq_len > shape.max_position_embeddings:
        problems.append(
            f"data.seq_len: {recipe.data.seq_len} is longer than model.max_position_embeddings"
            f" {shape.max_position_embeddings}"
        )
    return problems


def _hf_keys(recipe: Recipe) -> list[str]:
    """model.hf's own keys written without model.hf, and num_labels without its task."""
    m = recipe.model
    problems = []
    if m.hf is None:
        if m.config:
            problems.append(
                "model.config: only used with model.hf (a built-in model is sized by its own keys)"
            )
        if m.weights != "pretrained":
            problems.append("model.weights: only used with model.hf")
    if m.num_labels is not None and recipe.data.task not in ("sequence-classification", "auto"):
        problems.append(
            f"model.num_labels: only used with data.task sequence-classification, not {recipe.data.task}"
        )
    return problems


def _beside_target(recipe: Recipe) -> list[str]:
    """Built-in model keys written beside model.target, which it would ignore; one line each.

    A key counts when it is set (the model section's fields set, as recipe.explicitly_set reads
    it; recipe imports this module) to a value other than its default (RUN_DIR/recipe.yaml writes
    every key out, at its default for a target: launcher.plan.resolve), and it is written in the recipe
    file itself or differs from what the file's `extends:` base gives it (an override): a base's
    keys described the built-in model the target replaces. model.name may be null.
    """
    m = recipe.model
    own, inherited = _model_sections(recipe.source)
    problems = []
    for key in ("name", *BUILT_IN_MODEL_KEYS):
        value = getattr(m, key)
        default = None if key == "name" else type(m).model_fields[key].default
        if key not in m.model_fields_set or value == default:
            continue
        if key not in own and key in inherited and inherited[key] == value:
            continue
        door = "model.hf" if m.hf is not None else "model.target"
        if key == "name":
            problems.append(
                f"model.name: {value} is a built-in model; with {door} set it to null or leave it out"
            )
        elif m.hf is not None:
            problems.append(
                f"model.{key}: not used by model.hf; override its config as model.config.<key> instead"
            )
        else:
            problems.append(
                f"model.{key}: not used by model.target; pass it to your factory as model.kwargs.{key} instead"
            )
    return problems


def _model_sections(source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model section the recipe file writes itself, and the one its `extends:` chain gives it."""
    if not source:
        return {}, {}
    try:
        raw = read_file(Path(source))
        parent = raw.get("extends")
        base = read_chain(Path(source).parent / parent, ()) if isinstance(parent, str) else {}
    except UserError:  # already reported by the recipe's loading, or not a file at all
        return {}, {}
    return _section(raw, "model"), _section(base, "model")


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    section = raw.get(name)
    return section if isinstance(section, dict) else {}


def logging_dir(recipe: Recipe) -> tuple[Path, str]:
    """logging.dir as an absolute path, and how it was read (for the dry run).

    The one rule of a recipe's paths: a relative path the recipe sets (in its file, a file it
    extends, or a `key=value` override) is relative to the recipe file's folder, as data.paths,
    data.tokenizer and model.hf are. Left unset, logging.dir is `runs` in the working directory.
    """
    written = Path(recipe.logging.dir)
    if written.is_absolute():
        return written.resolve(), "as written"
    if "dir" not in recipe.logging.model_fields_set or not recipe.source:
        return written.resolve(), "in the working directory"
    return (Path(recipe.source).parent / written).resolve(), "relative to the recipe's folder"


def _logging_rules(recipe: Recipe) -> list[str]:
    parent = logging_dir(recipe)[0]
    for path, key in ((parent, "logging.dir"), (parent / recipe.name, "name")):
        if path.exists() and not path.is_dir():
            return [f"{key}: {path} is a file, not a directory; a run directory cannot go there"]
    return []


def _loss_scale_rules(recipe: Recipe) -> list[str]:
    ls = recipe.precision.loss_scale
    key = "precision.loss_scale"
    problems = []
    # DeepSpeed takes the dynamic scale as an exponent (initial_scale_power);
    # a static scale is used as written.
    if ls.dynamic and ls.initial != 2.0 ** round(math.log2(ls.initial)):
        problems.append(f"{key}.initial: expected a power of two for a dynamic scale, got {ls.initial:g}")
    if ls.dynamic and ls.min > ls.initial:
        problems.append(f"{key}.min: {ls.min:g} is above {key}.initial {ls.initial:g}")
    if recipe.backend == "deepspeed" and ls.min != int(ls.min):
        problems.append(f"{key}.min: DeepSpeed's min_loss_scale is a whole number, got {ls.min:g}")
    return problems


def _fp8_rules(recipe: Recipe) -> list[str]:
    if recipe.precision.dtype == "fp8" and recipe.model.lora.rank:
        # torchao converts nn.Linear modules; peft's adapters wrap them and would stay in bf16 while
        # the frozen base weights alone went to fp8, which saves nothing a LoRA run spends.
        return [
            "precision.dtype: fp8 with LoRA (model.lora.rank > 0) is not supported: the adapters are not "
            "converted; use precision.dtype=bf16"
        ]
    return []


def _data_files(recipe: Recipe) -> list[str]:
    """data.paths and data.tokenizer name files and folders that are there."""
    d = recipe.data
    problems = []
    base = Path(recipe.source).parent if recipe.source else Path()
    for i, p in enumerate(d.paths if d.kind != "synthetic" and d.target is None else []):
        if d.kind == "hf-disk":
            if not (base / p).is_dir():
                problems.append(f"data.paths[{i}]: directory not found: {base / p} (data.kind hf-disk)")
        elif (base / p).is_dir():
            problems.append(f"data.paths[{i}]: {base / p} is a directory; list the files in it")
        elif not (base / p).is_file():
            problems.append(f"data.paths[{i}]: file not found: {base / p}")
    return problems + _tokenizer_dir(recipe)


def _data_rules(recipe: Recipe) -> list[str]:
    d = recipe.data
    if d.target is not None:
        return _data_target(recipe)
    problems: list[str] = ["data.kwargs: only used with data.target"] if d.kwargs else []
    if d.kind == "synthetic" and d.paths:
        problems.append("data.paths: only used with a data.kind other than synthetic")
    if d.kind != "synthetic" and not d.paths:
        what = "the directory save_to_disk wrote" if d.kind == "hf-disk" else "at least one file"
        problems.append(f"data.paths: data.kind {d.kind} needs {what}")
    m = recipe.model
    if m.name is not None and m.target is None and FAMILIES[m.name].synthetic_only and d.kind != "synthetic":
        problems.append(f"data.kind: the {m.name} model trains on synthetic data only")
    # With model.hf and data.task auto its config decides the task: the plan checks that case.
    if tasks.known(recipe):
        problems += tasks.record_problems(d.kind, tasks.resolve(recipe))
    return problems


def _tokenizer_dir(recipe: Recipe) -> list[str]:
    d = recipe.data
    base = Path(recipe.source).parent if recipe.source else Path()
    if d.tokenizer is not None and (base / d.tokenizer).is_file():
        where = base / d.tokenizer
        return [f"data.tokenizer: {where} is a file; expected the directory save_pretrained wrote"]
    if d.tokenizer is not None and not (base / d.tokenizer).is_dir():
        return [f"data.tokenizer: directory not found: {base / d.tokenizer}"]
    return []


# The file-reading keys of data: a data.target's dataset gives the rows, so it ignores them all.
DATASET_KEYS = (
    "kind", "paths", "pack", "text_field", "label_field", "prompt_field", "response_field", "num_samples",
)  # fmt: skip
# What mplaunch itself gives a data.target factory, and the key the user sets instead.
GIVEN_TO_DATASET = {"seq_len": "data.seq_len", "vocab_size": "the run's vocabulary", "seed": "train.seed"}


def _data_target(recipe: Recipe) -> list[str]:
    """data.target's rules: its vocabulary known without a tokenizer trained on files, no key beside it
    that it ignores, no data.kwargs that mplaunch gives the factory itself; one line each.

    A key counts as written beside it as for model.target (`_beside_target`): set to a value other
    than its default, in the recipe file itself or on the command line; what an `extends:` base
    gives it described the files the dataset replaces (launcher.plan.resolve resets those).
    """
    d, m = recipe.data, recipe.model
    problems = []
    vocab_given = m.vocab_size is not None or m.hf is not None or d.tokenizer is not None
    if not (vocab_given or (m.target is not None and "vocab_size" in m.kwargs)):
        problems.append(
            "data.target: the vocabulary must be known without a tokenizer trained on files: set "
            "model.vocab_size (model.kwargs.vocab_size with model.target), model.hf or data.tokenizer"
        )
    own, chain = _data_sections(recipe.source)
    for key in DATASET_KEYS:
        value = getattr(d, key)
        if key not in d.model_fields_set or value == type(d).model_fields[key].default:
            continue
        if key not in own and key in chain and chain[key] == value:
            continue
        problems.append(f"data.{key}: not used by data.target ({_IGNORED_BECAUSE[key]}); leave it out")
    problems += [
        f"data.kwargs.{key}: mplaunch gives the factory {key} from {source}; set that instead"
        for key, source in GIVEN_TO_DATASET.items()
        if key in d.kwargs
    ]
    return problems


_IGNORED_BECAUSE = {
    "kind": "the factory's dataset is the data",
    "paths": "pass your files to the factory as data.kwargs.paths",
    "pack": "each item of the dataset is one row of data.seq_len",
    "num_samples": "the dataset's len() is the number of samples",
    **{
        field: "the items hold input_ids and labels"
        for field in ("text_field", "label_field", "prompt_field", "response_field")
    },
}


def _data_sections(source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The data section the recipe file writes itself, and the one its whole `extends:` chain gives
    (paths rebased to the recipe's folder, as the recipe reads them)."""
    if not source:
        return {}, {}
    try:
        own, chain = read_file(Path(source)), read_chain(Path(source), ())
    except UserError:  # already reported by the recipe's loading, or not a file at all
        return {}, {}
    return _section(own, "data"), _section(chain, "data")


# Each group of rules, what it checks (named when it is skipped) and the keys it reads: with one of
# them failing the schema, the group would judge the default standing in for it, so it is skipped.
RULES: tuple[tuple[Callable[[Recipe], list[str]], str, tuple[str, ...]], ...] = (
    (_zero_rules, "the ZeRO settings", ("zero", "backend")),
    (
        lambda r: _model_rules(r) + _fp8_rules(r),
        "the model's keys",
        ("model", "train.activation_checkpointing", "data"),
    ),
    (_data_files, "the data files", ("data.kind", "data.paths", "data.tokenizer", "data.target")),
    (_data_rules, "the data's keys", ("data", "model")),
    (tasks.problems, "the task", ("model", "data.task")),
    (_logging_rules, "the run directory", ("logging.dir", "name")),
    (_loss_scale_rules, "the loss scale", ("precision.loss_scale", "backend")),
)
