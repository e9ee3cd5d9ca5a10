"""The parameter tensors of each built-in model family as (name, numel), from its dimensions alone:
what launcher.recipe.families records as a family's `tensors`, and what the parameter counts, FLOPs
and memory formulas (launcher.plan.estimate) read. Equal to the built model's `named_parameters()`
(tests/worker/test_flops.py holds them equal).
"""

from __future__ import annotations

from typing import Protocol


class Dims(Protocol):
    """The numbers a family's tensors follow (launcher.recipe.shapes.Shape has them)."""

    @property
    def hidden_size(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def intermediate_size(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def max_position_embeddings(self) -> int: ...


def bert_mlm(shape: Dims) -> list[tuple[str, int]]:
    """(name, numel) of BertForMaskedLM's parameters, in `model.parameters()` order.

    No pooler (the masked-LM model is built without one). The decoder weight is
    tied to the word embedding and its bias is `cls.predictions.bias`, so both
    appear once, as `parameters()` yields shared tensors once.
    """
    h, inter = shape.hidden_size, shape.intermediate_size
    out = [
        ("bert.embeddings.word_embeddings.weight", shape.vocab_size * h),
        ("bert.embeddings.position_embeddings.weight", shape.max_position_embeddings * h),
        ("bert.embeddings.token_type_embeddings.weight", 2 * h),
        ("bert.embeddings.LayerNorm.weight", h),
        ("bert.embeddings.LayerNorm.bias", h),
    ]
    for i in range(shape.num_layers):
        p = f"bert.encoder.layer.{i}."
        for proj in ("self.query", "self.key", "self.value", "output.dense"):
            out += [(f"{p}attention.{proj}.weight", h * h), (f"{p}attention.{proj}.bias", h)]
        out += [(p + "attention.output.LayerNorm.weight", h), (p + "attention.output.LayerNorm.bias", h)]
        out += [(p + "intermediate.dense.weight", inter * h), (p + "intermediate.dense.bias", inter)]
        out += [(p + "output.dense.weight", h * inter), (p + "output.dense.bias", h)]
        out += [(p + "output.LayerNorm.weight", h), (p + "output.LayerNorm.bias", h)]
    out += [
        ("cls.predictions.bias", shape.vocab_size),
        ("cls.predictions.transform.dense.weight", h * h),
        ("cls.predictions.transform.dense.bias", h),
        ("cls.predictions.transform.LayerNorm.weight", h),
        ("cls.predictions.transform.LayerNorm.bias", h),
    ]
    return out


def gpt2_lm(shape: Dims) -> list[tuple[str, int]]:
    """(name, numel) of GPT2LMHeadModel's parameters; `lm_head` is tied to `wte`, so it is not listed."""
    h, inter = shape.hidden_size, shape.intermediate_size
    out = [
        ("transformer.wte.weight", shape.vocab_size * h),
        ("transformer.wpe.weight", shape.max_position_embeddings * h),
    ]
    for i in range(shape.num_layers):
        p = f"transformer.h.{i}."
        out += [(p + "ln_1.weight", h), (p + "ln_1.bias", h)]
        out += [(p + "attn.c_attn.weight", h * 3 * h), (p + "attn.c_attn.bias", 3 * h)]
        out += [(p + "attn.c_proj.weight", h * h), (p + "attn.c_proj.bias", h)]
        out += [(p + "ln_2.weight", h), (p + "ln_2.bias", h)]
        out += [(p + "mlp.c_fc.weight", h * inter), (p + "mlp.c_fc.bias", inter)]
        out += [(p + "mlp.c_proj.weight", inter * h), (p + "mlp.c_proj.bias", h)]
    return out + [("transformer.ln_f.weight", h), ("transformer.ln_f.bias", h)]


def tiny_mlp(shape: Dims) -> list[tuple[str, int]]:
    """(name, numel) of `launcher.worker.models.TinyMLP`: embedding, two-layer MLP, untied vocabulary head."""
    h, inter, vocab = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    return [
        ("embed.weight", vocab * h),
        ("mlp.0.weight", inter * h),
        ("mlp.0.bias", inter),
        ("mlp.3.weight", h * inter),
        ("mlp.3.bias", h),
        ("head.weight", vocab * h),
        ("head.bias", vocab),
    ]
