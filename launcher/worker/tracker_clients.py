"""The three trackers of logging.trackers, each started (or continued) for rank 0 by `start`.

launcher.worker.trackers (which imports this module) owns what they receive and what happens when one fails; this module owns
how each library is driven: quietly (one line of ours per tracker at the start, then warnings
only), with bounded waits on a server that is down, and continuing the run trackers.json names.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlparse

from launcher.plan.resolve import Plan
from launcher.recipe.schema import flatten
from launcher.run.sweep import SWEEP_FILE
from launcher.rundir.layout import RunDir

# How a run ended, as a tracker's close hears it: the "finish" event, the "stop" event (a stop
# request: checkpointed, to be resumed), or neither (it failed, or was killed).
Outcome = Literal["finished", "stopped", "failed"]


class Tracker(Protocol):
    """One tracker's run, started by `start`."""

    def log(self, step: int, scalars: dict[str, float]) -> None: ...
    def event(self, step: int, event: str, message: str) -> None: ...
    def close(self, outcome: Outcome) -> None: ...


WANDB_HOST = "api.wandb.ai"
CONNECT_TIMEOUT_S = 3.0
# MLflow's HTTP client retries 7 times with a growing backoff by default (minutes on a dead
# server); these bound one request to about half a minute. A user's own settings win.
MLFLOW_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a bar on the console for events.txt
}
# MLflow's limits (mlflow.utils.validation): longer param values are cut, batches split.
PARAM_VALUE_LIMIT = 6000
PARAMS_PER_BATCH = 100


def start(name: str, plan: Plan, saved: dict[str, Any] | None) -> tuple[Tracker, str, dict[str, Any] | None]:
    """Start tracker `name` (continuing the run `saved` names, from trackers.json).

    Returns:
        The tracker, the console line that says where its run is, and what trackers.json keeps for it.
    """
    starters: dict[str, Callable[[Plan, dict[str, Any] | None], tuple[Tracker, str, dict[str, Any] | None]]]
    starters = {"tensorboard": TensorBoard.start, "wandb": Wandb.start, "mlflow": Mlflow.start}
    return starters[name](plan, saved)


class TensorBoard:
    def __init__(self, writer: Any) -> None:
        self.writer = writer

    @classmethod
    def start(cls, plan: Plan, saved: dict[str, Any] | None) -> tuple[Tracker, str, None]:
        from torch.utils.tensorboard import SummaryWriter

        return cls(SummaryWriter(log_dir=str(RunDir.from_plan(plan).tensorboard))), "", None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def event(self, step: int, event: str, message: str) -> None:
        pass  # TensorBoard's scalars have no place for them; metrics.jsonl has them

    def close(self, outcome: Outcome) -> None:
        self.writer.close()


# --------------------------------------------------------------------------- W&B


def wandb_mode(
    setting: str, env: Mapping[str, str], credentials: Callable[[], bool], reachable: Callable[[], bool]
) -> tuple[str, str]:
    """The mode a W&B run starts in, and why (for the console line).

    auto: WANDB_MODE when set; else online only with credentials and a W&B host that answers,
    else offline. The host is asked only when there are credentials.
    """
    if setting != "auto":
        return setting, f"{setting} (logging.wandb.mode)"
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"], f"{env['WANDB_MODE']} (WANDB_MODE)"
    if not credentials():
        return "offline", "offline (no W&B credentials: WANDB_API_KEY or `wandb login`)"
    if not reachable():
        return "offline", f"offline ({wandb_host(env)} did not answer)"
    return "online", "online"


def wandb_host(env: Mapping[str, str]) -> str:
    return urlparse(env.get("WANDB_BASE_URL") or f"https://{WANDB_HOST}").hostname or WANDB_HOST


def wandb_credentials(env: Mapping[str, str]) -> bool:
    """WANDB_API_KEY, or a netrc entry for the W&B host (what `wandb login` writes)."""
    if env.get("WANDB_API_KEY"):
        return True
    import netrc

    path = env.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(wandb_host(env)) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def reachable(host: str, port: int = 443, timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


class Wandb:
    """A W&B run: the series against W&B's own `step` series, so a step logged again is kept."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self.events: list[list[Any]] = []

    @classmethod
    def start(cls, plan: Plan, saved: dict[str, Any] | None) -> tuple[Tracker, str, dict[str, Any]]:
        logging.getLogger("wandb").setLevel(logging.ERROR)
        import wandb

        s = plan.recipe.logging.wandb
        env = os.environ
        mode, why = wandb_mode(
            s.mode, env, lambda: wandb_credentials(env), lambda: reachable(wandb_host(env))
        )
        files = RunDir.from_plan(plan)
        handoff = json.loads(plan.to_json())
        run = wandb.init(
            project=s.project,
            entity=s.entity,
            name=s.name or plan.recipe.name,
            tags=s.tags or None,
            group=sweep.name if (sweep := sweep_of(files)) else None,
            dir=str(files.path),
            id=(saved or {}).get("id"),
            resume="allow",
            mode=mode,  # type: ignore[arg-type]
            config={"recipe": handoff["recipe"], "plan": handoff["plan"]},
            allow_val_change=True,  # a resumed run's recipe may differ (train.max_steps, say)
            settings=wandb.Settings(
                silent=True, console="off", init_timeout=60, x_disable_stats=mode != "online"
            ),
        )
        run.define_metric("step", hidden=True)
        run.define_metric("*", step_metric="step")
        where = Path(run.dir).parent
        line = f"mplaunch: W&B run {run.id}, {why}, in {where}"
        if run.offline:
            line += f"; upload it with: wandb sync {where}"
        else:
            line += f": {run.url}"
        return cls(run), line, {"id": run.id, "project": s.project, "entity": s.entity}

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({"step": step, **scalars})

    def event(self, step: int, event: str, message: str) -> None:
        self.events.append([step, event, message])
        self.run.log({"step": step, f"events/{event}": 1})

    def close(self, outcome: Outcome) -> None:
        if self.events:
            import wandb

            self.run.log({"events": wandb.Table(columns=["step", "event", "message"], data=self.events)})
        self.run.finish(exit_code=0 if outcome != "failed" else 1)


# --------------------------------------------------------------------------- MLflow


def sweep_of(files: RunDir) -> Path | None:
    """SWEEP_DIR when the run is a point of a sweep (`mplaunch sweep`: SWEEP_DIR/sweep.json beside it)."""
    parent = files.path.resolve().parent
    return parent if (parent / SWEEP_FILE).is_file() else None


def mlflow_uri(setting: str | None, env: Mapping[str, str], files: RunDir) -> str:
    """logging.mlflow.tracking_uri, else MLFLOW_TRACKING_URI, else the local store RUN_DIR/mlruns
    (SWEEP_DIR/mlruns for a sweep's runs, so one store and one experiment hold them all)."""
    local = sweep_of(files) or files.path
    return setting or env.get("MLFLOW_TRACKING_URI") or (local / "mlruns").resolve().as_uri()


class Mlflow:
    """An MLflow run: metrics in batches (asynchronous on a server: one batch in flight at most)."""

    STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}

    def __init__(self, client: Any, run_id: str, remote: bool) -> None:
        self.client = client
        self.run_id = run_id
        self.remote = remote
        self.pending: Any = None
        self.events: list[str] = []

    @classmethod
    def start(cls, plan: Plan, saved: dict[str, Any] | None) -> tuple[Tracker, str, dict[str, Any]]:
        files = RunDir.from_plan(plan)
        s = plan.recipe.logging.mlflow
        uri = mlflow_uri(s.tracking_uri, os.environ, files)
        local = urlparse(uri).scheme in ("", "file")
        for key, value in MLFLOW_HTTP.items():
            os.environ.setdefault(key, value)
        if local:  # MLflow 3 keeps its file store only on request; mlflow-skinny has no database store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        logging.getLogger("mlflow").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module=r"mlflow(\.|$)")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        sweep = sweep_of(files)
        experiment = s.experiment or (sweep.name if sweep else plan.recipe.name)
        if saved and saved.get("tracking_uri") == uri and saved.get("run_id"):
            run_id, experiment_id = str(saved["run_id"]), str(saved.get("experiment_id"))
            client.update_run(run_id, status="RUNNING")
        else:
            experiment_id = _experiment_id(client, experiment)
            run = client.create_run(experiment_id, run_name=plan.recipe.name, tags=dict(s.tags))
            run_id = run.info.run_id
            _log_setup(client, run_id, plan, files)  # params once: MLflow refuses to change one
        line = f"mplaunch: MLflow run {run_id} in {uri} (experiment {experiment})"
        saved_now = {"run_id": run_id, "tracking_uri": uri, "experiment_id": experiment_id}
        return cls(client, run_id, not local), line, saved_now

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._send([Metric(key, value, now, step) for key, value in scalars.items()])

    def _send(self, metrics: list[Any]) -> None:
        if not self.remote:
            self.client.log_batch(self.run_id, metrics=metrics)
            return
        if self.pending is not None:  # the last interval's batch: raises if it failed
            self.pending.wait()
        self.pending = self.client.log_batch(self.run_id, metrics=metrics, synchronous=False)

    def event(self, step: int, event: str, message: str) -> None:
        from mlflow.entities import Metric

        self.events.append(f"step {step}: {event}: {message}")
        self._send([Metric(f"events/{event}", 1.0, int(time.time() * 1000), step)])

    def close(self, outcome: Outcome) -> None:
        if self.pending is not None:
            self.pending.wait()
        if self.events:
            earlier = _artifact_text(self.client, self.run_id, "events.txt")
            self.client.log_text(self.run_id, earlier + "".join(f"{e}\n" for e in self.events), "events.txt")
        self.client.set_terminated(self.run_id, self.STATUS[outcome])


def _experiment_id(client: Any, name: str) -> str:
    """The experiment's id, created if missing; a sweep's points starting at once may race to create it."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name))
    except Exception:  # another point created it first: it exists now
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


def _log_setup(client: Any, run_id: str, plan: Plan, files: RunDir) -> None:
    """The flattened recipe as params (dotted keys), recipe.yaml and plan.json as artifacts."""
    from mlflow.entities import Param

    params = [
        Param(k, v[:PARAM_VALUE_LIMIT]) for k, v in params_of(json.loads(plan.to_json())["recipe"]).items()
    ]
    for i in range(0, len(params), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[i : i + PARAMS_PER_BATCH])
    for path in (files.recipe_file, files.plan_file):
        if path.is_file():
            client.log_artifact(run_id, str(path))


def params_of(recipe: dict[str, Any]) -> dict[str, str]:
    """MLflow's params of a recipe: {"train": {"max_steps": 6}} -> {"train.max_steps": "6"}; lists and
    empty sections as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in flatten(recipe).items()}


def _artifact_text(client: Any, run_id: str, name: str) -> str:
    """An artifact's text ("" when the run has none yet: its first start)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return Path(client.download_artifacts(run_id, name, tmp)).read_text()
        except Exception:
            return ""
