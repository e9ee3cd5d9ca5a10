"""LoRA adapters through peft (`model.lora`): apply them, say what trains, merge them for export.

Worker side (torch, peft, transformers). `apply` wraps the model the builder made:

    a transformers PreTrainedModel    get_peft_model(model)
    a loss wrapper with one as `.lm`  (launcher.worker.models.LMLoss, model_setup.ClassifierLoss) its `.lm`
                                      becomes the PeftModel, the wrapper stays
    any other nn.Module               get_peft_model(module) as well (peft takes any module once the
                                      target modules are named): TinyMLP, a model.target factory's

Targets, when `model.lora.target_modules` is empty: peft's own default for a transformers model
whose model_type peft knows (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING: bert query, value;
gpt2 c_attn; llama q_proj, v_proj), else every linear layer but an output head over the vocabulary.
Named targets are suffixes of module names, as peft matches them (`query` matches
`...attention.self.query`); each must match at least one linear layer (nn.Linear, or
transformers' Conv1D in GPT-2) and nothing else, or `apply` raises ModelError. Only the adapters
train (bias "none"); a sequence classifier's head, which starts untrained, trains in full (peft's
SEQ_CLS task: `modules_to_save`). The mirror of these defaults for the memory planner, without torch,
is launcher.plan.estimate.state_bytes.lora_params; tests/e2e/test_lora.py checks that the two count the same.

The backends build the optimizer from `requires_grad` parameters only (launcher.worker.backends.param_groups),
so frozen base weights get no gradient, fp32 master or Adam state:

* DeepSpeed ZeRO 0-2: the engine casts the whole module to the compute dtype, frozen weights
  included; the ZeRO optimizers flatten and partition only the groups they are given.
* Accelerate DDP (zero.stage 0): DDP registers hooks and buckets for parameters that require grad
  only. Accelerate FSDP2 (stages 1-3, launcher.worker.backends.fsdp2): a block's frozen base
  weights and its trainable adapters share one `fully_shard` unit; FSDP2 keeps each parameter a
  DTensor of its own, gathers the frozen ones for compute and reduce-scatters gradients only for
  those that have one, so frozen weights hold no gradient (tests/worker/test_fsdp2.py trains it).
* DeepSpeed ZeRO-3: works. DeepSpeed partitions every parameter, frozen ones too, and its stage-3
  optimizer drops `requires_grad=False` ones from its groups (stage3.py
  `_get_trainable_parameter_groups`); peft documents LoRA as compatible with ZeRO-1/2/3
  (docs/source/accelerate/deepspeed.md). Checkpoints: DeepSpeed >= 0.9.2 (PR #3205, after issue
  #3090, where a ZeRO-3 resume lost frozen weights) saves the frozen partitions in the model-states
  file (`frozen_param_fragments`) from stage 2 on, restores them on load, and zero_to_fp32 merges
  them. Caveats that do not touch us: adapters added *after* deepspeed.initialize (or after
  zero.Init) under ZeRO-3 are not partitioned, and peft's merge_and_unload on partitioned (empty)
  ZeRO-3 tensors fails (peft issue #297) -- `apply` runs before the engine is built and `merge` runs
  on the consolidated CPU weights `mplaunch export` loads. DeepCompile (not used here) failed on
  frozen ZeRO-3 parameters until DeepSpeed PR #8214.

torch.compile: works on the PeftModel (not needed for, nor tested by, these functions).
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher.recipe.schema import Lora
from launcher.worker.models import ModelError

_SHOWN_LAYERS = 8  # layer names a ModelError lists


@dataclass(frozen=True)
class Trainable:
    """What `apply` did: the adapters' rank and targets, and how many parameters train."""

    rank: int
    num_trainable: int
    num_params: int  # every parameter of the adapted model, adapters included
    target_modules: tuple[str, ...]  # as given to peft: name suffixes (empty: rank 0, nothing applied)
    full_modules: tuple[str, ...] = ()  # modules that train in full beside the adapters (a classifier head)


def apply(module: nn.Module, lora: Lora) -> tuple[nn.Module, Trainable]:
    """Add LoRA adapters to `module` (model.lora) and freeze everything else.

    Args:
        module: the built model: a transformers model, a wrapper holding one as `.lm`, or any nn.Module.
        lora: the recipe's model.lora section; rank 0 returns `module` unchanged.

    Returns:
        The model to train (the same wrapper, or a peft PeftModel), and what trains.

    Raises:
        ModelError: a target module matches no linear layer, or matches a module that is not one.
    """
    if not lora.rank:
        count = sum(p.numel() for p in module.parameters())
        return module, Trainable(0, count, count, ())
    from peft import LoraConfig, get_peft_model

    hf = _hf_model(module)
    target = hf if hf is not None else module
    task = "SEQ_CLS" if hf is not None and type(hf).__name__.endswith("ForSequenceClassification") else None
    names = _targets(target, list(lora.target_modules), classifier=task is not None)
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # annotated int; peft scales by alpha / r
        lora_dropout=lora.dropout,
        target_modules=list(names),
        bias="none",
        task_type=task,
        # GPT-2's Conv1D stores its weight as (in, out): say so, or peft warns (on every rank) and sets it.
        fan_in_fan_out=any(_is_conv1d(m) for _, m in _linear_layers(target)),
    )
    with warnings.catch_warnings():
        # transformers 5 deprecates the attribute peft reads; every rank would print it.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        adapted = get_peft_model(target, config)
    if hf is not None and hf is not module:
        module.lm = adapted
        for name, p in module.named_parameters():
            if not name.startswith("lm."):  # a wrapper's own weights stay as they are: frozen
                p.requires_grad_(False)
        result: nn.Module = module
    else:
        result = adapted
    saved = getattr(adapted, "modules_to_save", None) or ()  # peft lists "classifier" and "score" for SEQ_CLS
    full = tuple(n for n in sorted(saved) if any(_matches(name, n) for name, _ in target.named_modules()))
    trainable = sum(p.numel() for p in result.parameters() if p.requires_grad)
    total = sum(p.numel() for p in result.parameters())
    return result, Trainable(lora.rank, trainable, total, names, full)


def describe(trainable: Trainable) -> str:
    """One line: rank, targets and the share that trains, e.g.
    "LoRA rank 8 on query, value: 294,912 of 124,734,720 parameters train (0.24 %)"."""
    t = trainable
    share = 100.0 * t.num_trainable / t.num_params if t.num_params else 0.0
    what = f"{t.num_trainable:,} of {t.num_params:,} parameters train ({share:.2f} %)"
    if not t.rank:
        return f"LoRA off: {what}"
    full = f" ({', '.join(t.full_modules)} in full)" if t.full_modules else ""
    return f"LoRA rank {t.rank} on {', '.join(t.target_modules)}{full}: {what}"


def peft_model(module: nn.Module) -> Any:
    """The PeftModel `apply` made: `module` itself, or its `.lm`; None if it has no adapters."""
    from peft import PeftModel

    for candidate in (module, getattr(module, "lm", None)):
        if isinstance(candidate, PeftModel):
            return candidate
    return None


def merge(module: nn.Module) -> nn.Module:
    """The plain model with every adapter merged into its base weights (W + alpha/r * B A), in place.

    A wrapper keeps its place, with its `.lm` the merged transformers model again; a PeftModel gives
    back the module it wrapped. The result has the parameter names the model has without LoRA, so
    it saves and loads as the plain architecture (save_pretrained, model.safetensors). A module
    without adapters comes back as it is.
    """
    adapted = peft_model(module)
    if adapted is None:
        return module
    plain: nn.Module = adapted.merge_and_unload()
    if adapted is module:
        return plain
    module.lm = plain
    return module


def merged_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of `merge(module)`, leaving `module` (still training, maybe) as it is: it merges a copy."""
    return merge(copy.deepcopy(module)).state_dict()


def adapter_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights only, named as peft saves them (adapter_model.safetensors)."""
    from peft import get_peft_model_state_dict

    adapted = peft_model(module)
    if adapted is None:
        raise ValueError("the model has no LoRA adapters")
    return dict(get_peft_model_state_dict(adapted))


def save_adapter(
    module: nn.Module, directory: Path, base: str | None = None, dtype: torch.dtype | None = None
) -> list[str]:
    """Write a peft adapter directory (adapter_config.json, adapter_model.safetensors); the files written.

    `PeftModel.from_pretrained(base_model, directory)` loads it onto the base model; with `base`
    (the base model's directory or hub id) in adapter_config.json, peft's AutoPeftModel… classes
    load both from `directory` alone. `dtype`: the adapters' weights are cast to it first.
    """
    adapted = peft_model(module)
    if adapted is None:
        raise ValueError("the model has no LoRA adapters")
    if base is not None:
        for config in adapted.peft_config.values():
            config.base_model_name_or_path = base
    if dtype is not None:
        for name, param in adapted.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(dtype)
    adapted.save_pretrained(str(directory), safe_serialization=True)
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------- targets


def _hf_model(module: nn.Module) -> nn.Module | None:
    """The transformers model: `module` itself or its `.lm`, else None (a plain nn.Module)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a train dependency
        return None
    for candidate in (module, getattr(module, "lm", None)):
        if isinstance(candidate, PreTrainedModel):
            return candidate
    return None


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers")


def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n and (isinstance(m, nn.Linear) or _is_conv1d(m))]


def _within(name: str, module: str) -> bool:
    """`name` is the module called `module` (a last name part) or inside it."""
    return module in name.split(".")


def _matches(name: str, target: str) -> bool:
    # peft's rule for a list of names (peft.tuners.tuners_utils.check_target_module_exists).
    return name == target or name.endswith("." + target)


def _targets(model: nn.Module, given: list[str], classifier: bool) -> tuple[str, ...]:
    """The target names for peft: the recipe's (checked), peft's default for the model_type, or every
    linear layer but the vocabulary head (and a classifier's head, which trains in full)."""
    layers = _linear_layers(model)
    if given:
        _check(model, given, layers)
        return tuple(given)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULTS:
        return tuple(DEFAULTS[model_type])
    heads = ("classifier", "score") if classifier else ()  # peft's SEQ_CLS modules_to_save
    chosen = [n for n, m in layers if not _is_head(model, m) and not any(_within(n, h) for h in heads)]
    if not chosen:
        raise ModelError(f"model.lora: {type(model).__name__} has no linear layer to adapt")
    return _shortest_names(chosen, [n for n, _ in layers])


def _is_head(model: nn.Module, layer: nn.Module) -> bool:
    """An output layer over the vocabulary: the model's output embeddings, or as wide as an embedding table."""
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output) and get_output() is layer:
        return True
    vocab = {e.num_embeddings for e in model.modules() if isinstance(e, nn.Embedding)}
    out = layer.out_features if isinstance(layer, nn.Linear) else int(getattr(layer, "nf", 0))  # Conv1D: nf
    return out in vocab


def _shortest_names(chosen: list[str], every: list[str]) -> tuple[str, ...]:
    """The shortest name suffixes (not bare numbers) that select exactly `chosen` among `every`."""
    want = set(chosen)
    for depth in range(1, max(n.count(".") for n in chosen) + 2):
        suffixes = list(dict.fromkeys(".".join(n.split(".")[-depth:]) for n in chosen))
        if any(re.fullmatch(r"\d+", s.split(".")[0]) for s in suffixes):
            continue
        if {n for n in every if any(_matches(n, s) for s in suffixes)} == want:
            return tuple(suffixes)
    return tuple(chosen)


def _check(model: nn.Module, given: list[str], layers: list[tuple[str, nn.Module]]) -> None:
    linear = {n for n, _ in layers}
    for target in given:
        hits = [n for n, _ in model.named_modules() if n and _matches(n, target)]
        if not any(n in linear for n in hits):
            raise ModelError(
                f"model.lora.target_modules: {target!r} matches no linear layer of {type(model).__name__}; "
                f"its linear layers are named {_examples([n for n, _ in layers])}"
            )
        other = [n for n in hits if n not in linear]
        if other:
            raise ModelError(
                f"model.lora.target_modules: {target!r} also matches {other[0]}, which is not a linear "
                f"layer; name the linear layers inside it (linear layers: {_examples([n for n, _ in layers])})"
            )


def _examples(names: list[str]) -> str:
    """The distinct last parts of layer names, the way target_modules names them, a few of them."""
    parts = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    if any(p.isdigit() for p in parts):  # nn.Sequential children: their parent's name says more
        parts = list(dict.fromkeys(".".join(n.split(".")[-2:]) for n in names))
    if not parts:
        return "(none)"
    more = len(parts) - _SHOWN_LAYERS
    return ", ".join(parts[:_SHOWN_LAYERS]) + (f" and {more} more" if more > 0 else "")
