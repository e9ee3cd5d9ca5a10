"""The fp8 x-ray's judge: the `fp8_range` event, naming the layers whose fp8 casts lose values.

launcher.worker.fp8_xray adds, on fp8 runs, `fp8_<role>_saturated` and `fp8_<role>_underflow`
columns to the precision x-ray's layer rows (role: input, weight, grad, the output gradient). A
layer is out of range when, in any role,

* its saturated share is above SATURATED_SHARE (0: any element). torchao scales dynamically, so
  the largest element lands on the format's maximum and nothing saturates unless the tensor holds
  inf or NaN;
* its underflow share (nonzero elements the cast rounds to zero) is at least UNDERFLOW_SHARE
  (1 %). Healthy runs stay far below it: on 2 CPU ranks, emulated fp8, tensorwise, 20 steps
  x-rayed every 5 steps, the worst layer and role flushed 4.6e-5 of its nonzero elements on
  gpt2_tiny (accelerate FSDP2, and DeepSpeed ZeRO-1) and 3.8e-5 on bert_tiny (DeepSpeed ZeRO-2),
  over 200 times below; a layer fed one outlier 1e6 times its other inputs
  (tests/fp8_outlier_model.py) flushes 97 % of its input.

The event names each such layer once per run, and the remedy is the override that keeps them in
bf16: `precision.fp8.keep=[...]`, the recipe's own entries plus, per layer, the shortest dotted
suffix of its name that names no other layer (the names precision.fp8.keep matches); with
tensorwise scaling, rowwise scaling (a scale per row) is the other way out. `mplaunch parity`
fails on the event (launcher.analysis.compare).

Light side: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

EVENT = "fp8_range"
SATURATED_SHARE = 0.0
UNDERFLOW_SHARE = 0.01
ROLES = {"input": "input", "weight": "weight", "grad": "output gradient"}
_DEFAULT_FORMATS = {"input": "e4m3", "weight": "e4m3", "grad": "e5m2"}
_MAX = {"e4m3": 448, "e5m2": 57344}


def out_of_range(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per layer out of range, the measures over their thresholds: {"input_underflow": 0.97, ...}."""
    out: dict[str, dict[str, float]] = {}
    for name, row in rows.items():
        over = {}
        for role in ROLES:
            saturated, underflow = row.get(f"fp8_{role}_saturated"), row.get(f"fp8_{role}_underflow")
            if saturated is not None and saturated > SATURATED_SHARE:
                over[f"{role}_saturated"] = saturated
            if underflow is not None and underflow >= UNDERFLOW_SHARE:
                over[f"{role}_underflow"] = underflow
        if over:
            out[name] = over
    return out


def keep_name(name: str, names: Sequence[str]) -> str:
    """The shortest dotted suffix of `name` that is no other layer's name or suffix and does not
    start with a number (`h.1.mlp.c_fc`, not `1.mlp.c_fc`): an entry precision.fp8.keep matches to
    this layer alone, whatever prefix (a loss wrapper's `lm.`) the run's names carry."""
    parts = name.split(".")
    others = [n for n in names if n != name]
    for start in range(len(parts) - 1, -1, -1):
        suffix = ".".join(parts[start:])
        if parts[start].isdigit():
            continue
        if not any(o == suffix or o.endswith("." + suffix) for o in others):
            return suffix
    return name


class Fp8Judge:
    """Judges the fp8 columns of an fp8 run's precision x-ray records.

    Args:
        keep: the recipe's precision.fp8.keep (the remedy's override keeps them too).
        scaling: precision.fp8.scaling (tensorwise or rowwise).
    """

    def __init__(self, keep: Sequence[str], scaling: str) -> None:
        self.keep = list(keep)
        self.scaling = scaling
        self.named: set[str] = set()

    def judge(self, step: int, seen: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
        """The `fp8_range` event of this x-ray record, naming only layers no earlier one named."""
        rows: dict[str, dict[str, Any]] = seen["layers"]
        bad = out_of_range(rows)
        if not set(bad) - self.named:
            return []
        self.named |= set(bad)
        return [self.event(step, bad, rows, seen.get("fp8_formats") or _DEFAULT_FORMATS)]

    def event(
        self,
        step: int,
        bad: dict[str, dict[str, float]],
        rows: dict[str, dict[str, Any]],
        formats: dict[str, str],
    ) -> tuple[str, str, dict[str, Any]]:
        fp8_layers = [n for n, row in rows.items() if any(k.startswith("fp8_") for k in row)]
        shown = "; ".join(f"{name}: {_measures(over, formats)}" for name, over in list(bad.items())[:4])
        more = f"; and {len(bad) - 4} more" if len(bad) > 4 else ""
        cause = f"fp8 casts lose values in {len(bad)} of {len(fp8_layers)} fp8 layers ({shown}{more})"
        if any(k.endswith("_underflow") for over in bad.values() for k in over):
            cause += (
                ": one scale per tensor is set by its largest element, and elements far below it round to zero"
                if self.scaling == "tensorwise"
                else ": elements far below their row's largest round to zero"
            )
        if any(k.endswith("_saturated") for over in bad.values() for k in over):
            cause += (
                "; saturated elements mean inf or NaN in the tensor (dynamic scaling saturates nothing else)"
            )
        names = list(dict.fromkeys([*self.keep, *(keep_name(n, list(rows)) for n in bad)]))
        override = f"precision.fp8.keep=[{', '.join(names)}]"
        remedy = f"keep these layers in bf16: '{override}'"
        if self.scaling == "tensorwise":
            remedy += " (or precision.fp8.scaling=rowwise: a scale per row)"
        message = f"warning: step {step}: {cause}. Fix: {remedy}"
        fields = {"layers": bad, "override": override, "cause": cause, "remedy": remedy}
        return EVENT, message, fields


def _measures(over: dict[str, float], formats: dict[str, str]) -> str:
    out = []
    for key, share in over.items():
        role, _, what = key.rpartition("_")
        fmt = formats.get(role, _DEFAULT_FORMATS[role])
        if what == "underflow":
            out.append(f"{ROLES[role]} {share:.0%} to zero in {fmt}")
        else:
            out.append(f"{ROLES[role]} {share:.2%} beyond {fmt}'s {_MAX.get(fmt, '?')}")
    return ", ".join(out)
