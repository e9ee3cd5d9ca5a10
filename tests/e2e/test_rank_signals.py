"""Signals that reach one rank, or the launcher twice: each ends in one line naming what happened.

Real 2-rank CPU runs, as a user (or the OOM killer, or a scheduler) would see them: a rank killed
by SIGKILL is named with its signal rather than its peer's lost connection; a SIGTERM to one rank
stops the run at a checkpoint and the launcher exits 128 + 15 naming the rank; a second Ctrl-C
during a checkpoint says it abandoned it, records it, and the next start removes what it left.
Every signal is sent only once the run has recorded a step, so a slow machine only makes them wait.
The pieces they rest on (reading torchrun's summary, the wording) are checked alone first.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from launcher.run.progress import WorkerExits, killed_by
from launcher.rundir.layout import is_secondary
from launcher.worker.ranks import StopRequest, describe_signals
from tests.runs import FAST, FAST_USER_MODEL, explain, mplaunch, records, start, wait_for_step, write_recipe

# Trains far longer than any test waits, at a constant learning rate: only a signal ends it.
ENDLESS = {"train": {"max_steps": 100_000}, "scheduler": {"name": "constant"}}
WAIT_S = 600  # for a step, or for the run to end, on a loaded machine

# A user model whose checkpoints take a minute once it has trained `fast_micro_batches` micro-batches.
SLOW_SAVE_MODEL = """
import time

from torch import nn


class SlowSave(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, fast_micro_batches: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.head = nn.Linear(hidden, vocab_size)
        self.fast, self.calls = fast_micro_batches, 0

    def forward(self, input_ids, labels):
        self.calls += self.training
        logits = self.head(self.embed(input_ids))
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)

    def state_dict(self, *args, **kwargs):
        if self.calls > self.fast:
            time.sleep(60)
        return super().state_dict(*args, **kwargs)


def build(vocab_size: int = 512, hidden: int = 32, fast_micro_batches: int = 0) -> nn.Module:
    return SlowSave(vocab_size, hidden, fast_micro_batches)
"""


# What torchrun 2.x prints on stderr when a worker fails (torch.distributed.elastic's ChildFailedError).
TORCHRUN_SUMMARY = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
launcher.worker.train FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-06_22:49:42
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 32570)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 32570
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-06_22:49:42
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 32569)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""


def test_torchruns_summary_gives_the_ranks_a_signal_killed() -> None:
    exits = WorkerExits()
    for line in TORCHRUN_SUMMARY.splitlines(keepends=True):
        exits.read(line)
    assert exits.killed() == {1: "killed by SIGKILL (out of memory?)"}  # torchrun's "root cause" is rank 0


def test_a_kill_is_a_cause_and_an_abort_a_likely_consequence() -> None:
    assert not is_secondary(killed_by(signal.SIGKILL))
    assert not is_secondary(killed_by(signal.SIGSEGV))
    assert is_secondary(killed_by(signal.SIGABRT))  # NCCL and gloo abort a rank whose peer left
    assert killed_by(99) == "killed by signal 99"


@pytest.mark.parametrize(
    ("signals", "world", "said"),
    [
        ({1: signal.SIGTERM}, 2, "rank 1 got SIGTERM"),
        ({0: signal.SIGINT, 1: signal.SIGINT}, 2, "every rank got SIGINT"),
        ({0: signal.SIGINT, 1: signal.SIGINT}, 4, "ranks 0 and 1 got SIGINT"),
        ({0: 15, 3: 15, 2: 10}, 4, "ranks 0 and 3 got SIGTERM; rank 2 got SIGUSR1"),
        (dict.fromkeys(range(6), signal.SIGUSR1), 8, "6 ranks (0, 1, 2, ...) got SIGUSR1"),
    ],
)
def test_a_stop_names_which_ranks_got_which_signal(signals: dict[int, int], world: int, said: str) -> None:
    assert describe_signals(signals, world) == said


AGAIN = "running the same recipe again"
AT_ONCE = "stopped the run at once, with no checkpoint in progress"


@pytest.mark.parametrize(
    ("first", "saving", "sealed", "said"),
    [
        (2, 6, [2, 4], f"a second Ctrl-C (SIGINT) abandoned the checkpoint of step 6 in progress; {AGAIN} resumes from step 4"),
        (2, None, [], f"a second Ctrl-C (SIGINT) {AT_ONCE}; {AGAIN} starts from step 0 (no checkpoint was saved)"),
        (15, 6, [2, 4, 6], f"a Ctrl-C (SIGINT) after SIGTERM {AT_ONCE}; {AGAIN} resumes from step 6"),
    ],
)  # fmt: skip
def test_a_second_ctrl_c_says_what_it_abandoned(
    first: int, saving: int | None, sealed: list[int], said: str
) -> None:
    stop = object.__new__(StopRequest)  # no handlers installed in the test process
    stop.signal, stop.saving = first, saving
    assert stop.describe_at_once(sealed) == said


def _worker_pid(run_dir: Path, rank: int) -> int:
    """The pid of `rank`'s worker, from its heartbeat (written after every step)."""
    beat = json.loads((run_dir / "logs" / f"rank-{rank}.heartbeat").read_text())
    assert beat["rank"] == rank, beat
    return int(beat["pid"])


def _events(run_dir: Path, name: str) -> list[dict[str, Any]]:
    return [e for e in records(run_dir, "event") if e["event"] == name]


@pytest.mark.slow
def test_a_rank_killed_by_sigkill_is_named_with_its_signal(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "killed", FAST, ENDLESS)
    run_dir = tmp_path / "runs" / "killed"
    proc = start(str(recipe))
    try:
        wait_for_step(run_dir, 2, proc, timeout=WAIT_S)
        os.kill(_worker_pid(run_dir, 1), signal.SIGKILL)  # as the OOM killer does
        out, err = proc.communicate(timeout=WAIT_S)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    headline = "the run failed on rank-1: killed by SIGKILL (out of memory?)"
    failed = [line for line in err.splitlines() if "the run failed" in line]
    assert failed == [f"mplaunch: {headline}"], err  # not rank 0's "Connection reset by peer"
    assert "Traceback" not in err
    assert [e["message"] for e in _events(run_dir, "error")] == [headline]
    assert (run_dir / "logs" / "rank-1.err").read_text().startswith("killed by SIGKILL (out of memory?)\n")


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_at_a_checkpoint_and_exits_143_naming_the_rank(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "termed", FAST, ENDLESS)
    run_dir = tmp_path / "runs" / "termed"
    proc = start(str(recipe))
    try:
        wait_for_step(run_dir, 2, proc, timeout=WAIT_S)
        os.kill(_worker_pid(run_dir, 1), signal.SIGTERM)  # a scheduler or `kill` aimed at one process
        out, err = proc.communicate(timeout=WAIT_S)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    stops = _events(run_dir, "stop")
    assert len(stops) == 1, (out, err)
    step = stops[0]["step"]
    said = f"stopped at step {step}: rank 1 got SIGTERM; checkpoint saved, run again to resume"
    assert stops[0]["message"] == said
    assert stops[0]["signals"] == {"1": "SIGTERM"}
    assert said in out.splitlines(), out
    assert (run_dir / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file()
    assert not (run_dir / "FINISHED").exists()


@pytest.mark.slow
def test_a_second_ctrl_c_during_a_checkpoint_says_it_abandoned_it_and_the_next_start_cleans_up(
    tmp_path: Path,
) -> None:
    (tmp_path / "slow_save_model.py").write_text(SLOW_SAVE_MODEL)  # beside the recipe: its import path
    # Checkpoints every 2 steps; step 2's (2 steps x 2 micro-batches per rank) is quick, later ones slow.
    kwargs = {"vocab_size": 512, "fast_micro_batches": 4}
    recipe = write_recipe(
        tmp_path,
        "twice",
        FAST_USER_MODEL,
        ENDLESS,
        {
            "model": {"name": None, "target": "slow_save_model:build", "kwargs": kwargs},
            "data": {"kind": "synthetic", "paths": [], "num_samples": 512},
            "checkpoint": {"every_steps": 2, "keep": 2},
        },
    )
    run_dir = tmp_path / "runs" / "twice"
    checkpoints = run_dir / "checkpoints"
    proc = start(str(recipe))
    try:
        wait_for_step(run_dir, 3, proc, timeout=WAIT_S)  # step 2's checkpoint is sealed by now
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + WAIT_S
        while not (saving := list(checkpoints.glob(".tmp-step-*"))) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)  # the impatient second Ctrl-C, a minute before the save would end
        out, err = proc.communicate(timeout=WAIT_S)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, (out, err)
    [in_progress] = saving
    sealed = max(int(p.name.rsplit("-", 1)[1]) for p in checkpoints.glob("step-*"))
    said = (
        f"a second Ctrl-C (SIGINT) abandoned the checkpoint of step {int(in_progress.name[-8:])} in progress; "
        f"running the same recipe again resumes from step {sealed}"
    )
    assert [line for line in err.splitlines() if "Ctrl-C (SIGINT)" in line and "asking" not in line] == [
        f"mplaunch: {said}"
    ], err
    assert "Traceback" not in err
    assert [e["message"] for e in _events(run_dir, "interrupted")] == [said]

    # The abandoned save removes its files as it stops; what a kill during that leaves, the next start does.
    left = list(checkpoints.glob(".tmp-*"))
    again = mplaunch(str(recipe), f"train.max_steps={sealed + 1}", timeout=WAIT_S)
    assert again.returncode == 0, explain(again)
    assert all(f"removed {p.name}" in again.stderr for p in left), again.stderr
    assert "interrupted write" not in again.stderr
    assert f"resuming from step {sealed}" in again.stdout
    assert not list(checkpoints.glob(".tmp-*"))
