"""Rank 0's trackers (launcher.worker.trackers): the series each receives, the run's outcome at the
end, and a tracker that fails (at start, in a log call, at the end) turned off with one warning and a
`tracker_failed` event while the others and metrics.jsonl go on; with the real W&B (offline) too."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from launcher.plan.hardware import Hardware
from launcher.plan.resolve import Plan, resolve
from launcher.recipe.schema import to_dict, validate
from launcher.rundir.layout import RunDir
from launcher.worker import tracker_clients, trackers
from launcher.worker import tracker_clients as tc
from launcher.worker.metrics import Meter


def _plan(tmp_path: Path, *names: str, **logging: Any) -> Plan:
    raw = {
        "name": "t",
        "model": {"name": "tiny-mlp"},
        "backend": "accelerate",
        "train": {"micro_batch_size": 4, "max_steps": 4},
        "precision": {"dtype": "fp32"},
        "launch": {"device": "cpu", "nproc_per_node": 1},
        "logging": {"dir": str(tmp_path), "trackers": list(names), "progress": False, **logging},
    }
    plan = resolve(validate(raw, "test"), Hardware(cpu_count=4))
    Path(plan.run_dir).mkdir(parents=True)
    return plan


class Fake:
    """A tracker that records what it gets and raises where told."""

    def __init__(self, fail_at: str | None = None) -> None:
        self.fail_at = fail_at
        self.got: list[tuple[Any, ...]] = []

    def _maybe(self, what: str) -> None:
        if self.fail_at == what:
            raise ConnectionError(f"{what} refused\nsecond line of a long server reply")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._maybe("log")
        self.got.append(("log", step, scalars))

    def event(self, step: int, event: str, message: str) -> None:
        self._maybe("event")
        self.got.append(("event", step, event))

    def close(self, outcome: str) -> None:
        self.got.append(("close", outcome))
        self._maybe("close")


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> dict[str, Fake]:
    made: dict[str, Fake] = {}

    def start(name: str, plan: Plan, saved: dict[str, Any] | None) -> tuple[Fake, str, dict[str, Any]]:
        if name == "mlflow" and os.environ.get("TEST_TRACKER_START_FAILS"):
            raise RuntimeError("no server")
        made[name] = Fake(os.environ.get(f"TEST_{name.upper()}_FAILS"))
        return made[name], f"started {name}", {"id": f"{name}-1", "saved": saved}

    monkeypatch.setattr(tracker_clients, "start", start)
    return made


def _train(step: int, loss: float) -> dict[str, Any]:
    return {"kind": "train", "step": step, "loss": loss, "lr": 0.1, "grad_norm": None, "tokens_per_s": 9.0}


def _events(plan: Plan) -> list[dict[str, Any]]:
    lines = (Path(plan.run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "event"]


def test_every_tracker_gets_the_series_and_the_finish(
    tmp_path: Path, fakes: dict[str, Fake], capsys: pytest.CaptureFixture[str]
) -> None:
    plan = _plan(tmp_path, "wandb", "mlflow")
    meter = Meter(plan, True, 0)
    meter.write(_train(1, 2.5))
    meter.eval(1, {"eval_loss": 2.0, "eval_labels": 10})
    meter.event(2, "finish", "finished 2 steps")
    meter.close()
    for fake in fakes.values():
        assert fake.got == [
            ("log", 1, {"train/loss": 2.5, "train/lr": 0.1, "train/tokens_per_s": 9.0}),
            ("log", 1, {"eval/eval_loss": 2.0}),
            ("event", 2, "finish"),
            ("close", "finished"),
        ]
    out = capsys.readouterr().out
    assert "started wandb" in out
    assert "started mlflow" in out
    saved = json.loads((Path(plan.run_dir) / "trackers.json").read_text())
    assert saved == {"wandb": {"id": "wandb-1", "saved": None}, "mlflow": {"id": "mlflow-1", "saved": None}}
    Meter(plan, True, 2).close()  # a second start is handed what the first saved, and ends as failed
    assert fakes["wandb"].got == [("close", "failed")]


@pytest.mark.parametrize("where", ["log", "event", "close"])
def test_a_tracker_that_fails_is_off_with_one_warning_and_the_others_go_on(
    tmp_path: Path,
    fakes: dict[str, Fake],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    where: str,
) -> None:
    monkeypatch.setenv("TEST_WANDB_FAILS", where)
    plan = _plan(tmp_path, "wandb", "mlflow")
    meter = Meter(plan, True, 0)
    for step in (1, 2, 3):
        meter.event(step, "warning", "warning: something")
        meter.write(_train(step, 1.0 / step))
    meter.event(3, "stop", "stopped at step 3")
    meter.close()
    out = capsys.readouterr().out
    assert out.count("W&B failed") == 1
    (failed,) = [e for e in _events(plan) if e["event"] == trackers.FAILED_EVENT]
    assert failed["tracker"] == "wandb"
    assert failed["cause"] == f"ConnectionError: {where} refused"
    assert failed["step"] == (3 if where == "close" else 1)
    train = [json.loads(line) for line in (Path(plan.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train if r["kind"] == "train"] == [1, 2, 3]
    assert fakes["mlflow"].got[-1] == ("close", "stopped")
    assert len([g for g in fakes["mlflow"].got if g[0] == "log"]) == 3
    assert ("event", failed["step"], trackers.FAILED_EVENT) in fakes["mlflow"].got
    wandb_calls = [g[0] for g in fakes["wandb"].got]
    assert wandb_calls[-1] == "close"
    assert wandb_calls.count("close") == 1


def test_a_tracker_that_cannot_start_is_off_and_the_others_start(
    tmp_path: Path,
    fakes: dict[str, Fake],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TEST_TRACKER_START_FAILS", "1")
    plan = _plan(tmp_path, "wandb", "mlflow")
    meter = Meter(plan, True, 0)
    meter.write(_train(1, 1.0))
    meter.close()
    assert (
        "MLflow failed and is off for the rest of the run (RuntimeError: no server)"
        in capsys.readouterr().out
    )
    assert [g[0] for g in fakes["wandb"].got] == [
        "event",
        "log",
        "close",
    ]  # started first, it heard of the failure
    assert list(json.loads((Path(plan.run_dir) / "trackers.json").read_text())) == ["wandb"]


def test_other_ranks_start_no_tracker(tmp_path: Path, fakes: dict[str, Fake]) -> None:
    Meter(_plan(tmp_path, "wandb"), False, 0).close()
    assert fakes == {}


def test_the_series_are_tensorboards_names() -> None:
    record = {"kind": "precision", "step": 5, "layers": {"a": {"underflow": 0.1}, "b": {"underflow": 0.3}}}
    assert trackers.series(record) == {"precision/max_underflow": 0.3}
    assert trackers.series({"kind": "event", "step": 1}) == {}
    assert trackers.series({"kind": "train", "step": 1, "loss": 1, "mfu": None}) == {"train/loss": 1.0}


# --------------------------------------------------------------------------- W&B mode, MLflow store


def _mode(setting: str, env: dict[str, str], credentials: bool, reachable: bool) -> tuple[str, list[str]]:
    asked: list[str] = []

    def creds() -> bool:
        asked.append("credentials")
        return credentials

    def host() -> bool:
        asked.append("host")
        return reachable

    mode, why = tc.wandb_mode(setting, env, creds, host)
    assert mode in why
    return mode, asked


@pytest.mark.parametrize(
    ("setting", "env", "credentials", "reachable", "mode", "asked"),
    [
        ("online", {"WANDB_MODE": "offline"}, False, False, "online", []),  # the recipe wins
        ("offline", {}, True, True, "offline", []),
        ("auto", {"WANDB_MODE": "offline"}, True, True, "offline", []),
        ("auto", {"WANDB_MODE": "online"}, False, False, "online", []),
        ("auto", {}, False, True, "offline", ["credentials"]),  # no credentials: the network is not asked
        ("auto", {}, True, False, "offline", ["credentials", "host"]),
        ("auto", {}, True, True, "online", ["credentials", "host"]),
    ],
)
def test_wandb_mode(
    setting: str, env: dict[str, str], credentials: bool, reachable: bool, mode: str, asked: list[str]
) -> None:
    assert _mode(setting, env, credentials, reachable) == (mode, asked)


def test_wandb_credentials_are_an_api_key_or_a_netrc_entry_for_the_wandb_host(tmp_path: Path) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai login user password secret\n")
    netrc.chmod(0o600)
    assert tc.wandb_credentials({"WANDB_API_KEY": "k", "NETRC": str(tmp_path / "none")})
    assert tc.wandb_credentials({"NETRC": str(netrc)})
    assert not tc.wandb_credentials({"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.org"})
    assert not tc.wandb_credentials({"NETRC": str(tmp_path / "none")})


def test_an_unreachable_host_is_known_quickly() -> None:
    assert not tc.reachable("127.0.0.1", port=9, timeout_s=1.0)


def test_the_mlflow_store_is_the_recipes_then_the_environments_then_the_run_directorys(
    tmp_path: Path,
) -> None:
    files = RunDir.of(tmp_path / "run")
    assert (
        tc.mlflow_uri("http://server:5000", {"MLFLOW_TRACKING_URI": "http://env"}, files)
        == "http://server:5000"
    )
    assert tc.mlflow_uri(None, {"MLFLOW_TRACKING_URI": "http://env"}, files) == "http://env"
    assert tc.mlflow_uri(None, {}, files) == (tmp_path / "run" / "mlruns").resolve().as_uri()


def test_a_sweeps_runs_share_one_mlflow_store_and_are_grouped_by_the_sweep(tmp_path: Path) -> None:
    point = RunDir.of(tmp_path / "lr-sweep" / "lr-1e-3")
    assert tc.sweep_of(point) is None  # a plain run
    (tmp_path / "lr-sweep").mkdir()
    (tmp_path / "lr-sweep" / "sweep.json").write_text("{}")
    assert tc.sweep_of(point) == (tmp_path / "lr-sweep").resolve()
    assert tc.mlflow_uri(None, {}, point) == (tmp_path / "lr-sweep" / "mlruns").resolve().as_uri()
    assert tc.mlflow_uri(None, {"MLFLOW_TRACKING_URI": "http://env"}, point) == "http://env"


def test_mlflow_params_are_the_flattened_recipe() -> None:
    flat = tc.params_of(to_dict(validate({"name": "t", "logging": {"trackers": ["mlflow"]}}, "test")))
    assert flat["train.max_steps"] == "1000"
    assert flat["logging.trackers"] == '["mlflow"]'
    assert flat["name"] == "t"
    assert flat["model.kwargs"] == "{}"
    assert all(isinstance(v, str) for v in flat.values())


# --------------------------------------------------------------------------- the real W&B, offline


def test_a_wandb_log_that_raises_never_stops_the_meter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("wandb")
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    plan = _plan(tmp_path, "wandb", wandb={"mode": "offline"})
    meter = Meter(plan, True, 0)
    assert meter.trackers is not None
    run = meter.trackers.on["wandb"].run  # type: ignore[attr-defined]
    meter.write(_train(1, 2.0))

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("the W&B service went away")

    monkeypatch.setattr(run, "log", broken)
    meter.write(_train(2, 1.5))
    meter.write(_train(3, 1.0))
    meter.close()
    import wandb

    wandb.teardown()  # the service process the run started, and the variable naming it
    os.environ.pop("WANDB_SERVICE", None)
    out = capsys.readouterr().out
    assert (
        out.count("W&B failed and is off for the rest of the run (OSError: the W&B service went away)") == 1
    )
    assert "W&B run" in out
    assert "offline (logging.wandb.mode)" in out
    assert meter.trackers.on == {}
    lines = (Path(plan.run_dir) / "metrics.jsonl").read_text().splitlines()
    assert [r["step"] for r in map(json.loads, lines) if r["kind"] == "train"] == [1, 2, 3]
