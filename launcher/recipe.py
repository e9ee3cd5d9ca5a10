"""The recipe: the user's contract, its YAML loading, overrides and validation.

Every field carries its one-sentence description; `mplaunch check --explain`
prints them and the README's reference table is generated from them. Unknown
keys and wrong types are reported all at once, each naming its dotted path.
"""

from __future__ import annotations

import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from launcher.errors import UserError
from launcher.recipe_errors import attribute, describe_errors, leaf_keys


def _no_bool(value: Any) -> Any:
    # YAML 1.1 reads yes/no/on/off as booleans, and Python's True == 1 would
    # otherwise slip through a Literal[0, 1, 2, 3].
    if isinstance(value, bool):
        shown = str(value).lower()
        raise ValueError(f"expected one of 0, 1, 2, 3, got {shown} (YAML reads yes/no/on/off as true/false)")
    return value


def _list_to_tuple(value: Any) -> Any:
    # YAML has lists, not tuples; strict mode would otherwise refuse every list.
    return tuple(value) if isinstance(value, list) else value


class Section(BaseModel):
    # allow_inf_nan=False: YAML reads .inf and .nan as numbers, and no field means them.
    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True, allow_inf_nan=False
    )


PositiveInt = Annotated[int, Field(ge=1)]
# torch's AdamW refuses betas outside [0, 1).
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
TARGET_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


class Model(Section):
    name: Literal["bert-mlm", "gpt2-lm", "tiny-mlp"] | None = "bert-mlm"
    """Built-in model; ignored when `target` is set (set it to null then)."""
    size: Literal["tiny", "mini", "base", "large"] = "base"
    """Preset size of the built-in model (BERT-base is 110M parameters, tiny is a few hundred thousand)."""
    hidden_size: PositiveInt | None = None
    """Override the preset's hidden width."""
    num_layers: PositiveInt | None = None
    """Override the preset's number of transformer layers."""
    num_heads: PositiveInt | None = None
    """Override the preset's number of attention heads (must divide hidden_size)."""
    intermediate_size: PositiveInt | None = None
    """Override the preset's feed-forward width."""
    vocab_size: PositiveInt | None = None
    """Vocabulary size; defaults to the tokenizer's, or 30522 (BERT) / 50257 (GPT-2) for synthetic data."""
    max_position_embeddings: PositiveInt | None = None
    """Longest sequence the model accepts; defaults to 512 (BERT) / 1024 (GPT-2)."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    """Dropout probability in the built-in transformers."""
    target: Annotated[str, Field(pattern=TARGET_PATTERN)] | None = None
    """Your own model: "package.module:factory", called with `kwargs`; it returns an nn.Module whose forward(**batch) gives a loss."""
    kwargs: dict[str, Any] = {}
    """Keyword arguments for `target`."""


class Data(Section):
    kind: Literal["synthetic", "text", "jsonl"] = "synthetic"
    """synthetic random tokens (throughput work), or local text / jsonl files."""
    paths: list[str] = []
    """Files for kind text/jsonl, relative to the recipe file."""
    text_field: str = "text"
    """Field of each jsonl record that holds the text."""
    tokenizer: str | None = None
    """A local tokenizer directory (from save_pretrained); when unset a WordPiece tokenizer is trained on `paths`."""
    seq_len: PositiveInt = 128
    """Tokens per sample."""
    mask_prob: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.15
    """Fraction of tokens masked for masked-LM models."""
    num_samples: PositiveInt = 4096
    """Samples in the synthetic dataset (one epoch)."""
    eval_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    """Fraction of the samples held out for evaluation."""
    num_workers: Annotated[int, Field(ge=0)] = 0
    """DataLoader worker processes per rank."""


class Optimizer(Section):
    name: Literal["adamw"] = "adamw"
    """The optimizer (AdamW, fused where the device supports it)."""
    lr: Annotated[float, Field(gt=0.0)] = 1e-4
    """Peak learning rate."""
    betas: Annotated[tuple[Beta, Beta], BeforeValidator(_list_to_tuple)] = (0.9, 0.999)
    """Adam beta1 and beta2."""
    eps: Annotated[float, Field(gt=0.0)] = 1e-8
    """Adam epsilon."""
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    """Decoupled weight decay."""


class Scheduler(Section):
    name: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warmup: linear or cosine to min_lr_ratio x lr, or constant."""
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    """Optimizer steps of linear warmup from 0 to lr."""
    min_lr_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """Final learning rate as a fraction of lr."""


class Train(Section):
    micro_batch_size: PositiveInt | None = None
    """Samples per rank per forward pass."""
    global_batch_size: PositiveInt | None = None
    """Samples per optimizer step across all ranks (= micro_batch_size x grad_accum x world_size)."""
    grad_accum: PositiveInt | None = None
    """Micro-batches accumulated per optimizer step."""
    max_steps: PositiveInt = 1000
    """Optimizer steps to train."""
    eval_every: Annotated[int, Field(ge=0)] = 0
    """Evaluate every this many steps (0: never)."""
    eval_steps: PositiveInt = 10
    """Micro-batches per evaluation."""
    grad_clip: Annotated[float, Field(ge=0.0)] = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    seed: Annotated[int, Field(ge=0)] = 1234
    """Seed for python, numpy and torch (offset by rank where ranks must differ)."""
    compile: bool = False
    """Wrap the model in torch.compile."""


class LossScale(Section):
    dynamic: bool = True
    """Dynamic loss scaling; false uses `initial` as a static scale."""
    initial: Annotated[float, Field(gt=0.0)] = 2.0**16
    """Starting loss scale (a power of two when dynamic), or the fixed scale when dynamic is false."""
    window: PositiveInt = 1000
    """Overflow-free steps before the scale doubles."""
    hysteresis: PositiveInt = 2
    """Overflows tolerated before the scale is halved."""
    consecutive_hysteresis: bool = False
    """Refill the hysteresis after every overflow-free step."""
    min: Annotated[float, Field(gt=0.0)] = 1.0
    """Lowest scale; overflowing there stops the run (DeepSpeed takes a whole number)."""


class Precision(Section):
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """Compute dtype; auto picks bf16 on CPU and Ampere-or-newer GPUs, fp16 on older GPUs. Master weights stay fp32."""
    allow_tf32: bool = True
    """Let fp32 matrix products use TF32 tensor cores on Ampere or newer."""
    loss_scale: LossScale = LossScale()
    """Dynamic loss scaling for fp16."""


class Zero(Section):
    stage: Annotated[Literal[0, 1, 2, 3], BeforeValidator(_no_bool)] = 0
    """ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """Keep optimizer state (and its step) on the CPU; needs stage >= 1."""
    offload_params: bool = False
    """Keep parameters on the CPU; needs stage 3."""


class Launch(Section):
    nnodes: PositiveInt = 1
    """Nodes; more than one needs --slurm."""
    nproc_per_node: Literal["auto"] | PositiveInt = "auto"
    """Processes per node: auto is one per visible GPU, or 1 on CPU."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where to train; auto is cuda when a GPU is visible."""
    max_restarts: Annotated[int, Field(ge=0)] = 0
    """Times torchrun restarts the workers after a failure."""
    master_port: Annotated[int, Field(ge=1024, le=65535)] | None = None
    """Rendezvous port; default: torchrun's --standalone picks a free one."""


class Checkpoint(Section):
    dir: str | None = None
    """Checkpoint directory; default RUN_DIR/checkpoints."""
    every_steps: Annotated[int, Field(ge=0)] = 0
    """Save every this many steps (0: only at the end and on a stop request)."""
    keep: PositiveInt = 3
    """Newest checkpoints kept."""
    resume: Literal["auto", "never"] = "auto"
    """auto: continue from the run directory's latest complete checkpoint."""


class Logging(Section):
    dir: str = "runs"
    """Parent of run directories; a run lives in DIR/NAME."""
    every_steps: PositiveInt = 10
    """Steps between metrics lines and console updates."""
    tensorboard: bool = True
    """Write TensorBoard event files into the run directory."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    memory_report: bool = False
    """After step 2 each rank writes RUN_DIR/memory/rank-N.json: bytes it holds in parameters, gradients, fp32 master weights and optimizer state."""


class Slurm(Section):
    partition: str | None = None
    """Partition (sbatch --partition)."""
    account: str | None = None
    """Account to charge (sbatch --account)."""
    qos: str | None = None
    """Quality of service (sbatch --qos)."""
    time: str = "01:00:00"
    """Time limit, as sbatch takes it (HH:MM:SS or D-HH:MM:SS)."""
    nodes: PositiveInt | None = None
    """Nodes; default launch.nnodes."""
    gpus_per_node: Annotated[int, Field(ge=0)] | None = None
    """GPUs per node; default launch.nproc_per_node on GPU, 0 on CPU."""
    cpus_per_task: PositiveInt | None = None
    """CPU cores for each node's task."""
    mem: str | None = None
    """Memory per node (sbatch --mem, e.g. 64G)."""
    extra_sbatch: list[str] = []
    """Further #SBATCH options, e.g. "--constraint=h100"."""
    setup: list[str] = []
    """Shell lines run before the launch (module load, source venv)."""
    env: dict[str, str] = {}
    """Environment variables for the job, on top of mplaunch's defaults."""
    signal_s: Annotated[int, Field(ge=10)] = 120
    """Seconds before the time limit at which the job is told to checkpoint and requeue."""
    max_requeues: Annotated[int, Field(ge=0)] = 3
    """Requeues allowed after time limits or preemption."""


class Recipe(Section):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    """Run name (letters, digits, . _ -); the run directory is logging.dir/name."""
    model: Model = Model()
    """What to train."""
    data: Data = Data()
    """What to train on."""
    optimizer: Optimizer = Optimizer()
    """Optimizer settings."""
    scheduler: Scheduler = Scheduler()
    """Learning-rate schedule."""
    train: Train = Train()
    """Batch arithmetic and loop settings."""
    precision: Precision = Precision()
    """Mixed precision."""
    backend: Literal["deepspeed", "accelerate"] = "deepspeed"
    """Which library wraps the model."""
    zero: Zero = Zero()
    """ZeRO sharding (FSDP under accelerate)."""
    launch: Launch = Launch()
    """Processes and devices."""
    checkpoint: Checkpoint = Checkpoint()
    """Checkpoints and resume."""
    logging: Logging = Logging()
    """Metrics and console."""
    slurm: Slurm = Slurm()
    """Batch-job settings for --slurm."""
    source: str = Field(default="", exclude=True)
    """(set by mplaunch) the recipe file this came from."""


# --------------------------------------------------------------------------- loading


RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def locate(name: str, verbs: list[str] | tuple[str, ...] = ()) -> Path:
    """A recipe path as given, or a shipped recipe by name (`bert`, `bert.yaml`, `recipes/bert.yaml`).

    Args:
        name: what the user typed.
        verbs: command names; a name close to one of them gets a "did you mean" hint.

    Raises:
        UserError: no such file and no such shipped recipe.
    """
    import difflib

    path = Path(name)
    if path.exists():
        return path
    stem = path.name.removesuffix(".yaml").removesuffix(".yml")
    shipped = RECIPES_DIR / f"{stem}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    verb = difflib.get_close_matches(name, list(verbs), n=1, cutoff=0.75)
    hint = f"did you mean `mplaunch {verb[0]}`?" if verb else f"shipped recipes: {names}"
    raise UserError(f"{name}: recipe file not found", hint=hint)


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file, apply its `extends:` chain and the dotted overrides, and validate.

    Args:
        path: the recipe file.
        overrides: `dotted.key=value` strings; values are read as YAML scalars.

    Returns:
        The validated recipe.

    Raises:
        UserError: with one line per problem, all problems at once.
    """
    path = Path(path)
    raw = _read_chain(path, ())
    override_paths = []
    for item in overrides:
        dotted, value = parse_override(item)
        _set_dotted(raw, dotted, value)
        override_paths.append(dotted)
    raw.setdefault("name", path.stem)
    raw.pop("extends", None)
    raw["source"] = str(path)
    return validate(raw, str(path), override_paths)


def validate(raw: dict[str, Any], label: str, override_paths: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Validate a merged recipe dict, then its cross-field rules; raise every problem at once.

    Args:
        raw: the merged recipe as read from YAML.
        label: where problems not set by an override come from (the recipe file).
        override_paths: dotted keys set on the command line, for attribution.
    """
    _drop_empty_sections(raw, Recipe)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        lines = describe_errors(exc, Recipe)
        raise UserError([attribute(line, label, override_paths) for line in lines]) from None
    problems = check_rules(recipe)
    if problems:
        raise UserError([attribute(p, label, override_paths) for p in problems])
    return recipe


def _drop_empty_sections(raw: dict[str, Any], model: type[BaseModel]) -> None:
    # `slurm:` with every line below commented out reads as null; treat it as
    # an empty section (all defaults) rather than as a type error.
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel) and name in raw:
            if raw[name] is None:
                del raw[name]
            elif isinstance(raw[name], dict):
                _drop_empty_sections(raw[name], sub)


def parse_override(item: str) -> tuple[str, Any]:
    """Split `a.b.c=value` and read the value with YAML scalar semantics."""
    key, sep, text = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
        raise UserError(f"override {item!r}: expected dotted.key=value", hint="e.g. train.max_steps=20")
    try:
        return key, yaml.load(text, Loader=_Loader) if text else ""
    except yaml.YAMLError as exc:
        raise UserError(f"override {key}: value {text!r} is not valid YAML ({_yaml_reason(exc)})") from None


class _Loader(yaml.SafeLoader):
    """Safe YAML that refuses duplicate keys (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


# Numbers as YAML 1.2 reads them. YAML 1.1 needs a dot in a float, so PyYAML
# reads lr: 1e-4 as a string; and it reads base-60 numbers, so slurm's
# time: 1:00:00 would arrive as the integer 3600.
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _INT,
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?"  # a dot, maybe an exponent
        r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"  # an exponent without a dot: 1e-4
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    """Parse YAML the way recipes are read (duplicate keys refused, 1e-4 is a number)."""
    return yaml.load(text, Loader=_Loader)


def _read_chain(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise UserError(f"{path}: extends cycle: {cycle}")
    raw = read_file(path)
    parent = raw.get("extends")
    if parent is None:
        return raw
    if not isinstance(parent, str) or not parent:
        raise UserError(f"{path}: extends: expected the path of a base recipe, got {parent!r}")
    base_file = path.parent / parent
    if not base_file.is_file():
        raise UserError(f"{path}: extends: base recipe not found: {base_file}")
    base = _read_chain(base_file, (*chain, resolved))
    _rebase_paths(base, base_file, path)
    return deep_merge(base, {k: v for k, v in raw.items() if k != "extends"})


def read_file(path: Path) -> dict[str, Any]:
    """One recipe file as a mapping, without its extends chain; UserError if unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(
            f"{path}: recipe file not found", hint="`mplaunch recipes` lists the shipped ones"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read recipe ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        data = read_yaml(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({_yaml_reason(exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    return data


def _yaml_reason(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _rebase_paths(base: dict[str, Any], base_file: Path, child_file: Path) -> None:
    # Data paths are relative to the file that names them; after merging they
    # are read relative to the child, so rewrite the base's to stay correct.
    data = base.get("data")
    if not isinstance(data, dict):
        return
    rel = Path(_relpath(base_file.parent, child_file.parent))
    if isinstance(data.get("paths"), list):
        data["paths"] = [
            p if not isinstance(p, str) or Path(p).is_absolute() else str(rel / p) for p in data["paths"]
        ]
    if isinstance(data.get("tokenizer"), str) and not Path(data["tokenizer"]).is_absolute():
        data["tokenizer"] = str(rel / data["tokenizer"])


def _relpath(target: Path, start: Path) -> str:
    return os.path.relpath(target.resolve(), start.resolve())


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else in `top` replaces what `base` had."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            prefix = ".".join(parts[: i + 1])
            raise UserError(f"override {dotted}: {prefix} is a value, not a section")
        node = child
    node[parts[-1]] = value


# --------------------------------------------------------------------------- cross-field rules


def check_rules(recipe: Recipe) -> list[str]:
    """Rules that span fields and need no knowledge of the machine; one line per broken rule."""
    z = recipe.zero
    problems: list[str] = []
    if z.offload_optimizer and z.stage < 1:
        problems.append(f"zero.offload_optimizer: needs zero.stage >= 1, got stage {z.stage}")
    if z.offload_params and z.stage != 3:
        problems.append(f"zero.offload_params: needs zero.stage 3, got stage {z.stage}")
    if recipe.backend == "accelerate" and z.offload_optimizer and not z.offload_params:
        problems.append(
            "zero.offload_optimizer: FSDP under accelerate offloads parameters and optimizer together; "
            "set zero.offload_params=true too, or use backend=deepspeed"
        )
    problems += _model_rules(recipe)
    problems += _data_rules(recipe)
    problems += _loss_scale_rules(recipe)
    if recipe.launch.nnodes > 1 and recipe.slurm.nodes not in (None, recipe.launch.nnodes):
        problems.append(
            f"slurm.nodes: {recipe.slurm.nodes} disagrees with launch.nnodes {recipe.launch.nnodes}"
        )
    return problems


def _model_rules(recipe: Recipe) -> list[str]:
    from launcher.shapes import shape_of  # shapes imports this module

    m = recipe.model
    if m.target is None and m.name is None:
        return ["model: set model.name to a built-in model or model.target to your own factory"]
    if m.target is not None:
        return []
    problems = ["model.kwargs: only used with model.target"] if m.kwargs else []
    shape = shape_of(m)
    if m.name != "tiny-mlp" and shape.hidden_size % shape.num_heads:
        problems.append(
            f"model.num_heads: {shape.num_heads} does not divide model.hidden_size {shape.hidden_size}"
            f" (the {m.size} preset's, unless set)"
        )
    if m.name != "tiny-mlp" and recipe.data.seq_len > shape.max_position_embeddings:
        problems.append(
            f"data.seq_len: {recipe.data.seq_len} is longer than model.max_position_embeddings"
            f" {shape.max_position_embeddings}"
        )
    return problems


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


def _data_rules(recipe: Recipe) -> list[str]:
    d = recipe.data
    problems: list[str] = []
    if d.kind == "synthetic" and d.paths:
        problems.append("data.paths: only used with data.kind text or jsonl")
    if d.kind != "synthetic" and not d.paths:
        problems.append(f"data.paths: data.kind {d.kind} needs at least one file")
    base = Path(recipe.source).parent if recipe.source else Path()
    for i, p in enumerate(d.paths if d.kind != "synthetic" else []):
        if not (base / p).is_file():
            problems.append(f"data.paths[{i}]: file not found: {base / p}")
    if d.tokenizer is not None and not (base / d.tokenizer).is_dir():
        problems.append(f"data.tokenizer: directory not found: {base / d.tokenizer}")
    if recipe.model.name == "tiny-mlp" and recipe.model.target is None and d.kind != "synthetic":
        problems.append("data.kind: the tiny-mlp model trains on synthetic data only")
    return problems


def explicitly_set(recipe: Recipe) -> set[str]:
    """Dotted keys the user wrote (in a file or an override), as opposed to defaults."""
    out: set[str] = set()

    def walk(model: BaseModel, prefix: str) -> None:
        for name in model.model_fields_set:
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                walk(value, f"{prefix}{name}.")
            else:
                out.add(prefix + name)

    walk(recipe, "")
    return out


def to_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe as plain data (every default filled in)."""
    return recipe.model_dump(mode="json")


def all_keys() -> list[str]:
    """Every valid dotted key of the recipe, for suggestions and the reference table."""
    return leaf_keys(Recipe)


def reference_rows() -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every recipe key: `check --explain` and the README."""
    rows = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            sub = field.annotation
            if field.exclude:
                continue
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                walk(sub, f"{prefix}{name}.")
                continue
            default = "file name" if field.is_required() else _default_text(field.default)
            rows.append(
                (prefix + name, _type_name(sub, tuple(field.metadata)), default, field.description or "")
            )

    walk(Recipe, "")
    return rows


def reference_markdown() -> str:
    """The README's recipe reference: one table row per key, from the field docstrings."""
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for key, type_, default, doc in reference_rows():
        cells = (f"`{key}`", type_, f"`{default}`", doc)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _type_name(annotation: Any, metadata: tuple[Any, ...] = ()) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0], (*metadata, *args[1:]))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if annotation is type(None):
        return "null"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is tuple and len(set(args)) == 1:
        return f"list of {len(args)} ({_type_name(args[0])})"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    name = {"Any": "any"}.get(
        getattr(annotation, "__name__", ""), getattr(annotation, "__name__", str(annotation))
    )
    bounds = [f"{op} {getattr(m, attr)}" for m in _flat(metadata) for attr, op in _OPS if hasattr(m, attr)]
    return " ".join([name, ", ".join(bounds)]) if bounds else name


_OPS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _flat(metadata: tuple[Any, ...]) -> list[Any]:
    # A FieldInfo inside Annotated keeps its constraints in its own metadata.
    return [m for item in metadata for m in (getattr(item, "metadata", None) or [item])]


def _default_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value >= 1024:
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    return str(value)
