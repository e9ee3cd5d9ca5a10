"""Recipe + Hardware -> a frozen Plan: every number and decision a run depends on.

The dry run prints the plan, the launcher executes it, the workers read it
back from `RUN_DIR/plan.json`: one set of values everywhere.

A user's model (`model.target`, "module:factory") is imported by the workers
with the recipe's folder first on the module search path (`Plan.import_dir`),
then the working directory, then PYTHONPATH and installed packages; the plan
checks the module can be found there without importing it (that may import
torch). The factory is given `vocab_size=Plan.vocab_size` when it takes that
parameter and model.kwargs does not set it (launcher.worker.models).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.errors import UserError
from launcher.plan import backend_config, data_check, fp8, hf_dir, no_effect, precision, processes, vocab
from launcher.plan.batch import Batch, resolve_batch
from launcher.plan.extras import require_packages
from launcher.plan.hardware import Hardware
from launcher.plan.model import (
    LOSSES,
    NORMALIZATIONS,
    ModelFacts,
    ResolvedModel,
    data_files,
    relative_to_recipe,
    resolve_model,
    saved_facts,
    user_code,
    vocab_of,
)  # fmt: skip
from launcher.plan.precision import PrecisionPolicy
from launcher.recipe.errors import RecipeProblems, not_checked
from launcher.recipe.rules import logging_dir
from launcher.recipe.schema import load, to_dict
from launcher.recipe.sections import Recipe
from launcher.recipe.shapes import Shape, shape_of
from launcher.rundir.layout import RunDir


@dataclass(frozen=True)
class Plan:
    """Everything a run will do, resolved. Printing it is the dry run."""

    recipe: Recipe
    run_dir: str
    device: str
    device_reason: str
    dist_backend: str
    nnodes: int
    nproc_per_node: int
    batch: Batch
    precision: PrecisionPolicy
    backend_config: dict[str, Any]
    env: dict[str, str]
    command: tuple[str, ...]
    vocab_size: int
    vocab_source: str
    shape: Shape | None  # None for a user's model (model.target)
    model: ModelFacts  # the task, classes, causal or not, the loss: decided here once, read by the workers
    data_paths: tuple[str, ...] = ()
    tokenizer_dir: str | None = None
    import_dir: str | None = None  # model.target's and data.target's modules are imported from here first
    hf_dir: str | None = None  # model.hf, an absolute directory or a hub id
    num_params: int | None = None  # model.hf's parameter count, from its safetensors headers
    init_from: str | None = None  # model.init_from, absolute
    warnings: tuple[str, ...] = field(default=())
    problems: tuple[str, ...] = field(default=())

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def sharding(self) -> str:
        """How the backend shards the model, as it will run: ZeRO stage, FSDP2 or DDP."""
        stage = self.recipe.zero.stage
        if self.recipe.backend == "deepspeed":
            return f"ZeRO stage {stage}"
        fsdp = self.backend_config.get("fsdp2")
        if fsdp:
            how = "reshard after forward" if fsdp["reshard_after_forward"] else "no reshard after forward"
            return f"FSDP2 fully_shard, {how} (zero.stage {stage})"
        return "DDP"

    @property
    def plan_path(self) -> Path:
        return RunDir.from_plan(self).plan_file

    def to_json(self) -> str:
        """The handoff file's content: the resolved recipe plus the plan."""
        body = {k: v for k, v in asdict(self).items() if k not in ("recipe", "precision")}
        body["precision"] = self.precision.to_dict()
        return json.dumps(
            {"recipe": to_dict(self.recipe), "source": self.recipe.source, "plan": body}, indent=2
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Read a plan written by `to_json` (the worker side of the handoff)."""
        data = json.loads(text)
        recipe_data = dict(data["recipe"], source=data.get("source", ""))
        recipe = Recipe.model_validate_json(json.dumps(recipe_data))
        body = dict(data["plan"])
        policy = PrecisionPolicy.from_dict(body.pop("precision"))
        body["batch"] = Batch(**body["batch"])
        body["shape"] = Shape(**body["shape"]) if body["shape"] is not None else None
        body["model"] = saved_facts(recipe, body)
        body["command"] = tuple(body["command"])
        body["data_paths"] = tuple(body["data_paths"])
        body["warnings"] = tuple(body["warnings"])
        body["problems"] = tuple(body["problems"])
        return cls(recipe=recipe, precision=policy, **body)

    def command_line(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return f"{env} {shlex.join(self.command)}".strip()

    def _loss_row(self) -> str:
        assert self.model.loss is not None
        return f"{LOSSES[self.model.loss]}; {NORMALIZATIONS[self.recipe.train.loss_normalization]}"

    def _target_row(self) -> str:
        vocab_ = (
            ""
            if "vocab_size" in self.recipe.model.kwargs
            else f", plus vocab_size={self.vocab_size} if it takes one"
        )
        return (
            f"{self.recipe.model.target}(**model.kwargs{vocab_}), imported from {self.import_dir} first,"
            " then the working directory and PYTHONPATH"
        )

    def _dataset_row(self) -> str:
        d = self.recipe.data
        return (
            f"{d.target}(seq_len={d.seq_len}, vocab_size={self.vocab_size}, seed={self.recipe.train.seed}"
            f" (those it takes), **data.kwargs), imported from {self.import_dir} first; read by row"
        )

    def _hf_row(self) -> str:
        m = self.recipe.model
        auto = hf_dir.AUTO_CLASSES[self.model.task]
        how = "from_pretrained" if m.weights == "pretrained" else "from_config (random weights)"
        count = f", {self.num_params:,} parameters" if self.num_params else ""
        config = f", config overrides {dict(m.config)}" if m.config else ""
        return f"{auto}.{how} {self.hf_dir}{count}{config}"

    def describe(self, memory_section: str | None = None) -> str:
        """The dry run: the resolved recipe, batch equation, backend config, environment and command.

        The backend section is the very dict the engine is built from (plan.json holds it too).

        Args:
            memory_section: the memory planner's lines for this plan (launcher.plan.estimate.memory.describe),
                shown after the backend section.
        """
        label = "DeepSpeed config" if self.recipe.backend == "deepspeed" else "Accelerate settings"
        rows = [
            ("device", f"{self.device} ({self.device_reason})"),
            ("precision", precision.describe_row(self.precision)),
            (
                "processes",
                f"{self.nnodes} x {self.nproc_per_node} = world_size {self.world_size}, {self.dist_backend}",
            ),
            ("batch", self.batch.equation(self.nnodes, self.nproc_per_node)),
            ("backend", f"{self.recipe.backend}, {self.sharding}"),
            ("task", f"{self.model.task} (data.task {self.recipe.data.task})"),
            *([("loss", self._loss_row())] if self.model.loss is not None else []),
            ("vocab", f"{self.vocab_size} ({self.vocab_source})"),
            *([("model", self._target_row())] if self.recipe.model.target else []),
            *([("model", self._hf_row())] if self.hf_dir else []),
            *([("data", self._dataset_row())] if self.recipe.data.target else []),
            *(
                [("init from", f"{self.init_from} (fresh optimizer, schedule and step 0)")]
                if self.init_from
                else []
            ),
            (
                "run dir",
                f"{self.run_dir} (logging.dir {self.recipe.logging.dir} {logging_dir(self.recipe)[1]})",
            ),
        ]
        ranks = f"0..{self.world_size - 1}" if self.world_size > 1 else "0"
        per_rank = (
            f"set by torchrun for each rank: RANK={ranks} LOCAL_RANK={ranks} WORLD_SIZE={self.world_size}"
            " MASTER_ADDR MASTER_PORT"
        )
        parts = [
            "== recipe (resolved) ==",
            yaml.safe_dump(to_dict(self.recipe), sort_keys=False).rstrip(),
            "== plan ==",
            *(f"{k:<10} {v}" for k, v in rows),
            f"== {label} ==",
            json.dumps(self.backend_config, indent=2),
            *([fp8.describe(self.precision)] if self.precision.fp8 is not None else []),
            *([memory_section] if memory_section else []),
            "== environment ==",
            *(f"{k}={v}" for k, v in self.env.items()),
            per_rank,
            "== command ==",
            shlex.join(self.command),
        ]
        if self.warnings:
            parts += ["== warnings ==", *(f"warning: {w}" for w in self.warnings)]
        return "\n".join(parts)


# What each part of the plan reads of the recipe. A recipe whose schema check failed is planned with
# defaults standing in for the failed keys (plan_file); a part that reads one of them is skipped.
_BATCH = ("train.micro_batch_size", "train.global_batch_size", "train.grad_accum", "launch")
MACHINE = "the devices and precision"  # what this machine cannot run: the dry run shows the plan anyway
PLAN_PARTS = {
    "the model": ("model", "data.task", "data.seq_len", "data.tokenizer", "data.kind"),
    "the batch": _BATCH,
    MACHINE: ("launch", "precision", "backend", "zero", "model.target", "model.hf", "data.target"),
    "the data contents": ("data", "model", *_BATCH),
}


@dataclass
class _Draft:
    """What `resolve` works out before it builds the Plan, with each part's problems."""

    recipe: Recipe
    import_dir: str | None
    model: ResolvedModel
    device: str
    device_reason: str
    nnodes: int
    nproc: int
    batch: Batch | None
    policy: PrecisionPolicy
    data_paths: tuple[str, ...]
    tokenizer: str | None
    vocab: vocab.Vocab | None
    parts: dict[str, list[str]]  # PLAN_PARTS' name -> its problems

    def problems(self, skip: Collection[str] = (MACHINE,)) -> list[str]:
        return [line for name, lines in self.parts.items() if name not in skip for line in lines]


def resolve(
    recipe: Recipe, hardware: Hardware, *, nnodes_allowed: bool = False, keep_machine_problems: bool = False
) -> Plan:
    """Resolve every `auto` against `hardware` and check what the backends would reject.

    Args:
        recipe: a validated recipe.
        hardware: the machine the workers will run on.
        nnodes_allowed: true when the launch goes through Slurm, which starts
            one torchrun per node; a local launch uses one node.
        keep_machine_problems: record what this machine cannot run in
            `Plan.problems` instead of raising (the dry run shows the plan anyway).

    Raises:
        UserError: one line per problem, every part's at once.
    """
    # Problems with the recipe itself always stop here; problems with running it
    # on *this* machine are kept in the plan when the caller only wants to look.
    d = _draft(recipe, hardware, nnodes_allowed)
    machine = d.parts[MACHINE]
    if d.problems() or (machine and not keep_machine_problems):
        raise UserError(d.problems() + machine)
    recipe, batch, model, hf = d.recipe, d.batch, d.model, d.model.hf
    assert batch is not None
    assert d.vocab is not None
    assert batch.global_batch_size == batch.micro_batch_size * batch.grad_accum * batch.world_size
    run_dir = str(logging_dir(recipe)[0] / recipe.name)
    return Plan(
        recipe=recipe,
        run_dir=run_dir,
        device=d.device,
        device_reason=d.device_reason,
        dist_backend="nccl" if d.device == "cuda" else "gloo",
        nnodes=d.nnodes,
        nproc_per_node=d.nproc,
        batch=batch,
        precision=d.policy,
        backend_config=_backend_config(recipe, d.policy, d.device, batch),
        env={**processes.env(recipe, d.device, d.nproc, hardware), **model.hub.env},
        command=processes.torchrun_command(recipe, d.nproc, run_dir),
        vocab_size=d.vocab.size,
        vocab_source=d.vocab.source,
        shape=shape_of(recipe.model, d.vocab.size) if recipe.model.name is not None else None,
        model=model.facts,
        data_paths=d.data_paths,
        tokenizer_dir=d.tokenizer,
        import_dir=d.import_dir,
        hf_dir=hf.source if hf is not None else None,
        num_params=hf.num_params if hf is not None else None,
        init_from=relative_to_recipe(recipe, recipe.model.init_from),
        warnings=(
            *no_effect.warnings(recipe, d.policy, d.device, model.facts.language_model, hf),
            *model.hub.notes,
        ),
        problems=tuple(machine),
    )


def plan_file(
    path: str | Path,
    overrides: Sequence[str],
    hardware: Hardware,
    values: Mapping[str, Any] | None = None,
    *,
    keep_machine_problems: bool = False,
    train_tokenizer: bool = False,
) -> Plan:
    """Load the recipe file and plan it for `hardware`, every problem of both at once: the plan also
    judges a recipe its rules refused (what it says), but a key that failed the schema has no value, so
    a default stands in and the parts that read it (PLAN_PARTS) are skipped, named on the last line.
    `train_tokenizer`: a real launch (prepare_vocab before the plan).

    Raises:
        UserError: one line per problem.
    """
    try:
        recipe = load(path, overrides, values)
        if train_tokenizer:
            prepare_vocab(recipe)
    except RecipeProblems as exc:
        if exc.stand_in is None:
            raise UserError(exc.problems + not_checked([*exc.skipped, "the plan"])) from None
        skip = [name for name, keys in PLAN_PARTS.items() if exc.reads_failed(keys)]
        try:
            found = _draft(exc.stand_in, hardware, False).problems(skip)
        except UserError as more:  # a part that raises its problem rather than collecting it
            found = more.lines
        found = [line for line in found if line.split(": ", 1)[0] not in exc.keys]
        raise UserError(exc.problems + found + not_checked([*exc.skipped, *skip])) from None
    return resolve(recipe, hardware, keep_machine_problems=keep_machine_problems)


def _draft(recipe: Recipe, hardware: Hardware, nnodes_allowed: bool) -> _Draft:
    """Every part of the plan worked out, each part's problems collected rather than raised."""
    recipe, import_dir, machine = user_code(recipe)
    model = resolve_model(recipe)
    batch_problems: list[str] = []
    device, device_reason = processes.device(recipe, hardware, machine)
    nproc = processes.nproc(recipe, hardware, device, machine)
    nnodes = processes.nnodes(recipe, nnodes_allowed, batch_problems)
    batch = resolve_batch(recipe, nnodes * nproc, batch_problems)
    policy = precision.resolve(recipe, device, hardware)
    machine += precision.problems(policy, recipe.backend, device, hardware) + list(model.hub.machine)
    data_paths, tokenizer = data_files(recipe, model.hf)
    global_batch = batch.global_batch_size if batch is not None else None
    data = data_check.problems(recipe, data_paths, global_batch, tokenizer is None, task=model.facts.task)
    vocab_ = None
    if not data and all(Path(p).exists() for p in data_paths):  # the vocabulary is the data's tokenizer's
        vocab_, data = vocab_of(recipe, model, data_paths, tokenizer, logging_dir(recipe)[0] / recipe.name)
    facts, size = model.facts, vocab_.size if vocab_ else None
    layers = (
        fp8.layers_of(recipe, model.hf, facts.task, facts.num_labels, size) if policy.dtype == "fp8" else None
    )
    policy = fp8.attach(policy, recipe, device, layers)
    parts = {
        "the model": [*model.problems, *fp8.problems(recipe, layers)],  # no fp8 problem for a stand-in
        "the batch": batch_problems,
        MACHINE: machine,
        "the data contents": data,
    }
    return _Draft(
        recipe, import_dir, model, device, device_reason, nnodes, nproc, batch, policy, data_paths,
        tokenizer, vocab_, parts,
    )  # fmt: skip


def _backend_config(recipe: Recipe, policy: PrecisionPolicy, device: str, batch: Batch) -> dict[str, Any]:
    if recipe.backend == "deepspeed":
        return backend_config.deepspeed_config(
            recipe, policy, device, batch.micro_batch_size, batch.grad_accum, batch.global_batch_size
        )
    return backend_config.accelerate_settings(recipe, policy, device, batch.grad_accum)


def prepare_vocab(recipe: Recipe) -> None:
    """Before a real launch: train the data's tokenizer (cached) so the plan knows its exact vocabulary."""
    require_packages(recipe, up_to="launcher")  # names every package the run lacks, not only these
    if vocab.needs_training(recipe) and recipe.model.hf is None:  # model.hf brings its tokenizer
        try:
            vocab.prepare(recipe, data_files(recipe)[0])
        except (OSError, ValueError) as exc:
            raise UserError(f"data.paths: {exc}") from None
