"""The worker's console while the launcher draws the progress bar."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from launcher.run import progress
from tests.runs import train_record


def test_console_is_quiet_per_interval_while_the_launcher_draws(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from launcher.worker.metrics import Console

    plan = SimpleNamespace(
        recipe=SimpleNamespace(train=SimpleNamespace(max_steps=10)),
        precision=SimpleNamespace(loss_scale=None),
    )
    Console(plan).show(train_record())  # type: ignore[arg-type]
    assert capsys.readouterr().out == "step 4/10 | loss 2.5000 | 1,234.5 samples/s | eta 0:03\n"
    monkeypatch.setenv(progress.ENV, progress.LAUNCHER)
    console = Console(plan)  # type: ignore[arg-type]
    console.show(train_record())
    console.note("step 5: eval loss 2.4000")
    assert capsys.readouterr().out == "step 5: eval loss 2.4000\n"
