"""The model a run trains, assembled: built (a built-in, model.target or model.hf), its starting
weights (model.init_from), fp8 layers (precision.dtype fp8: launcher.worker.fp8), activation
checkpointing and LoRA adapters, in that order.

model.hf is the worker side of launcher.plan.hf_dir.

Every model trains in fp32 master weights whatever its saved dtype; the backends cast
for compute (launcher.plan.precision). The loss follows the task: the LM tasks take the
cross-entropy of fp32-upcast logits (launcher.worker.models.LMLoss), sequence-classification
that of the classifier's logits upcast the same way (ClassifierLoss).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher.plan import hf_dir
from launcher.plan.resolve import Plan
from launcher.plan.vocab import TOKENIZER_FILE
from launcher.recipe import tasks
from launcher.worker.models import LMLoss, ModelError, build


def model_for(plan: Plan, load_init: bool = True, fp8: bool = True) -> tuple[nn.Module, list[str]]:
    """The run's model, and lines saying what was done to it (printed by rank 0).

    Args:
        load_init: load model.init_from's weights (export, which loads a checkpoint over them, does not).
        fp8: convert precision.dtype fp8's layers (export builds the plain model: the same state dict).
    """
    m = plan.recipe.model
    causal = plan.model.causal
    model = (
        build_hf(plan)
        if plan.hf_dir
        else build(m, plan.shape, plan.vocab_size, plan.import_dir, causal=causal)
    )
    notes = []
    if plan.init_from is not None and load_init:
        notes.append(
            f"initialised from {init_from(model, plan.init_from)}; optimizer, schedule and step start fresh"
        )
    if fp8 and plan.precision.fp8 is not None:
        from launcher.worker import fp8 as float8

        converted, kept = float8.convert(model, plan.precision.fp8, plan.device)
        notes.append(float8.describe(converted, kept, plan.precision.fp8, plan.device))
    if plan.recipe.train.activation_checkpointing:
        checkpoint_activations(model)
    if m.lora.rank:
        from launcher.worker import lora

        model, trainable = lora.apply(model, m.lora)
        notes.append(lora.describe(trainable))
    if isinstance(model, LMLoss):
        model.loss = plan.recipe.train.loss
        notes += filter(None, [model.choose_loss()])
    return model, notes


def document_positions(model: nn.Module) -> tuple[bool, str]:
    """Whether the model is given `position_ids` that restart at each packed document (README "Batches"),
    and a line saying what that means for the run.

    A transformers LM (LMLoss: the built-in gpt2-lm, model.hf) is tried on one row holding the same
    document twice (`keeps_documents_apart`): most build a block-diagonal causal mask from such
    positions (transformers' masking_utils), some (OPT, for one) ignore them. Any other model
    (model.target) is given them when its forward has a `position_ids` parameter; a forward taking
    only **kwargs is not, since it may drop them.
    """
    if isinstance(model, LMLoss):
        name = type(_unwrapped(model.lm)).__name__
        told = keeps_documents_apart(model.lm)
        why = f"{name}'s attention ignores where position_ids restart"
    else:
        name = type(_unwrapped(model)).__name__
        told = _takes_position_ids(_unwrapped(model))
        why = f"{name}.forward has no position_ids parameter"
    if told:
        return True, (
            f"packed documents kept apart: {name} gets position_ids restarting at each document "
            "(no loss on a document's first token)"
        )
    return False, (
        f"packed documents NOT kept apart: {why}, so attention crosses document boundaries "
        "(data.pack=false trains one document per row)"
    )


def keeps_documents_apart(lm: nn.Module) -> bool:
    """Whether a transformers LM's logits for a document packed after another equal its logits alone.

    The probe is one row holding one 4-token document twice, positions 0..3 twice: the second
    copy's logits equal the first's only if its attention stops at the restart. It runs in eval
    mode without grad (no dropout, no random draw) and puts the module back in its mode.
    """
    ids = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4]])
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    device = next(lm.parameters()).device
    training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            out = lm(input_ids=ids.to(device), position_ids=positions.to(device), use_cache=False)
    except TypeError:  # its forward takes no position_ids (or use_cache)
        return False
    finally:
        lm.train(training)
    logits = out.logits.float()
    return torch.allclose(logits[0, 4:], logits[0, :4], rtol=1e-4, atol=1e-4)


def _unwrapped(module: nn.Module) -> nn.Module:
    """The model inside a peft PeftModel (model.lora), else the module."""
    base = getattr(module, "get_base_model", None)
    found = base() if callable(base) else module
    return found if isinstance(found, nn.Module) else module


def _takes_position_ids(module: nn.Module) -> bool:
    import inspect

    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return "position_ids" in params and params["position_ids"].kind in keyword


def build_hf(plan: Plan) -> nn.Module:
    """model.hf as the task's Auto class, pretrained or from its config, wrapped to return the task's loss."""
    import transformers

    m, task = plan.recipe.model, plan.model.task
    assert plan.hf_dir is not None, "the plan resolves model.hf"
    auto = getattr(transformers, hf_dir.AUTO_CLASSES[task])
    overrides = dict(m.config)
    classify = task == tasks.SEQUENCE_CLASSIFICATION
    if classify:
        overrides["num_labels"] = plan.model.num_labels
    _quiet_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(plan.hf_dir, **overrides)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.hf: cannot read the config of {plan.hf_dir}: {_first_line(exc)}") from None
    if classify and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = _pad_id(plan)  # a decoder's classifier reads the last non-pad token
    model = _instantiate(auto, plan.hf_dir, config, pretrained=m.weights == "pretrained")
    if classify:
        return ClassifierLoss(model)
    return LMLoss(model, causal=plan.model.causal)


def _pad_id(plan: Plan) -> int | None:
    """The pad id of the tokenizer the rows are padded with (launcher.worker.examples pads the same way)."""
    from launcher.worker.examples import PAD_TOKENS

    if plan.tokenizer_dir is None or not (Path(plan.tokenizer_dir) / TOKENIZER_FILE).is_file():
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(plan.tokenizer_dir) / TOKENIZER_FILE))
    return next((i for i in map(tokenizer.token_to_id, PAD_TOKENS) if i is not None), 0)


def _instantiate(auto: Any, source: str, config: Any, pretrained: bool) -> nn.Module:
    for attn in ("sdpa", None):  # SDPA attention where the architecture has it
        extra = {"attn_implementation": attn} if attn else {}
        try:
            if pretrained:
                return auto.from_pretrained(source, config=config, dtype=torch.float32, **extra)
            return auto.from_config(config, dtype=torch.float32, **extra)
        except ValueError as exc:
            if attn and ("attn_implementation" in str(exc) or "sdpa" in str(exc).lower()):
                continue
            raise ModelError(f"model.hf: {auto.__name__} cannot build {source}: {_first_line(exc)}") from None
        except OSError as exc:
            raise ModelError(f"model.hf: cannot load {source}: {_first_line(exc)}") from None
    raise AssertionError("unreachable")


class ClassifierLoss(nn.Module):
    """A sequence classifier whose cross-entropy is taken from fp32-upcast logits (as LMLoss does)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.lm = model  # the name export and LoRA look for, as with LMLoss
        # The block classes FSDP2 shards as units (launcher.worker.backends.fsdp2), as with LMLoss.
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        logits = self.lm(input_ids=input_ids, **kwargs).logits
        return nn.functional.cross_entropy(logits.float(), labels)


def inner(model: nn.Module) -> nn.Module:
    """The transformers model inside a loss wrapper (LMLoss, ClassifierLoss), else the module."""
    found = getattr(model, "lm", None)
    return found if isinstance(found, nn.Module) else model


def init_from(model: nn.Module, directory: str) -> str:
    """Load model.init_from's weights into `model` (its transformers model when wrapped); say what loaded.

    Weights tied to a loaded tensor (an LM head tied to the embeddings) may be absent from the
    file; any other missing or unexpected name, or a shape that differs, is one error line.
    """
    target = inner(model)
    state = _read_weights(Path(directory))
    own = target.state_dict()
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        k = wrong[0]
        raise ModelError(
            f"model.init_from: {k} has shape {tuple(state[k].shape)} in {directory} but "
            f"{tuple(own[k].shape)} in the model: they are different models"
        )
    missing, unexpected = target.load_state_dict(state, strict=False)
    loaded = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in missing if own[k].data_ptr() not in loaded]
    if missing or unexpected:
        parts = [f"missing {', '.join(missing[:3])}"] if missing else []
        parts += [f"unexpected {', '.join(unexpected[:3])}"] if unexpected else []
        raise ModelError(f"model.init_from: {directory} does not fit the model: {'; '.join(parts)}")
    return f"{len(state)} tensors from {directory}"


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / hf_dir.SAFETENSORS_FILE).is_file():
        from safetensors.torch import load_file

        return load_file(str(directory / hf_dir.SAFETENSORS_FILE))
    index = directory / hf_dir.WEIGHT_FILES[1]  # the safetensors index
    if index.is_file():
        import json

        from safetensors.torch import load_file

        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for f in files for k, v in load_file(str(directory / f)).items()}
    state = torch.load(directory / hf_dir.TORCH_FILE, map_location="cpu", weights_only=True)
    return dict(state)


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute each layer's activations in backward (transformers' gradient checkpointing).

    Non-reentrant checkpointing: it gives correct gradients when the inputs need none (frozen
    embeddings under LoRA) and works with DeepSpeed, DDP and FSDP2 alike. Under FSDP2 the
    checkpointed call is the block's own `__call__`, FSDP2's hooks included, so the recompute in
    backward gathers the block's parameters again (stage 3 had freed them after forward).
    """
    target = inner(model)
    # transformers 5 renames it activation_checkpointing_enable; 4.x has only the old name.
    new = getattr(target, "activation_checkpointing_enable", None)
    enable = new or getattr(target, "gradient_checkpointing_enable", None)
    if enable is None or not getattr(target, "supports_gradient_checkpointing", False):
        raise ModelError(
            f"train.activation_checkpointing: {type(target).__name__} has no gradient_checkpointing_enable "
            "(a transformers model); checkpoint inside your model with torch.utils.checkpoint instead"
        )
    kwargs = {"use_reentrant": False}
    enable(
        **({"activation_checkpointing_kwargs": kwargs} if new else {"gradient_checkpointing_kwargs": kwargs})
    )


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # every rank would print the same load report
    hf_logging.disable_progress_bar()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
