"""Which linear layers of a model compute in fp8, and why the others stay in bf16.

One rule, used twice: by the plan on the layer list it knows without building the model (a
built-in family's shapes, model.hf's safetensors headers), and by the worker on the built model
(where the plan could not know the layers, model.target code). The dry run prints what the plan
chose; the worker converts exactly that.

A layer stays in bf16 when
  - its in or out features are not multiples of 16 (fp8 matrix products need both),
  - precision.fp8.keep_first_last is on and it is one of the first layers (the linear layers of the
    first module that holds any: block 0's attention in a transformer, which reads the embeddings)
    or the last layer (the output head, which writes the logits),
  - it matches precision.fp8.keep (a module name, or a dotted suffix of one).
"""

from __future__ import annotations

from collections.abc import Sequence

#: fp8 matrix products need both sides of a weight to be multiples of this.
FP8_MULTIPLE = 16

FIRST = "first layer (precision.fp8.keep_first_last)"
LAST = "last layer, the output head (precision.fp8.keep_first_last)"
KEEP = "precision.fp8.keep"


def matches(name: str, pattern: str) -> bool:
    """A module name matches a pattern equal to it or to one of its dotted suffixes."""
    return name == pattern or name.endswith("." + pattern)


def choose(
    layers: Sequence[tuple[str, int, int]], keep_first_last: bool, keep: Sequence[str]
) -> tuple[list[str], dict[str, str]]:
    """Split `layers` ((name, in_features, out_features) in module order) into the names converted to
    fp8 and a map of the names kept in bf16 to their reason, both in module order."""
    firsts: set[str] = set()
    last = None
    if keep_first_last and layers:
        parent = _parent(layers[0][0])
        firsts = {name for name, _, _ in layers if _parent(name) == parent}
        last = layers[-1][0]
    converted: list[str] = []
    kept: dict[str, str] = {}
    for name, fan_in, fan_out in layers:
        if fan_in % FP8_MULTIPLE or fan_out % FP8_MULTIPLE:
            kept[name] = f"in {fan_in} x out {fan_out}: not multiples of {FP8_MULTIPLE}"
        elif name in firsts:
            kept[name] = FIRST
        elif name == last:
            kept[name] = LAST
        elif any(matches(name, p) for p in keep):
            kept[name] = KEEP
        else:
            converted.append(name)
    return converted, kept


def unmatched(layers: Sequence[tuple[str, int, int]], keep: Sequence[str]) -> list[str]:
    """The precision.fp8.keep entries that match no linear layer (a typo keeps nothing in bf16)."""
    return [p for p in keep if not any(matches(name, p) for name, _, _ in layers)]


def _parent(name: str) -> str:
    return name.rpartition(".")[0]
