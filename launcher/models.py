"""Built-in models by name, and the one door for a user's own (`model.target`).

A model here is an nn.Module whose forward(**batch) returns the loss (a
tensor, or an output object with a `.loss`). Built-in transformers are made
from a config, never downloaded, with PyTorch SDPA attention.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from launcher.recipe import Model
from launcher.shapes import Shape


class ModelError(Exception):
    """A user's model factory could not be imported or called: reported as one clear line."""


def build(model: Model, shape: Shape | None) -> nn.Module:
    """The recipe's model: a user's factory (model.target), or a built-in one of the plan's `shape`."""
    if model.target is not None:
        return _from_target(model.target, dict(model.kwargs))
    assert shape is not None, "the plan derives a shape for every built-in model"
    built = BUILDERS[shape.family](shape, model.dropout)
    return built if shape.family == "tiny-mlp" else LMLoss(built, causal=shape.family == "gpt2-lm")


class LMLoss(nn.Module):
    """A transformers LM whose loss is taken from logits upcast to fp32.

    transformers computes the cross-entropy in the logits' dtype; under
    DeepSpeed's bf16 that rounds the loss to about 1/32 near 6 and puts the
    softmax's gradient in bf16 too. Upcasting costs one fp32 copy of the
    logits and keeps the loss, and what is logged, accurate.
    """

    def __init__(self, lm: nn.Module, causal: bool) -> None:
        super().__init__()
        self.lm = lm
        self.causal = causal
        # FSDP's transformer-based wrapping (accelerate) looks for the block classes here.
        self._no_split_modules = getattr(lm, "_no_split_modules", None)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        logits = self.lm(input_ids=input_ids, **kwargs).logits
        if self.causal:  # predict token t+1 from tokens up to t
            logits, labels = logits[:, :-1], labels[:, 1:]
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100
        )


def _bert(shape: Shape, dropout: float) -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        attn_implementation="sdpa",  # type: ignore[call-arg]  # a PretrainedConfig keyword
    )
    return BertForMaskedLM(config)


def _gpt2(shape: Shape, dropout: float) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=shape.vocab_size,
        n_embd=shape.hidden_size,
        n_layer=shape.num_layers,
        n_head=shape.num_heads,
        n_inner=shape.intermediate_size,
        n_positions=shape.max_position_embeddings,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation="sdpa",  # type: ignore[call-arg]  # a PretrainedConfig keyword
    )
    return GPT2LMHeadModel(config)


class TinyMLP(nn.Module):
    """Embedding, two-layer MLP and a vocabulary head: the smallest masked-token model, for tests."""

    def __init__(self, shape: Shape, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(shape.hidden_size, shape.intermediate_size),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(shape.intermediate_size, shape.hidden_size),
        )
        self.head = nn.Linear(shape.hidden_size, shape.vocab_size)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **_: Any) -> torch.Tensor:
        h = self.embed(input_ids)
        logits = self.head(h + self.mlp(h))
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


BUILDERS = {"bert-mlm": _bert, "gpt2-lm": _gpt2, "tiny-mlp": TinyMLP}


def _from_target(target: str, kwargs: dict[str, Any]) -> nn.Module:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"model.target: cannot import {module_name!r} ({exc})") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ModelError(f"model.target: {module_name!r} has no attribute {attr!r}")
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise ModelError(f"model.target: {target}(**model.kwargs) failed: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model.target: {target} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def loss_of(output: Any) -> torch.Tensor:
    """The loss from a model's forward: a tensor, or an object/dict with `loss`."""
    if isinstance(output, torch.Tensor):
        return output
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if loss is None:
        raise ModelError(
            "the model's forward(**batch) returned no loss (return a tensor or an object with .loss)"
        )
    return loss
