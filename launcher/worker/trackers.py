"""Where rank 0 sends a run's metrics besides metrics.jsonl: logging.trackers (TensorBoard, W&B, MLflow).

Meter (launcher.worker.metrics) hands every record it writes to metrics.jsonl to `Trackers.write`,
after writing it: host numbers it already has at a log interval, so a tracker adds no device sync.
Each tracker gets the same series, named `KIND/FIELD` with the training step as x-axis:
`train/loss`, `train/lr`, `train/loss_scale`, `train/skipped_steps`, `train/grad_norm`,
`train/tokens_per_s`, `train/mfu`, `train/mem_peak_bytes`... (TRAIN_FIELDS), `eval/eval_loss`...,
and a precision x-ray's worst layer per measure, `precision/max_underflow`... (precision_scalars).

Events (the "event" records: ready, overflow, warnings, stop, finish...), in each tracker's idiom:
TensorBoard leaves them to metrics.jsonl; W&B gets a marker series `events/NAME` (1 at the event's
step) and, at the end of each start of the run, a table `events` of step, event and message;
MLflow gets the same marker metric, and the messages as lines of the text artifact events.txt
(rewritten whole at the end of each start, earlier starts' lines kept).

Resume: RUN_DIR/trackers.json keeps the W&B run id and the MLflow run id (with its tracking URI
and experiment); every start of the run after the first continues those runs (launcher.worker.
tracker_clients). Steps may come again after a resume from an older checkpoint: W&B plots against
its own `step` series (define_metric), so none is dropped; MLflow keeps every (step, value).

Failure never stops training: an exception from a tracker's import, start, log or close turns that
tracker off for the rest of the run, with one console warning naming it and the cause and a
`tracker_failed` event in metrics.jsonl, which stays complete.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from typing import Any

from launcher.plan.resolve import Plan
from launcher.rundir.checkpoint import write_atomic
from launcher.rundir.layout import RunDir
from launcher.worker import tracker_clients
from launcher.worker.tracker_clients import Outcome, Tracker

SHOWN = {"tensorboard": "TensorBoard", "wandb": "W&B", "mlflow": "MLflow"}

TRAIN_FIELDS = (
    "loss",
    "lr",
    "loss_scale",
    "skipped_steps",
    "grad_norm",
    "samples_per_s",
    "tokens_per_s",
    "step_time_s",
    "tflops",
    "mfu",
    "mem_peak_bytes",
    "mem_reserved_bytes",
    "mem_peak_bytes_max",
    "mem_reserved_bytes_max",
    "data_wait_frac",
    "overflow_rate",
)
_FIELDS = {"train": TRAIN_FIELDS, "eval": ("eval_loss", "eval_perplexity", "eval_accuracy", "eval_f1")}

# A precision x-ray's worst layer per measure (README, "Precision x-ray"): trackers get these few
# curves, not one per layer and measure; the per-layer values are in metrics.jsonl and report's heatmaps.
_WORST = {
    "underflow": ("max_underflow", max),
    "to_zero": ("max_to_zero", max),
    "near_max": ("max_near_max", max),
    "headroom_log2": ("min_headroom_log2", min),
    "lost": ("max_lost", max),
    "stale": ("max_stale", max),
    # fp8 runs (launcher.worker.fp8_xray): each cast's worst share saturated and flushed to zero
    **{
        f"fp8_{r}_{m}": (f"max_fp8_{r}_{m}", max)
        for r in ("input", "weight", "grad")
        for m in ("saturated", "underflow")
    },
}


def precision_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The worst layer's value of each measure a precision record holds (measures no layer has are left out)."""
    out: dict[str, float] = {}
    for measure, (name, worst) in _WORST.items():
        values = [v for row in record["layers"].values() if (v := row.get(measure)) is not None]
        if values:
            out[name] = worst(values)
    return out


def series(record: Mapping[str, Any]) -> dict[str, float]:
    """A record's numbers as the trackers name them ("train/loss": 2.3), None values left out."""
    kind = record.get("kind")
    if kind == "precision":
        values: Mapping[str, Any] = precision_scalars(record)
    else:
        values = {field: record.get(field) for field in _FIELDS.get(str(kind), ())}
    return {f"{kind}/{k}": float(v) for k, v in values.items() if v is not None}


# The event a tracker failing records, and what writes it (Meter.event: metrics.jsonl and the console).
FAILED_EVENT = "tracker_failed"
EventSink = Callable[..., None]


class Trackers:
    """Rank 0's trackers: started one by one, each fed every record, each turned off when it fails.

    Args:
        plan: the run's plan (logging.trackers and their settings, the run directory).
        event: records an event: event(step, name, message, **fields) (Meter.event).
        say: prints a line to the console (each tracker's start line).
    """

    def __init__(self, plan: Plan, event: EventSink, say: Callable[[str], None]) -> None:
        self.plan = plan
        self.files = RunDir.from_plan(plan)
        self._event = event
        self._say = say
        self.on: dict[str, Tracker] = {}
        self.outcome: Outcome = "failed"
        self.step = 0  # the last record's

    def start(self, step: int) -> None:
        """Start every tracker in logging.trackers (a resumed run: continue their runs)."""
        ids = read_ids(self.files)
        for name in self.plan.recipe.logging.enabled_trackers:
            try:
                tracker, line, saved = tracker_clients.start(name, self.plan, ids.get(name))
                self.on[name] = tracker
                if saved is not None and saved != ids.get(name):
                    ids[name] = saved
                    write_atomic(self.files.trackers, json.dumps(ids, indent=1) + "\n")
            except Exception as exc:
                self._drop(name, step, exc)
                continue
            if line:
                self._say(line)

    def write(self, record: Mapping[str, Any]) -> None:
        """Hand one metrics.jsonl record to every tracker that is on."""
        step = self.step = int(record.get("step") or self.step)
        if record.get("kind") == "event":
            event, message = str(record.get("event")), str(record.get("message", ""))
            if event == "finish":
                self.outcome = "finished"
            elif event == "stop":
                self.outcome = "stopped"
            self._each(step, lambda tracker: tracker.event(step, event, message))
            return
        scalars = series(record)
        if scalars:
            self._each(step, lambda tracker: tracker.log(step, scalars))

    def close(self) -> None:
        """End every tracker's run: finished, stopped (to be resumed) or failed, as the events said."""
        for name, tracker in list(self.on.items()):
            try:
                tracker.close(self.outcome)
            except Exception as exc:
                self.on.pop(name, None)  # closed as far as it could be: not closed again
                self._drop(name, self.step, exc)
        self.on.clear()

    def _each(self, step: int, call: Callable[[Tracker], None]) -> None:
        for name in list(self.on):
            tracker = self.on.get(name)  # one that failed meanwhile (an event of another's failure) is off
            if tracker is None:
                continue
            try:
                call(tracker)
            except Exception as exc:
                self._drop(name, step, exc)

    def _drop(self, name: str, step: int, exc: BaseException) -> None:
        """Turn tracker `name` off, with one warning and a tracker_failed event."""
        tracker = self.on.pop(name, None)
        if tracker is not None:
            with contextlib.suppress(Exception):  # let go of what it holds (W&B's service process)
                tracker.close("failed")
        cause = _one_line(exc)
        message = (
            f"warning: {SHOWN[name]} failed and is off for the rest of the run ({cause}); "
            "training goes on and metrics.jsonl keeps every record"
        )
        self._event(step, FAILED_EVENT, message, tracker=name, cause=cause)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, cut to `limit` characters (a server's reply can be a page)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def read_ids(files: RunDir) -> dict[str, Any]:
    """RUN_DIR/trackers.json: each tracker's run to continue ({} for a first start, or an unreadable file)."""
    try:
        ids = json.loads(files.trackers.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(ids, dict):
        return {}
    return ids
