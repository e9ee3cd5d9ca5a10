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
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.errors import UserError
from launcher.plan import backend_config, data_check, hf_dir, precision, targets, vocab
from launcher.plan.batch import Batch, resolve_batch
from launcher.plan.hardware import Hardware
from launcher.plan.precision import PrecisionPolicy
from launcher.recipe import tasks
from launcher.recipe.rules import BUILT_IN_MODEL_KEYS, DATASET_KEYS
from launcher.recipe.schema import Recipe, explicitly_set, to_dict
from launcher.recipe.shapes import Shape, shape_of
from launcher.rundir.layout import PLAN_FILE, RunDir


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
        """How the backend shards the model, as it will run: ZeRO stage, FSDP strategy or DDP."""
        stage = self.recipe.zero.stage
        if self.recipe.backend == "deepspeed":
            return f"ZeRO stage {stage}"
        fsdp = self.backend_config.get("fsdp_plugin")
        if fsdp:
            return f"FSDP {fsdp['sharding_strategy']} (zero.stage {stage})"
        return "DDP" + (f" (zero.stage {stage} is not applied on {self.device})" if stage else "")

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
        body["command"] = tuple(body["command"])
        body["data_paths"] = tuple(body["data_paths"])
        body["warnings"] = tuple(body["warnings"])
        body["problems"] = tuple(body["problems"])
        return cls(recipe=recipe, precision=policy, **body)

    def command_line(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return f"{env} {shlex.join(self.command)}".strip()

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
        auto = hf_dir.AUTO_CLASSES[tasks.resolve(self.recipe)]
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
            ("precision", _precision_row(self.precision)),
            (
                "processes",
                f"{self.nnodes} x {self.nproc_per_node} = world_size {self.world_size}, {self.dist_backend}",
            ),
            ("batch", self.batch.equation(self.nnodes, self.nproc_per_node)),
            ("backend", f"{self.recipe.backend}, {self.sharding}"),
            ("task", f"{tasks.resolve(self.recipe)} (data.task {self.recipe.data.task})"),
            *([("loss", _LOSS_ROWS[self.recipe.train.loss])] if _is_language_model(self.recipe) else []),
            ("vocab", f"{self.vocab_size} ({self.vocab_source})"),
            *([("model", self._target_row())] if self.recipe.model.target else []),
            *([("model", self._hf_row())] if self.hf_dir else []),
            *([("data", self._dataset_row())] if self.recipe.data.target else []),
            *(
                [("init from", f"{self.init_from} (fresh optimizer, schedule and step 0)")]
                if self.init_from
                else []
            ),
            ("run dir", self.run_dir),
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
        UserError: one line per problem.
    """
    # Problems with the recipe itself always stop here; problems with running it
    # on *this* machine are kept in the plan when the caller only wants to look.
    problems: list[str] = []
    machine: list[str] = []
    import_dir = None
    target = recipe.model.target
    if target is not None or recipe.model.hf is not None:
        recipe = _only_target_keys(recipe)
    if recipe.data.target is not None:
        recipe = _only_dataset_keys(recipe)
    if target is not None or recipe.data.target is not None:
        import_dir = targets.import_dir(recipe.source)
    for key, name in (("model.target", target), ("data.target", recipe.data.target)):
        missing = targets.find(name, import_dir, key) if name is not None else None
        machine += [missing] if missing else []
    hf = None
    if recipe.model.hf is not None:
        hf, found = hf_dir.read(recipe.model.hf, recipe.source, dict(recipe.model.config))
        problems += found
        if hf is not None:
            problems += hf_dir.problems(
                hf, recipe.model.weights, dict(recipe.model.config), recipe.data.tokenizer is not None
            )
            if hf.max_positions is not None and recipe.data.seq_len > hf.max_positions:
                problems.append(
                    f"data.seq_len: {recipe.data.seq_len} is longer than {hf.source}'s {hf.max_positions} positions"
                )
    device, device_reason = _device(recipe, hardware, machine)
    nproc = _nproc(recipe, hardware, device, machine)
    nnodes = recipe.launch.nnodes
    if nnodes > 1 and not nnodes_allowed:
        problems.append(f"launch.nnodes: {nnodes} nodes need --slurm; a local run uses one node")
    batch = resolve_batch(recipe, nnodes * nproc, problems)
    policy = precision.resolve(recipe, device, hardware)
    machine += precision.problems(policy, recipe.backend, device, hardware)
    if problems or (machine and not keep_machine_problems):
        raise UserError(problems + machine)
    assert batch is not None
    assert batch.global_batch_size == batch.micro_batch_size * batch.grad_accum * batch.world_size

    if recipe.backend == "deepspeed":
        cfg = backend_config.deepspeed_config(
            recipe, policy, device, batch.micro_batch_size, batch.grad_accum, batch.global_batch_size
        )
    else:
        cfg = backend_config.accelerate_settings(recipe, policy, device, batch.grad_accum)
    run_dir = str((Path(recipe.logging.dir) / recipe.name).resolve())
    env = _env(recipe, device, nproc, hardware)
    data_paths, tokenizer = data_files(recipe)
    if hf is not None and tokenizer is None and hf.has_tokenizer and recipe.data.kind != "synthetic":
        tokenizer = hf.source  # the model's own tokenizer
    # Like a missing data file (launcher.recipe.rules), what the files hold stops the plan here.
    found = data_check.problems(recipe, data_paths, batch.global_batch_size, tokenizer is None)
    if found:
        raise UserError(found)
    vocab_ = vocab.resolve(recipe, data_paths, tokenizer, RunDir.of(Path(run_dir)).tokenizer)
    if recipe.model.target is not None:
        vocab_ = target_vocab(recipe, vocab_)
    if hf is not None:
        vocab_, found = hf_dir.vocab_of(hf, vocab_, tokenizer)
        if found:
            raise UserError(found)
    shape = shape_of(recipe.model, vocab_.size) if recipe.model.name is not None else None
    return Plan(
        recipe=recipe,
        run_dir=run_dir,
        device=device,
        device_reason=device_reason,
        dist_backend="nccl" if device == "cuda" else "gloo",
        nnodes=nnodes,
        nproc_per_node=nproc,
        batch=batch,
        precision=policy,
        backend_config=cfg,
        env=env,
        command=torchrun_command(recipe, nproc, run_dir),
        vocab_size=vocab_.size,
        vocab_source=vocab_.source,
        shape=shape,
        data_paths=data_paths,
        tokenizer_dir=tokenizer,
        import_dir=import_dir,
        hf_dir=hf.source if hf is not None else None,
        num_params=hf.num_params if hf is not None else None,
        init_from=_relative_to_recipe(recipe, recipe.model.init_from),
        warnings=tuple(_warnings(recipe, policy, device) + _hub_warning(hf)),
        problems=tuple(machine),
    )


def _only_target_keys(recipe: Recipe) -> Recipe:
    """The recipe with the built-in model's keys at their defaults: a target ignores them.

    launcher.recipe.rules refuses those a user wrote beside the target; what is left came from an
    `extends:` base. Resetting them keeps the vocabulary from following a base's model.name or
    model.vocab_size, and RUN_DIR/recipe.yaml (every key written out) loads again on --resume.
    """
    m = recipe.model
    defaults = {
        key: (None if key == "name" else type(m).model_fields[key].default)
        for key in ("name", *BUILT_IN_MODEL_KEYS)
    }
    return recipe.model_copy(update={"model": m.model_copy(update=defaults)})


def _only_dataset_keys(recipe: Recipe) -> Recipe:
    """The recipe with the file-reading data keys at their defaults: a data.target ignores them.

    As for model.target (`_only_target_keys`): those written beside it are refused by
    launcher.recipe.rules, and what is left came from an `extends:` base's files.
    """
    d = recipe.data
    defaults = {key: type(d).model_fields[key].default for key in DATASET_KEYS}
    return recipe.model_copy(update={"data": d.model_copy(update=defaults)})


def target_vocab(recipe: Recipe, data_vocab: vocab.Vocab) -> vocab.Vocab:
    """The vocabulary of a user's model: model.kwargs.vocab_size if set, else the data's.

    Synthetic data has no tokenizer, so model.kwargs.vocab_size decides it (ids are drawn below
    it). With text data the tokenizer decides; model.kwargs.vocab_size may be larger (padded
    embeddings) but not smaller, which is refused here when the plan knows the tokenizer's size
    and by the worker (launcher.worker.data) when it only knows an upper bound.

    Raises:
        UserError: model.kwargs.vocab_size is no positive whole number, or smaller than the data's.
    """
    given = recipe.model.kwargs.get("vocab_size")
    if given is None:
        return data_vocab
    key = "model.kwargs.vocab_size"
    lowest = len(vocab.SPECIALS) + 1 if recipe.data.kind == "synthetic" else 1
    if isinstance(given, bool) or not isinstance(given, int) or given < lowest:
        raise UserError(f"{key}: expected a whole number of at least {lowest}, got {given!r}")
    if recipe.data.target is not None and recipe.data.tokenizer is None:
        return vocab.Vocab(given, f"{key}; data.target's ids must be below it")
    if recipe.data.kind == "synthetic" and recipe.data.target is None:
        return vocab.Vocab(given, f"{key}; synthetic ids are drawn below it")
    if data_vocab.exact and given < data_vocab.size:
        raise UserError(
            f"{key}: {given} is smaller than the data's vocabulary {data_vocab.size} ({data_vocab.source}); "
            f"set it to at least {data_vocab.size}, or leave it out: a factory that takes vocab_size is given "
            "the data's"
        )
    return vocab.Vocab(
        given, f"{key}; the data's is {data_vocab.size}, {data_vocab.source}", data_vocab.exact
    )


def data_files(recipe: Recipe) -> tuple[tuple[str, ...], str | None]:
    """The recipe's data files and tokenizer directory, absolute (they are relative to the recipe)."""
    base = Path(recipe.source).parent if recipe.source else Path()
    tokenizer = str((base / recipe.data.tokenizer).resolve()) if recipe.data.tokenizer else None
    return tuple(str((base / p).resolve()) for p in recipe.data.paths), tokenizer


def _hub_warning(hf: hf_dir.HfModel | None) -> list[str]:
    if hf is None or hf.local:
        return []
    return [
        f"model.hf: {hf.source} is no local directory, so it is a hub id: the workers download it "
        "(check could not read its config or tokenizer)"
    ]


def _relative_to_recipe(recipe: Recipe, path: str | None) -> str | None:
    base = Path(recipe.source).parent if recipe.source else Path()
    return str((base / path).resolve()) if path is not None else None


def prepare_vocab(recipe: Recipe) -> None:
    """Before a real launch: train the data's tokenizer (cached) so the plan knows its exact vocabulary."""
    if vocab.needs_training(recipe) and recipe.model.hf is None:  # model.hf brings its tokenizer
        try:
            vocab.prepare(recipe, data_files(recipe)[0])
        except (OSError, ValueError) as exc:
            raise UserError(f"data.paths: {exc}") from None


def _precision_row(p: PrecisionPolicy) -> str:
    row = f"{p.dtype} compute, {p.master_dtype} master weights ({p.reason})"
    if p.loss_scale is not None:
        ls = p.loss_scale
        kind = f"dynamic from {ls.initial:g}" if ls.dynamic else f"static {ls.initial:g}"
        row += f"; loss scale {kind}"
    return row


def _device(recipe: Recipe, hardware: Hardware, problems: list[str]) -> tuple[str, str]:
    wanted = recipe.launch.device
    if wanted == "cuda" and not hardware.gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        problems.append(f"launch.device: cuda requested but no GPU is visible{why}; use launch.device=cpu")
        return "cuda", "requested"
    if wanted != "auto":
        return wanted, "set in the recipe"
    if hardware.gpus:
        return "cuda", f"auto: {len(hardware.gpus)} GPU(s) visible"
    return "cpu", "auto: no GPU visible"


def _nproc(recipe: Recipe, hardware: Hardware, device: str, problems: list[str]) -> int:
    n = recipe.launch.nproc_per_node
    if n == "auto":
        return max(1, len(hardware.gpus)) if device == "cuda" else 1
    if device == "cuda" and hardware.gpus and n > len(hardware.gpus):
        problems.append(
            f"launch.nproc_per_node: {n} processes but only {len(hardware.gpus)} GPU(s) visible; "
            "use launch.nproc_per_node=auto"
        )
    return n


def torchrun_command(
    recipe: Recipe,
    nproc: int,
    run_dir: str,
    *,
    nnodes: int = 1,
    rendezvous: Sequence[str] | None = None,
    python: str = sys.executable,
    plan_path: str | None = None,
    extra: Sequence[str] = (),
) -> tuple[str, ...]:
    """The torchrun invocation of the worker: the local launch's, and each Slurm node's.

    Args:
        recipe: for launch.max_restarts and launch.master_port.
        nproc: processes on each node.
        run_dir: the run directory; the worker reads its plan.json.
        nnodes: nodes of the job (1 for a local launch).
        rendezvous: torchrun's rendezvous flags; default the local ones (--standalone, or c10d
            on localhost:launch.master_port).
        python: the interpreter (a Slurm node's may be a shell reference such as "$MPLAUNCH_PYTHON").
        plan_path: the plan file as the worker sees it; default RUN_DIR/plan.json.
        extra: further torchrun flags, before the worker module.
    """
    if rendezvous is None:
        port = recipe.launch.master_port
        rendezvous = (
            ["--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}"] if port else ["--standalone"]
        )
    return (
        python,
        "-m",
        "torch.distributed.run",
        *rendezvous,
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={recipe.launch.max_restarts}",
        *extra,
        "-m",
        "launcher.worker.train",
        plan_path or str(Path(run_dir) / PLAN_FILE),
    )


def _env(recipe: Recipe, device: str, nproc: int, hardware: Hardware) -> dict[str, str]:
    """mplaunch's environment for the workers: the local launch's, and the sbatch script's below slurm.env."""
    env = {
        "PYTHONUNBUFFERED": "1",
        # torchrun would set 1 thread per worker; on CPU that starves the run.
        "OMP_NUM_THREADS": str(max(1, hardware.cpu_count // nproc)),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if recipe.backend == "deepspeed" and device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    if device == "cuda":
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
        env["NCCL_DEBUG"] = "WARN"
    if recipe.launch.max_restarts:
        # torchrun's shared rendezvous store keeps the previous attempt's keys, and restarted
        # workers then connect to the dead workers' addresses when they create process groups
        # beyond the default one (DeepSpeed does). A fresh store per attempt avoids that.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return env


# train.loss as the dry run says it (launcher.worker.models.LMLoss does it).
_LOSS_ROWS = {
    "labelled": "train.loss labelled: the output head and an fp32 cross-entropy on labelled positions only",
    "full": "train.loss full: the output head on every position, an fp32 cross-entropy",
    "model": "train.loss model: the model's own loss, in the compute dtype",
}


def _is_language_model(recipe: Recipe) -> bool:
    """The model is wrapped in launcher.worker.models.LMLoss: a built-in LM, or model.hf with an LM task."""
    if recipe.model.hf is not None:
        return tasks.resolve(recipe) != tasks.SEQUENCE_CLASSIFICATION
    return recipe.model.target is None and recipe.model.name not in (None, "tiny-mlp")


def _warnings(recipe: Recipe, policy: PrecisionPolicy, device: str) -> list[str]:
    """Settings that would silently have no effect."""
    written = explicitly_set(recipe)
    out = []
    scale_keys = sorted(k for k in written if k.startswith("precision.loss_scale."))
    if scale_keys and policy.dtype != "fp16":
        out.append(f"{scale_keys[0]}: has no effect with {policy.dtype} (only fp16 scales the loss)")
    dynamic_only = [
        k
        for k in scale_keys
        if k.rsplit(".", 1)[1] in ("window", "hysteresis", "consecutive_hysteresis", "min")
    ]
    if dynamic_only and policy.loss_scale is not None and not policy.loss_scale.dynamic:
        out.append(
            f"{dynamic_only[0]}: has no effect with a static loss scale (precision.loss_scale.dynamic=false)"
        )
    if "precision.allow_tf32" in written and (policy.dtype != "fp32" or device == "cpu"):
        out.append("precision.allow_tf32: only affects fp32 runs on Ampere or newer GPUs")
    z = recipe.zero
    if device == "cpu" and (z.offload_optimizer or z.offload_params):
        key = "zero.offload_optimizer" if z.offload_optimizer else "zero.offload_params"
        out.append(f"{key}: the run is on the CPU already; offloading gains nothing")
    if recipe.backend == "accelerate" and z.stage > 0:
        if device == "cpu":
            out.append(
                f"zero.stage: accelerate runs plain DDP on CPU; stage {z.stage} sharding is not applied"
            )
        elif z.stage == 1:
            out.append("zero.stage: FSDP has no stage-1 mode; stage 1 runs as SHARD_GRAD_OP (ZeRO-2)")
    t = recipe.train
    if "train.loss" in written and not _is_language_model(recipe):
        out.append("train.loss: has no effect: the model is not a language model mplaunch takes the loss of")
    if recipe.scheduler.warmup_steps > t.max_steps:
        out.append(
            f"scheduler.warmup_steps: {recipe.scheduler.warmup_steps} is more than train.max_steps {t.max_steps};"
            " the learning rate never reaches optimizer.lr"
        )
    if t.eval_every > t.max_steps:
        out.append(
            f"train.eval_every: {t.eval_every} is beyond train.max_steps {t.max_steps}; no evaluation will run"
        )
    if recipe.checkpoint.every_steps > t.max_steps:
        out.append("checkpoint.every_steps: beyond train.max_steps; only the final checkpoint is written")
    return out
