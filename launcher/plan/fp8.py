"""precision.dtype fp8 in the plan: the layers converted to float8, the refusals, and the dry run's lines.

The plan knows a model's linear layers without building it for a built-in family (its Shape) and for
a model.hf folder (its safetensors headers); there launcher.plan.fp8_layers.choose picks the layers
and `PrecisionPolicy.fp8["converted"]` lists them, which the worker converts. For model.target code
(or a hub id) the layers are only known once the worker builds the model: `converted` is None and
the worker applies the same rule to the built model.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from launcher.plan import fp8_layers, hf_dir
from launcher.plan.precision import PrecisionPolicy
from launcher.recipe import tasks
from launcher.recipe.sections import Recipe
from launcher.recipe.shapes import linear_layers, shape_of

#: DeepSpeed ZeRO stages that train fp8 (torchao's Float8Linear under the DeepSpeed engine).
FP8_DEEPSPEED_STAGES: frozenset[int] = frozenset({0, 1, 2, 3})

Layers = list[tuple[str, int, int]]


def layers_of(recipe: Recipe, hf: hf_dir.HfModel | None, task: str, num_labels: int | None,
              vocab_size: int | None) -> Layers | None:  # fmt: skip
    """The model's linear layers (name, in_features, out_features) in module order, as the plan can
    know them; None when only the built model tells (model.target, a hub id, unreadable headers)."""
    m = recipe.model
    if m.hf is not None:
        if hf is None or not hf.local:
            return None
        shapes = hf_dir.weight_shapes(Path(hf.source))
        return None if shapes is None else hf_linear_layers(hf, shapes, task, num_labels, vocab_size)
    if m.target is not None or m.name is None:
        return None
    return linear_layers(shape_of(m, vocab_size))


# The safetensors headers list tensors by name; a module's place in the model is recovered from its
# name: blocks by their index, and inside a block these parts in the order transformers builds them
# (BERT, GPT-2, Llama and their kin); a part not listed sorts by name between them and the heads.
_RANK = {
    **dict.fromkeys(("attention", "attn", "self_attn", "self", "query", "q_proj", "c_attn", "c_fc"), 0),
    **dict.fromkeys(("gate_proj", "transform", "dense"), 0),
    **dict.fromkeys(("intermediate", "mlp", "key", "k_proj", "up_proj", "c_proj", "decoder"), 1),
    **dict.fromkeys(("output", "value", "v_proj", "down_proj"), 2),
    "o_proj": 3,
    "pooler": 80,
    **dict.fromkeys(("cls", "lm_head", "classifier", "score"), 90),
}
_LM_HEADS = ("classifier", "score", "pooler")  # not in a language model's built model
_CLS_HEADS = ("cls", "lm_head")  # not in a sequence classifier's


def _order(name: str) -> tuple[tuple[int, int, str], ...]:
    return tuple((50, int(p), "") if p.isdigit() else (_RANK.get(p, 50), 0, p) for p in name.split("."))


def hf_linear_layers(hf: hf_dir.HfModel, shapes: dict[str, tuple[int, ...]], task: str,
                     num_labels: int | None, vocab_size: int | None) -> Layers:  # fmt: skip
    """model.hf's linear layers as the worker builds them for `task`, from its safetensors headers: the
    file's 2-D weights (GPT-2's Conv1D blocks store (in, out), nn.Linear (out, in)) in module order,
    without the heads the task's model has not, with the output head the file leaves out (tied to the
    embedding, or new: a classifier)."""
    swap = hf.model_type == "gpt2"
    drop = _CLS_HEADS if task == tasks.SEQUENCE_CLASSIFICATION else _LM_HEADS
    layers = []
    for name, (a, b) in hf_dir._linear_weights(shapes).items():
        if not set(name.split(".")) & set(drop):
            layers.append((name, a, b) if swap and re.search(r"(^|\.)h\.\d+\.", name) else (name, b, a))
    hidden = int(hf.config.get("hidden_size") or hf.config.get("n_embd") or 0)
    names = {n for n, _, _ in layers}
    if task == tasks.SEQUENCE_CLASSIFICATION:
        if hf.model_type == "bert" and not any("pooler" in n for n in names):
            layers.append(("bert.pooler.dense", hidden, hidden))
        head = "score" if hf_dir.task_of(hf) == "causal-lm" else "classifier"
        if head not in names:
            layers.append((head, hidden, num_labels or 2))
    else:
        vocab = vocab_size or hf.vocab_size or 0
        head = "cls.predictions.decoder" if any(n.startswith("cls.") for n in names) else "lm_head"
        if head not in names:
            layers.append((head, hidden, vocab))
    return sorted(layers, key=lambda layer: _order(layer[0]))


def settings(recipe: Recipe, device: str, layers: Layers | None) -> dict[str, Any]:
    """The `PrecisionPolicy.fp8` dict of an fp8 run (see launcher.plan.precision)."""
    f = recipe.precision.fp8
    converted: list[str] | None = None
    kept: dict[str, str] = {}
    if layers is not None:
        converted, kept = fp8_layers.choose(layers, f.keep_first_last, f.keep)
    all_gather = (
        recipe.backend == "accelerate"
        and recipe.zero.stage > 0
        and f.scaling == "tensorwise"
        and device == "cuda"
    )
    return {
        "scaling": f.scaling,
        "keep_first_last": f.keep_first_last,
        "keep": list(f.keep),
        "converted": converted,
        "kept": kept,
        "emulated": device == "cpu",
        "all_gather": all_gather,
    }


def attach(policy: PrecisionPolicy, recipe: Recipe, device: str, layers: Layers | None) -> PrecisionPolicy:
    """The policy with its fp8 dict filled (unchanged unless the dtype is fp8)."""
    if policy.dtype != "fp8":
        return policy
    return replace(policy, fp8=settings(recipe, device, layers))


def problems(recipe: Recipe, layers: Layers | None) -> list[str]:
    """What stops an fp8 run before it starts, one line each: the DeepSpeed stage, keep entries that
    match no layer (when the layers are known)."""
    if recipe.precision.dtype != "fp8":
        return []
    out = []
    stage = recipe.zero.stage
    if recipe.backend == "deepspeed" and stage not in FP8_DEEPSPEED_STAGES:
        out.append(
            f"precision.dtype: fp8 is not supported by DeepSpeed ZeRO-{stage} (mplaunch trains fp8 there at "
            f"stages {', '.join(map(str, sorted(FP8_DEEPSPEED_STAGES))) or 'none'}); backend=accelerate (FSDP2) "
            "trains it"
        )
    for pattern in fp8_layers.unmatched(layers or [], recipe.precision.fp8.keep) if layers else []:
        out.append(
            f"precision.fp8.keep: {pattern!r} matches no linear layer{_nearest(pattern, layers or [])}"
        )
    return out


def _nearest(pattern: str, layers: Layers) -> str:
    suffixes = sorted({name.split(".", i)[-1] for name, _, _ in layers for i in range(name.count(".") + 1)})
    close = difflib.get_close_matches(pattern, suffixes, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def compact(names: Sequence[str]) -> str:
    """Names written short: those that differ only in one block index become one pattern,
    e.g. h.1.mlp.c_fc, h.2.mlp.c_fc, h.3.mlp.c_fc -> h.{1..3}.mlp.c_fc."""
    groups: dict[str, list[int]] = {}
    for name in names:
        match = re.search(r"(^|\.)(\d+)(\.|$)", name)
        if match is None:
            groups.setdefault(name, [])
            continue
        key = name[: match.start(2)] + "{}" + name[match.end(2) :]
        groups.setdefault(key, []).append(int(match.group(2)))
    out: list[str] = []
    for key, indices in groups.items():
        if not indices:
            out.append(key)
        elif len(indices) == 1:
            out.append(key.replace("{}", str(indices[0])))
        else:
            out.append(key.replace("{}", "{" + _ranges(indices) + "}"))
    return ", ".join(_siblings(out))


def _siblings(names: list[str]) -> list[str]:
    """Neighbours in the same module become one: a.self.query, a.self.key -> a.self.{query,key}."""
    out: list[tuple[str, list[str]]] = []
    for name in names:
        parent, _, leaf = name.rpartition(".")
        if out and parent and out[-1][0] == parent and "{" not in leaf:
            out[-1][1].append(leaf)
        else:
            out.append((parent, [leaf]))
    return [
        (f"{p}." if p else "") + (leaves[0] if len(leaves) == 1 else "{" + ",".join(leaves) + "}")
        for p, leaves in out
    ]


def summary(policy: PrecisionPolicy) -> str:
    """`mplaunch check`'s fp8 line."""
    f = policy.fp8
    assert f is not None
    if f["converted"] is None:
        layers = "the layers are chosen in the worker"
    else:
        layers = f"{len(f['converted'])} linear layers converted, {len(f['kept'])} kept in bf16"
    emulated = "; emulated on the CPU (slow, no speed-up)" if f["emulated"] else ""
    gather = "; fp8 all-gather" if f["all_gather"] else ""
    return f"fp8: {f['scaling']} scaling, {layers}{emulated}{gather} (--dry-run lists them)"


def _ranges(indices: list[int]) -> str:
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}..{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs)


SCALING = {
    "tensorwise": "tensorwise: one dynamic scale per tensor (amax of the whole tensor)",
    "rowwise": "rowwise: one dynamic scale per row (amax of each row)",
}


def describe(policy: PrecisionPolicy) -> str:
    """The dry run's fp8 section."""
    f = policy.fp8
    assert f is not None
    converted, kept = f["converted"], f["kept"]
    rows = [
        ("scaling", SCALING[f["scaling"]]),
        (
            "formats",
            "e4m3 inputs and weights, e5m2 output gradients; bf16 elsewhere; fp32 masters and reduce",
        ),
    ]
    if converted is None:
        rows.append(("converted", "decided in the worker (the layers are known once the model is built)"))
    else:
        total = len(converted) + len(kept)
        rows.append(
            ("converted", f"{len(converted)} of {total} linear layers: {compact(converted) or 'none'}")
        )
        by_reason: dict[str, list[str]] = {}
        for name, reason in kept.items():
            by_reason.setdefault(reason, []).append(name)
        kept_rows = [f"{compact(names)}: {reason}" for reason, names in by_reason.items()] or ["none"]
        rows += [("kept bf16", kept_rows[0]), *(("", row) for row in kept_rows[1:])]
    if f["keep"]:
        rows.append(("keep", ", ".join(f["keep"]) + " (precision.fp8.keep)"))
    rows.append(
        ("emulated", "yes: on the CPU torchao emulates fp8 (slow; the numerics only, no speed-up)")
        if f["emulated"]
        else ("emulated", "no: fp8 tensor cores")
    )
    gather = (
        "on: FSDP2 all-gathers the converted weights in fp8"
        if f["all_gather"]
        else "off (needs backend=accelerate, zero.stage >= 1, tensorwise scaling, a GPU)"
    )
    rows.append(("all-gather", gather))
    return "\n".join(["== fp8 (torchao float8) ==", *(f"{k:<10} {v}" for k, v in rows)])
