"""The built-in model families (model.name): one record each, the one place their facts live.

Light side (no torch): the worker's builder is named by its dotted path and imported by
launcher.worker.models only when a worker builds the model. The shape presets are read by
launcher.recipe.shapes, the objectives by launcher.recipe.tasks, the vocabulary defaults by
launcher.plan.vocab, the FSDP2 unit (`block`) by launcher.plan.backend_config and the worker that
applies it; the FLOP and memory formulas (launcher.plan.estimate) read `layer_prefix`,
`head_transform`, `peft_targets` and `tensors` (its parameter tensors, launcher.recipe.tensors).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import get_args

from launcher.recipe import tensors
from launcher.recipe.sections import Model
from launcher.recipe.tensors import Dims


@dataclass(frozen=True)
class Family:
    """One built-in model family."""

    name: str  # model.name
    builder: str  # "module:function" of the worker's builder, called with (shape, dropout)
    tasks: tuple[str, ...]  # the objectives it is made for (data.task); the first is its auto
    sizes: dict[str, tuple[int, int, int, int]]  # model.size -> hidden, layers, heads, intermediate
    vocab_size: int  # without a tokenizer (synthetic data)
    max_position_embeddings: int
    # A transformers language model, wrapped in launcher.worker.models.LMLoss (train.loss applies);
    # else the module computes its own loss.
    language_model: bool
    transformer: bool  # has attention layers (num_heads, positions, activation checkpointing)
    tensors: Callable[
        [Dims], list[tuple[str, int]]
    ]  # its parameters as (name, numel): launcher.recipe.tensors
    synthetic_only: bool = False  # trains on synthetic data only
    layer_prefix: str = ""  # module name of transformer block i, before the index ("" without blocks)
    # The class of one transformer block: FSDP2 shards each as a unit (launcher.worker.backends.fsdp2);
    # "" without blocks.
    block: str = ""
    head_transform: bool = False  # a dense h x h transform before the vocabulary projection (BERT's)
    # Extra (seq x batch x intermediate) tensors its GELU keeps for the backward: GPT-2's tanh GELU
    # ("gelu_new") is built from pointwise ops that keep 3.
    gelu_saved: int = 0
    # peft's default LoRA targets for the family's model type (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING;
    # tests/e2e/test_lora.py holds them equal); empty: every linear layer but the vocabulary head.
    peft_targets: tuple[str, ...] = ()


_TRANSFORMER_SIZES = {"tiny": (128, 2, 2, 512), "mini": (256, 4, 4, 1024), "base": (768, 12, 12, 3072)}

FAMILIES: dict[str, Family] = {
    "bert-mlm": Family(
        name="bert-mlm",
        builder="launcher.worker.models:bert",
        tasks=("masked-lm",),
        sizes={**_TRANSFORMER_SIZES, "large": (1024, 24, 16, 4096)},
        vocab_size=30522,
        max_position_embeddings=512,
        language_model=True,
        transformer=True,
        tensors=tensors.bert_mlm,
        layer_prefix="bert.encoder.layer.",
        block="BertLayer",
        head_transform=True,
        peft_targets=("query", "value"),
    ),
    "gpt2-lm": Family(
        name="gpt2-lm",
        builder="launcher.worker.models:gpt2",
        tasks=("causal-lm", "sft"),
        sizes={**_TRANSFORMER_SIZES, "large": (1280, 36, 20, 5120)},
        vocab_size=50257,
        max_position_embeddings=1024,
        language_model=True,
        transformer=True,
        tensors=tensors.gpt2_lm,
        layer_prefix="transformer.h.",
        block="GPT2Block",
        gelu_saved=3,
        peft_targets=("c_attn",),
    ),
    "tiny-mlp": Family(
        name="tiny-mlp",
        builder="launcher.worker.models:TinyMLP",
        tasks=("masked-lm",),
        sizes={size: (64, 2, 1, 256) for size in ("tiny", "mini", "base", "large")},
        vocab_size=1000,
        max_position_embeddings=4096,
        language_model=False,
        transformer=False,
        tensors=tensors.tiny_mlp,
        synthetic_only=True,
    ),
}
# model.name's Literal is the schema's (a type); it names these families, no others.
assert set(get_args(get_args(Model.model_fields["name"].annotation)[0])) == set(FAMILIES)
# A user's model (model.target) with synthetic data draws its ids below this family's vocabulary.
DEFAULT = "bert-mlm"


def default_vocab_size(name: str | None) -> int:
    """The vocabulary of a built-in model when no tokenizer decides it (BERT's for a user's model)."""
    return FAMILIES[name or DEFAULT].vocab_size
