"""logging.trackers with the real packages: a W&B offline run and an MLflow local-store run of the
tiny recipe record the loss series metrics.jsonl records, a resumed run continues the same tracker
runs, and a tracker that fails never stops training."""

from __future__ import annotations

import json
import os
import signal
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.runs import FAST, mplaunch, start, wait_for_step, write_recipe

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


def _env() -> dict[str, str]:
    """No W&B credentials and no W&B or MLflow settings of this machine: logging.wandb.mode auto goes
    offline without asking the network, and MLflow's store is the run directory's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    return {**env, "NETRC": "/nonexistent", "MLFLOW_ALLOW_FILE_STORE": "true"}


def _run(recipe: Path, *overrides: str) -> str:
    out = mplaunch(str(recipe), *overrides, env=_env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def _records(run: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run, "train")}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run of 3 steps with both trackers, then the same run directory again to step 6."""
    tmp = tmp_path_factory.mktemp("trackers")
    recipe = write_recipe(
        tmp, "tracked", FAST, {"train": {"max_steps": 3}, "logging": {"trackers": ["wandb", "mlflow"]}}
    )
    first = _run(recipe)
    run = tmp / "runs" / "tracked"
    ids_first = json.loads((run / "trackers.json").read_text())
    second = _run(recipe, "train.max_steps=6")
    return {"run": run, "first": first, "second": second, "ids_first": ids_first}


# --------------------------------------------------------------------------- W&B offline


def _wandb_records(path: Path) -> Iterator[Any]:
    """The records of a W&B transaction log (.wandb): a LevelDB-style log of protobuf Records in
    32 KiB blocks, after a 7-byte header (":W&B", magic 0xBEE1, version)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, header = path.read_bytes(), 32768, 7
    ident, magic, _ = struct.unpack("<4sHB", data[:header])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, parts = header, b""
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if length == 0 and kind == 0:
            pos += left
            continue
        parts += data[pos + header : pos + header + length]
        pos += header + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def _wandb_history(run: Path, run_id: str) -> tuple[list[dict[str, Any]], list[Any]]:
    rows, runs = [], []
    for log in sorted(run.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        for record in _wandb_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                )
            elif kind == "run":
                runs.append(record.run)
    return rows, runs


def test_a_wandb_offline_run_records_metrics_jsonls_loss_and_a_resume_continues_it(
    resumed: dict[str, Any],
) -> None:
    run, ids = resumed["run"], json.loads((resumed["run"] / "trackers.json").read_text())
    run_id = ids["wandb"]["id"]
    assert resumed["ids_first"]["wandb"]["id"] == run_id
    assert len(list(run.glob(f"wandb/offline-run-*-{run_id}"))) == 2  # one per start, the same run id
    assert f"W&B run {run_id}, offline (no W&B credentials" in resumed["first"]
    assert f"wandb sync {run}/wandb/offline-run-" in resumed["first"]
    rows, runs = _wandb_history(run, run_id)
    logged = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert logged == _losses(run)
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    assert {r.project for r in runs} == {"mplaunch"}
    assert {r.display_name for r in runs} == {"tracked"}
    config = {u.key: json.loads(u.value_json) for r in runs[:1] for u in r.config.update}
    assert config["recipe"]["train"]["max_steps"] == 3
    assert config["plan"]["nproc_per_node"] == 2
    assert any("train/lr" in r and "train/tokens_per_s" in r for r in rows)
    assert any(r.get("events/finish") == 1 and r["step"] == 6 for r in rows)


# --------------------------------------------------------------------------- MLflow local store


def test_an_mlflow_local_run_records_metrics_jsonls_loss_and_a_resume_continues_it(
    resumed: dict[str, Any],
) -> None:
    from mlflow.tracking import MlflowClient

    run = resumed["run"]
    saved = json.loads((run / "trackers.json").read_text())["mlflow"]
    assert saved == resumed["ids_first"]["mlflow"]
    assert saved["tracking_uri"] == (run / "mlruns").resolve().as_uri()
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        client = MlflowClient(tracking_uri=saved["tracking_uri"])
        history = client.get_metric_history(saved["run_id"], "train/loss")
        found = client.get_run(saved["run_id"])
        artifacts = {a.path for a in client.list_artifacts(saved["run_id"])}
        events = Path(client.download_artifacts(saved["run_id"], "events.txt", str(run))).read_text()
    finally:
        del os.environ["MLFLOW_ALLOW_FILE_STORE"]
    assert {m.step: m.value for m in history} == _losses(run)
    assert len(history) == 6
    assert found.info.status == "FINISHED"
    assert found.data.params["train.max_steps"] == "3"  # params are the first start's, logged once
    assert found.data.params["logging.trackers"] == '["wandb", "mlflow"]'
    assert {"recipe.yaml", "plan.json", "events.txt"} <= artifacts
    assert "finished 3 steps" in events
    assert "finished 6 steps" in events
    assert (
        f"MLflow run {saved['run_id']} in {saved['tracking_uri']} (experiment tracked)" in resumed["second"]
    )


# --------------------------------------------------------------------------- failure


def test_an_mlflow_server_that_is_down_warns_once_and_training_goes_on(tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        "down",
        FAST,
        {
            "train": {"max_steps": 2},
            "logging": {"trackers": ["mlflow"], "mlflow": {"tracking_uri": "http://127.0.0.1:9"}},
        },
    )
    out = _run(recipe)
    run = tmp_path / "runs" / "down"
    assert out.count("MLflow failed") == 1, out
    assert "training goes on" in out
    (failed,) = [r for r in _records(run, "event") if r["event"] == "tracker_failed"]
    assert failed["tracker"] == "mlflow"
    assert "127.0.0.1" in failed["cause"]
    assert sorted(_losses(run)) == [1, 2]
    assert any(r["event"] == "finish" for r in _records(run, "event"))
    assert not (run / "trackers.json").exists()


# --------------------------------------------------------------------------- a stop by signal


def test_a_run_stopped_by_sigterm_and_resumed_continues_the_same_tracker_runs(tmp_path: Path) -> None:
    """SIGTERM (as `kill` or a scheduler sends it): the workers checkpoint, the MLflow run ends KILLED and
    W&B's finishes; the restart continues both runs and their loss series matches metrics.jsonl's."""
    from mlflow.tracking import MlflowClient

    recipe = write_recipe(
        tmp_path,
        "stopped",
        FAST,
        {
            "train": {"max_steps": 10_000},  # cannot finish before the signal, however slow the machine
            "scheduler": {"name": "constant"},
            "checkpoint": {"every_steps": 2},
            "logging": {"trackers": ["wandb", "mlflow"]},
        },
    )
    run = tmp_path / "runs" / "stopped"
    proc = start(str(recipe), env=_env())
    wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    (stop,) = [r for r in _records(run, "event") if r["event"] == "stop"]
    ids = json.loads((run / "trackers.json").read_text())
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        client = MlflowClient(tracking_uri=ids["mlflow"]["tracking_uri"])
        assert client.get_run(ids["mlflow"]["run_id"]).info.status == "KILLED"
        end = stop["step"] + 2
        out = _run(recipe, f"train.max_steps={end}")
        assert f"resuming from step {stop['step']}" in out
        assert json.loads((run / "trackers.json").read_text()) == ids
        history = client.get_metric_history(ids["mlflow"]["run_id"], "train/loss")
        assert client.get_run(ids["mlflow"]["run_id"]).info.status == "FINISHED"
    finally:
        del os.environ["MLFLOW_ALLOW_FILE_STORE"]
    losses = _losses(run)  # the resumed steps' records, after the stopped start's
    assert sorted(losses) == list(range(1, end + 1))
    assert {m.step: m.value for m in history} == losses
    rows, _ = _wandb_history(run, ids["wandb"]["id"])
    assert {r["step"]: r["train/loss"] for r in rows if "train/loss" in r} == losses
    assert len(list(run.glob(f"wandb/offline-run-*-{ids['wandb']['id']}"))) == 2
