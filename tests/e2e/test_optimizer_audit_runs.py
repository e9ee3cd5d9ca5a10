"""The optimizer audit in a real 2-rank run: DeepSpeed ZeRO 0 in bf16, whose 16-bit optimizer stepped
Adam once when it was built before mplaunch undid it, trains with the counters of the steps taken."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launcher.analysis.health import AUDIT_EVENTS
from tests.runs import FAST, explain, mplaunch, records, write_recipe

pytestmark = pytest.mark.slow


def test_zero0_bf16_run_has_no_audit_event_and_counts_its_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = write_recipe(
        tmp_path,
        "z0-bf16",
        FAST,
        {
            "backend": "deepspeed",
            "zero": {"stage": 0},
            "precision": {"dtype": "bf16"},
            "checkpoint": {"every_steps": 3},
        },
    )
    result = mplaunch(str(recipe))
    assert result.returncode == 0, explain(result)
    run_dir = tmp_path / "runs" / "z0-bf16"
    events = [e["event"] for e in records(run_dir, "event")]
    assert "checkpoint" in events  # the audit ran at the checkpoints of steps 3 and 6, and at step 1
    assert not set(events) & set(AUDIT_EVENTS), [
        e for e in records(run_dir, "event") if e["event"] in AUDIT_EVENTS
    ]

    # The checkpoint holds Adam's counters of the 6 steps taken (7 before the fix).
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # unpickling DeepSpeed's optimizer state imports deepspeed
    (saved,) = (run_dir / "checkpoints").glob("step-*6/deepspeed/mp_rank_00_model_states.pt")
    state = torch.load(saved, map_location="cpu", weights_only=False)["optimizer"]["optimizer_state_dict"][
        "state"
    ]
    assert {int(s["step"]) for s in state.values()} == {6}
