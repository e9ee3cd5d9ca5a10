"""FSDP2 for the Accelerate backend's zero.stage 1-3: torch's `fully_shard`, applied by mplaunch.

mplaunch shards the model itself, torchtitan style, on every device (CPU over gloo as well as
GPUs over NCCL), never through Accelerate's FSDP plugin: Accelerate 1.16 turns an FSDP plugin into
DDP on CPU, so a plugin path could never run in CI, while this one wrapping runs the same code on
CPU and GPU. The Accelerator still sets up the process and its device; the sharded model is not
`acc.prepare`d (that would wrap it in DDP as well).

What the plan's `fsdp2` settings say (launcher.plan.backend_config.fsdp2_settings) is applied here:

* units: `fully_shard` on each transformer block (a built-in family's `block` class; else each
  module whose class is in the model's `_no_split_modules`; else each transformers
  GradientCheckpointingLayer), then on the root, which holds the rest (embeddings, head). A block
  holding a weight tied to a module outside it (an LM head tied to the embeddings) is left to the
  root: one parameter lives in one unit. A model without blocks is sharded at the root alone.
* `reshard_after_forward` (stage 3 true; stages 1 and 2 false). Parameters, gradients and AdamW
  state are sharded on dim 0 (`Shard(0)`, as torch.chunk splits rows) in fp32: the shards are the
  master weights. In 16 bits, MixedPrecisionPolicy(param_dtype, reduce_dtype=fp32) gathers the
  parameters in 16 bits and reduce-scatters the gradients in fp32; `offload_params` is
  CPUOffloadPolicy (GPUs).
* Autocast stays on in 16 bits (launcher.worker.precision), as at stage 0: the matmuls get the
  16-bit weights the policy gathered (autocast's cast is then a no-op), and the ops autocast keeps
  in fp32 (softmax, norms, losses) stay fp32, so every stage of this backend computes each op in the
  same dtype. fp16 loss scaling goes through torch's ShardedGradScaler, which unscales each rank's
  gradient shards and all-reduces the overflow flag, so every rank skips the same steps.
* Gradient accumulation: reduce-scatter only on a step's last micro-batch
  (`set_requires_gradient_sync`); the earlier ones accumulate whole fp32 gradients locally. The
  reduce-scatter averages over ranks, as DDP's all-reduce does (what TokenWeights assumes).

Checkpoints go through torch.distributed.checkpoint (DCP) into `DCP_DIR`: each rank writes its
shards' file, rank 0 the metadata; DCP reshards on load, so a checkpoint loads at any world size.
"""

from __future__ import annotations

import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from launcher.errors import UserError
from launcher.recipe.families import FAMILIES
from launcher.recipe.sections import Model
from launcher.worker import xray
from launcher.worker.backends import tensor_bytes
from launcher.worker.precision import DTYPES

DCP_DIR = "dcp"  # the DCP checkpoint inside a checkpoint directory
_MODEL = "model"  # its top-level keys: the model's and the optimizer's state dicts
_OPTIM = "optim"


def apply(model: nn.Module, settings: dict[str, Any], recipe_model: Model, device: torch.device) -> str:
    """Shard `model` in place as the plan's `fsdp2` settings say; the line saying what was done.

    Call on every rank, with the process group up, before the optimizer is built (fully_shard
    replaces each parameter with a DTensor parameter).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    kwargs = {"mesh": mesh, **options(settings)}
    model.to(device)
    units, left = units_of(model, _family_block(recipe_model))
    classes = [type(u).__name__ for u in units]  # fully_shard renames them (FSDPBertLayer)
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return describe(classes, left, settings)


def options(settings: dict[str, Any]) -> dict[str, Any]:
    """`fully_shard`'s keyword arguments, but the mesh, from the plan's `fsdp2` settings."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    out: dict[str, Any] = {"reshard_after_forward": settings["reshard_after_forward"]}
    if settings["param_dtype"] != "fp32":  # fp32: no policy, everything stays fp32
        out["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=DTYPES[settings["param_dtype"]], reduce_dtype=DTYPES[settings["reduce_dtype"]]
        )
    if settings["offload_params"]:
        out["offload_policy"] = CPUOffloadPolicy()
    return out


def _family_block(recipe_model: Model) -> str | None:
    """The block class a built-in family names ("" without blocks); None for model.target and model.hf."""
    if recipe_model.target is not None or recipe_model.hf is not None or recipe_model.name is None:
        return None
    return FAMILIES[recipe_model.name].block


def units_of(model: nn.Module, block: str | None) -> tuple[list[nn.Module], list[str]]:
    """The modules to shard as units, each before any unit holding it, and the names of the
    candidates left to the root because they hold a weight tied to a module outside them.

    Args:
        block: the class name a built-in family names ("" for none); None: the model's own
            `_no_split_modules`, else transformers' GradientCheckpointingLayer.
    """
    if block is None:
        wanted = set(getattr(model, "_no_split_modules", None) or ())
        match = (lambda m: type(m).__name__ in wanted) if wanted else _checkpointing_layer
    else:
        match = lambda m: bool(block) and type(m).__name__ == block  # noqa: E731
    candidates = [(n, m) for n, m in model.named_modules() if n and match(m)]
    names_of: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of[id(p)].append(name)
    units, left = [], []
    for name, module in reversed(candidates):  # named_modules lists parents first
        inside = name + "."
        if any(not n.startswith(inside) for p in module.parameters() for n in names_of[id(p)]):
            left.append(name)
        else:
            units.append(module)
    return units, sorted(left)


def _checkpointing_layer(module: nn.Module) -> bool:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return False
    return isinstance(module, GradientCheckpointingLayer)


def describe(classes: list[str], left: list[str], settings: dict[str, Any]) -> str:
    """'fsdp2: fully_shard on 2 x BertLayer + root (...)', the worker's record of what it applied.

    Args:
        classes: the class of each unit below the root.
        left: the candidates left to the root (`units_of`).
    """
    counts = Counter(classes)
    parts = [f"{n} x {name}" for name, n in sorted(counts.items())]
    what = " + ".join([*parts, "root"]) if parts else "the root alone"
    policy = ", ".join(f"{k}={settings[k]}" for k in ("reshard_after_forward", "param_dtype", "reduce_dtype"))
    line = f"fsdp2: fully_shard on {what} ({policy}, offload_params={settings['offload_params']})"
    if left:
        line += f"; left to the root, as they share a weight with modules outside them: {', '.join(left)}"
    return line


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (its shard); any other tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_start(p: torch.Tensor) -> int:
    """Where this rank's shard of a Shard(0) DTensor starts in the flattened tensor.

    FSDP2 splits dim 0 as torch.chunk does: every rank but the last ones gets ceil(rows / world)
    rows, the rest fewer or none.
    """
    assert isinstance(p, DTensor), "an FSDP2 parameter"
    assert p.placements == (Shard(0),), "FSDP2 shards every parameter on dim 0"
    if p.ndim == 0:
        return 0
    rows, world = p.shape[0], p.device_mesh.size()
    first = min(p.device_mesh.get_local_rank() * -(-rows // world), rows)
    return first * (p.numel() // rows if rows else 0)


def shards(model: nn.Module) -> list[xray.Shard]:
    """This rank's parts of the reduced gradients and of the fp32 master weights (the parameters'
    shards), each with where it starts in its parameter (so the x-ray's sketch sums over ranks)."""
    out = []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        grad, master = local(p.grad).reshape(-1), local(p.detach()).reshape(-1)
        out.append(xray.Shard(xray.layer_of(name), grad, master, shard_start(p)))
    return out


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The gradients' global 2-norm (a plain tensor, the same on every rank), after scaling them
    down to `max_norm` if above it (inf: measure only)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(norm, DTensor):  # the shards' partial norms, reduced over the ranks
        norm = norm.full_tensor()
    if max_norm != float("inf"):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, grad_bytes: int | None) -> dict[str, int]:
    """Bytes this rank holds: its fp32 parameter shards (the masters: `master` 0), the gradient
    shards as measured in a step (-1 before), and its shards of AdamW's state."""
    return {
        "params": tensor_bytes([local(p.detach()) for p in model.parameters()]),
        "grads": grad_bytes if grad_bytes is not None else -1,
        "master": 0,
        "optimizer": tensor_bytes([{k: local(v) for k, v in s.items()} for s in optimizer.state.values()]),
    }


def grad_bytes(model: nn.Module) -> int:
    """Bytes of this rank's gradient shards."""
    return tensor_bytes([local(p.grad) for p in model.parameters() if p.grad is not None])


def save(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Every rank writes its shards of the parameters and AdamW state into `directory`/DCP_DIR."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({_MODEL: model_state, _OPTIM: optim_state}, checkpoint_id=directory / DCP_DIR)


def load(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path, saved_world: int) -> str | None:
    """Load what `save` wrote, resharded by DCP to this world size; a line saying so if it changed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    # DCP loads into these dicts' tensors in place (each rank reads the parts of its shards).
    dcp.load({_MODEL: model_state, _OPTIM: optim_state}, checkpoint_id=directory / DCP_DIR)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    world = torch.distributed.get_world_size()
    if saved_world == world:
        return None
    return f"FSDP2 shards resharded by torch.distributed.checkpoint from {saved_world} ranks to {world}"


def consolidate_fp32(directory: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights (and buffers) of the DCP checkpoint `save` wrote into `directory`,
    under the trained module's names; one process, no process group, the optimizer state unread.

    Raises:
        UserError: `directory` holds no DCP checkpoint.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = directory / DCP_DIR
    if not (path / ".metadata").is_file():
        raise UserError(
            f"{directory}: no FSDP2 checkpoint ({DCP_DIR}/.metadata from torch.distributed.checkpoint)"
        )
    reader = dcp.FileSystemReader(path)
    prefix = _MODEL + "."
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)
    return {key.removeprefix(prefix): t for key, t in state.items()}
