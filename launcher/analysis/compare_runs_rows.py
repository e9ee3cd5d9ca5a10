"""One row of `mplaunch compare` per run: its state and numbers (from metrics.jsonl, FINISHED, the
lock and a `mplaunch parity` verdict beside it), and the recipe keys that set it apart from the others.

The numbers follow `mplaunch report` (launcher.analysis.report): tokens/s and MFU are medians of
the train records less step 1's (logged alone, with the first step's one-time costs), skipped steps
the last cumulative count, x-ray warnings the precision x-ray's events (launcher.analysis.health).

Light side: the standard library and PyYAML.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launcher.analysis import fp8_range
from launcher.analysis.parity import REPORT_FILE as PARITY_FILE
from launcher.analysis.plots import steady
from launcher.errors import UserError
from launcher.recipe.schema import flatten
from launcher.rundir.layout import RunDir
from launcher.rundir.lock import holder_if_held
from launcher.rundir.metrics_log import Metrics, read_metrics, read_run_info, run_state

# The precision x-ray's warnings: the events launcher.analysis.health (and fp8_range) record.
XRAY_EVENTS = ("underflow", "lost_updates", fp8_range.EVENT)
# Keys every run has its own value of because it is its own run, not because it trains differently.
OWN_KEYS = frozenset({"name", "logging.dir", "source"})
NOT_STARTED = "not started"


@dataclass(frozen=True)
class Run:
    """A run to compare: its directory (which may not exist yet) and, for a sweep's point, its overrides."""

    path: Path
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Parity:
    """The `mplaunch parity` verdict a run took part in (OUT/parity.json beside the run directory)."""

    passed: bool
    final_rel_diff: float | None
    max_rel_diff: float | None

    def describe(self) -> str:
        gap = "" if self.max_rel_diff is None else f", max gap {self.max_rel_diff:.2%}"
        return ("PASS" if self.passed else "FAIL") + gap


@dataclass(frozen=True)
class Row:
    """What the table shows of one run; None where the run recorded nothing of it."""

    name: str
    path: Path
    label: str
    state: str
    steps: int | None = None
    max_steps: int | None = None
    final_loss: float | None = None
    final_eval: float | None = None
    best_eval: tuple[float, int] | None = None  # (loss, step)
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_mem_bytes: int | None = None
    skipped_steps: int | None = None
    xray_warnings: int | None = None
    parity: Parity | None = None
    metrics: Metrics | None = None  # for the plots
    values: tuple[tuple[str, str], ...] = ()  # the differing keys' values, in key order
    best: bool = False


def row_of(run: Run, name: str, keys: Sequence[str], values: dict[str, Any] | None) -> Row:
    """The row of `run`, shown as `name`; `values`: its flattened recipe (None: none readable)."""
    shown = tuple((k, format_value(values.get(k, _UNSET))) for k in keys) if values is not None else ()
    label = label_of(shown, run, name) if keys else name
    metrics = _metrics(run.path)
    info = read_run_info(run.path) if run.path.is_dir() else None
    max_steps = info.max_steps if info else None
    common: dict[str, Any] = {"name": name, "path": run.path, "label": label, "values": shown}
    if metrics is None:
        return Row(state=_state_without_metrics(run.path), max_steps=max_steps, **common)
    eval_steps, eval_losses = metrics.series("eval_loss", "eval")
    _, losses = metrics.series("loss")
    tokens, mfu = steady(metrics.series("tokens_per_s")), steady(metrics.series("mfu"))
    _, peaks = metrics.series("mem_peak_bytes_max")
    _, skipped = metrics.series("skipped_steps")
    steps = metrics.train[-1]["step"] if metrics.train else 0
    return Row(
        state=_state(run.path, metrics, steps, max_steps),
        steps=steps,
        max_steps=max_steps,
        final_loss=losses[-1] if losses else None,
        final_eval=eval_losses[-1] if eval_losses else None,
        best_eval=min(zip(eval_losses, eval_steps, strict=True), default=None),
        tokens_per_s=statistics.median(tokens) if tokens else None,
        mfu=statistics.median(mfu) if mfu else None,
        peak_mem_bytes=int(max(peaks)) if peaks else None,
        skipped_steps=int(skipped[-1]) if skipped else None,
        xray_warnings=sum(len(metrics.named(e)) for e in XRAY_EVENTS),
        parity=parity_of(run.path),
        metrics=metrics,
        **common,
    )


def _metrics(path: Path) -> Metrics | None:
    try:
        return read_metrics(path)
    except UserError:  # not started, or failed before its first record
        return None


def _state(path: Path, metrics: Metrics, steps: int, max_steps: int | None) -> str:
    state, _ = run_state(path, metrics)
    where = f"at step {steps}" + (f" of {max_steps}" if max_steps else "")
    return {"stopped": f"stopped {where}", "crashed": f"failed {where}"}.get(state, state)


def _state_without_metrics(path: Path) -> str:
    """A run with no record yet: queued, running (its setup), failed (a rank's error) or not started."""
    files = RunDir.of(path)
    if not path.is_dir():
        return NOT_STARTED
    if files.rank_errors():
        return "failed before step 1"
    try:
        holder = holder_if_held(files.lock)
    except OSError:
        return NOT_STARTED
    if holder is None:
        return NOT_STARTED
    return "queued" if holder.state == "submitted" else "running"


def parity_of(path: Path) -> Parity | None:
    """The verdict of the `mplaunch parity` check whose parity.json (in the run's parent) names this run."""
    report = path.parent / PARITY_FILE
    try:
        body = json.loads(report.read_text())
        runs = [Path(p).resolve() for p in body["runs"].values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if path.resolve() not in runs:
        return None

    def number(key: str) -> float | None:
        value = body.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    return Parity(body.get("verdict") == "pass", number("final_rel_diff"), number("max_rel_diff"))


# ---------------------------------------------------------------- recipes and their differing keys


def read_recipe(path: Path) -> dict[str, Any] | None:
    """RUN_DIR/recipe.yaml (the resolved recipe), flattened to dotted keys; else plan.json's recipe."""
    files = RunDir.of(path)
    raw: Any = None
    with contextlib.suppress(OSError, ValueError, yaml.YAMLError):
        raw = yaml.safe_load(files.recipe_file.read_text())
    if not isinstance(raw, dict):
        try:
            raw = json.loads(files.plan_file.read_text()).get("recipe")
        except (OSError, ValueError, AttributeError):
            return None
    return flatten(raw) if isinstance(raw, dict) else None


def differing_keys(recipes: Sequence[tuple[Run, dict[str, Any]]]) -> list[str]:
    """The dotted keys whose values are not the same in every recipe, in the first recipe's order.

    Left out: the keys each run has its own value of because it is its own run (OWN_KEYS), and
    string keys whose every value names the run's own directory (a checkpoint.dir or a tokenizer
    derived from it).
    """
    order = list(dict.fromkeys(k for _, flat in recipes for k in flat))
    found = []
    for key in order:
        values = [flat.get(key, _UNSET) for _, flat in recipes]
        if key in OWN_KEYS or all(v == values[0] for v in values):
            continue
        if all(
            isinstance(v, str) and _names_own_dir(v, run) for (run, _), v in zip(recipes, values, strict=True)
        ):
            continue
        found.append(key)
    return found


def _names_own_dir(value: str, run: Run) -> bool:
    resolved = str(run.path.resolve())
    return run.path.name in Path(value).parts or value.startswith(resolved)


class _Unset:
    def __repr__(self) -> str:
        return "(unset)"


_UNSET: Any = _Unset()


def format_value(value: Any) -> str:
    """A recipe value as an override would spell it: 0.001, true, null, [0.9, 0.95]."""
    if value is _UNSET:
        return "(unset)"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def label_of(shown: Sequence[tuple[str, str]], run: Run, name: str) -> str:
    """`optimizer.lr=0.001, train.seed=7`; a sweep point with no recipe yet: its overrides; else the name."""
    if shown:
        return ", ".join(f"{k}={v}" for k, v in shown)
    if run.overrides:
        return ", ".join(run.overrides)
    return name
