"""Shapes of the built-in models, as plain numbers (no torch): shared by the
model builder, the memory planner and the FLOP counter."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from launcher.recipe.families import FAMILIES


class ModelFields(Protocol):
    """The recipe's model section, as far as a shape depends on it (launcher.recipe.sections.Model)."""

    @property
    def name(self) -> str | None: ...
    @property
    def size(self) -> str: ...
    @property
    def hidden_size(self) -> int | None: ...
    @property
    def num_layers(self) -> int | None: ...
    @property
    def num_heads(self) -> int | None: ...
    @property
    def intermediate_size(self) -> int | None: ...
    @property
    def vocab_size(self) -> int | None: ...
    @property
    def max_position_embeddings(self) -> int | None: ...


@dataclass(frozen=True)
class Shape:
    """The dimensions of a built-in transformer (or the tiny MLP)."""

    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int


def shape_of(model: ModelFields, vocab_size: int | None = None) -> Shape:
    """The built-in model's shape: its size preset, then the recipe's overrides.

    The one derivation of a model's dimensions: the plan calls it with the run's
    vocabulary (launcher.plan.vocab) and the builder, planner and FLOP counter read `Plan.shape`.

    Args:
        model: the recipe's model section (model.name must be set).
        vocab_size: the run's vocabulary, when a tokenizer decides it.
    """
    assert model.name is not None, "shape_of needs a built-in model"
    family = FAMILIES[model.name]
    hidden, layers, heads, inter = family.sizes[model.size]
    base = Shape(model.name, hidden, layers, heads, inter, family.vocab_size, family.max_position_embeddings)
    overrides = {
        k: getattr(model, k)
        for k in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
        )
        if getattr(model, k) is not None
    }
    if vocab_size is not None and model.vocab_size is None:
        overrides["vocab_size"] = vocab_size
    return replace(base, **overrides)


def linear_layers(shape: Shape) -> list[tuple[str, int, int]] | None:
    """(module name, in_features, out_features) of the built-in model's linear layers, in module
    order; None for a family this function does not know.

    Names are those peft sees: relative to the transformers model (`LMLoss.lm`), or to TinyMLP.
    GPT-2's are transformers Conv1D layers (weights stored (in, out)); the last one of every
    family is the output head over the vocabulary (tied to the embedding in BERT and GPT-2).
    """
    h, inter, vocab = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    family = FAMILIES.get(shape.family)
    if family is None:
        return None
    if not family.transformer:
        return [("mlp.0", h, inter), ("mlp.3", inter, h), ("head", h, vocab)]
    out: list[tuple[str, int, int]] = []
    for i in range(shape.num_layers):
        p = f"{family.layer_prefix}{i}."
        if family.head_transform:  # BERT
            out += [(p + f"attention.self.{n}", h, h) for n in ("query", "key", "value")]
            out += [(p + "attention.output.dense", h, h), (p + "intermediate.dense", h, inter)]
            out += [(p + "output.dense", inter, h)]
        else:  # GPT-2
            out += [(p + "attn.c_attn", h, 3 * h), (p + "attn.c_proj", h, h)]
            out += [(p + "mlp.c_fc", h, inter), (p + "mlp.c_proj", inter, h)]
    if family.head_transform:
        return [*out, ("cls.predictions.transform.dense", h, h), ("cls.predictions.decoder", h, vocab)]
    return [*out, ("lm_head", h, vocab)]
