"""Recipe + Hardware -> a frozen Plan: every number and decision a run depends on.

The dry run prints the plan, the launcher executes it, the workers read it
back from `RUN_DIR/plan.json`: one set of values everywhere.
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

from launcher import backend_config, precision, vocab
from launcher.batch import Batch, resolve_batch
from launcher.errors import UserError
from launcher.hardware import Hardware
from launcher.precision import PrecisionPolicy
from launcher.recipe import Recipe, explicitly_set, to_dict
from launcher.rundir import PLAN_FILE, RunDir
from launcher.shapes import Shape, shape_of


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
    warnings: tuple[str, ...] = field(default=())
    problems: tuple[str, ...] = field(default=())

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

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

    def describe(self, memory_section: str | None = None) -> str:
        """The dry run: the resolved recipe, batch equation, backend config, environment and command.

        The backend section is the very dict the engine is built from (plan.json holds it too).

        Args:
            memory_section: the memory planner's lines for this plan (launcher.memory.describe),
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
            ("backend", f"{self.recipe.backend}, ZeRO stage {self.recipe.zero.stage}"),
            ("vocab", f"{self.vocab_size} ({self.vocab_source})"),
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
    vocab_ = vocab.resolve(recipe, data_paths, tokenizer, RunDir.of(Path(run_dir)).tokenizer)
    shape = shape_of(recipe.model, vocab_.size) if recipe.model.target is None else None
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
        warnings=tuple(_warnings(recipe, policy, device)),
        problems=tuple(machine),
    )


def data_files(recipe: Recipe) -> tuple[tuple[str, ...], str | None]:
    """The recipe's data files and tokenizer directory, absolute (they are relative to the recipe)."""
    base = Path(recipe.source).parent if recipe.source else Path()
    tokenizer = str((base / recipe.data.tokenizer).resolve()) if recipe.data.tokenizer else None
    return tuple(str((base / p).resolve()) for p in recipe.data.paths), tokenizer


def prepare_vocab(recipe: Recipe) -> None:
    """Before a real launch: train the data's tokenizer (cached) so the plan knows its exact vocabulary."""
    if vocab.needs_training(recipe):
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
        "launcher.train",
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
