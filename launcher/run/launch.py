"""Start a plan's workers on this node: the run directory, torchrun, signals, exit status.

Light side: no torch import. The launcher holds the run directory's lock
(launcher.rundir.lock) for the run's life, checks that a resume is possible
before any worker starts (launcher.run.preflight), starts torchrun in its own session, forwards
Ctrl-C and SIGTERM to the workers (which checkpoint and stop at the next
step boundary), watches their heartbeats for a hang (launcher.rundir.watchdog; the stack
dumps and the stopping are launcher.run.hangwatch's, which each Slurm node's watcher shares),
turns a failing rank into one readable message, recorded as an "error"
event in metrics.jsonl (a rank a signal killed is named with it), exits 128+N when signal N
stopped the run unfinished (sent to the launcher or to a rank), and passes the workers' output on
without torchrun's and the libraries' noise: above the live progress bar on a terminal (launcher.run.progress).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Any, TextIO

from launcher.errors import UserError
from launcher.plan.resolve import Plan
from launcher.run import progress
from launcher.run.hangwatch import (
    KILL_GRACE_S,
    STACK_WAIT_S,
    child_pids,
    innermost_frames,
    signal_stacks,
    stop_workers,
    wait_for_stacks,
)
from launcher.run.preflight import check_resume, finished_run, prepare_run_dir
from launcher.rundir import ownership
from launcher.rundir.layout import RankError, RunDir, is_secondary
from launcher.rundir.lock import RunLock
from launcher.rundir.metrics_log import format_duration, read_metrics
from launcher.rundir.watchdog import Beat, Hang, HangRule, hang_verdict, stacks_note

POLL_S = 1.0  # how often the watch thread reads the heartbeats
_RANK_ERROR = re.compile(r"^mplaunch: rank (?P<rank>\d+): error: (?P<message>.*)$")


def run(plan: Plan) -> int:
    """Run the plan's workers to completion; return their exit status (128+N after signal N).

    The run directory's lock is held throughout; nothing in the directory is touched before.

    Raises:
        UserError: another process or Slurm job runs this directory (exit 2), or the
            resume check fails.
    """
    run_dir = RunDir.from_plan(plan)
    with RunLock.acquire(run_dir.lock) as lock:
        resume_from = check_resume(plan)
        if finished_run(plan, "nothing to do (raise train.max_steps to train further, or use another name)"):
            return 0
        if resume_from is None:
            run_dir.archive_metrics()  # a fresh start keeps the earlier attempt's metrics beside the new ones
            # A tokenizer trained for an earlier attempt may not match today's data files.
            run_dir.remove_tokenizer()
        prepare_run_dir(plan)
        run_dir.clear_rank_errors()
        run_dir.clear_heartbeats()
        print(f"mplaunch: {plan.batch.equation(plan.nnodes, plan.nproc_per_node)}")
        print(
            f"mplaunch: {plan.recipe.backend}, {plan.sharding}, {plan.precision.dtype} on "
            f"{plan.device}; run dir {run_dir.path}"
        )
        if resume_from:
            # The launcher checked the files' sizes; the workers verify the checksums before loading
            # and fall back to an older checkpoint (saying so) if this one fails.
            print(f"mplaunch: resuming from {resume_from}, once the workers have verified its checksums")
        return Workers(plan, lock).wait()


class Workers:
    """torchrun and its workers, in their own session so that a terminal's Ctrl-C reaches only us.

    A watch thread reads the ranks' heartbeats: when they hang (launcher.rundir.watchdog), or do not
    stop within launch.stop_grace of a stop request, it dumps their stacks and kills them.
    """

    def __init__(self, plan: Plan, lock: RunLock | None = None) -> None:
        self.plan = plan
        self.files = RunDir.from_plan(plan)
        self.signals: list[int] = []
        self.began = time.time()
        self.exits = progress.WorkerExits()  # what torchrun says of the workers that failed
        self.stop_at: float | None = None  # when the first stop request came (Unix s)
        self.verdict: str | None = None  # the watch's headline, when it stopped the workers
        self.rank_lines: list[tuple[float, RankError]] = []  # `mplaunch: rank N: error:` lines
        self.rule = HangRule(plan.recipe.launch.hang_timeout, plan.world_size, time.time())
        self.done = threading.Event()
        self.bar = progress.Bar.for_terminal(plan)
        env = {**os.environ, **plan.env}
        env.pop(progress.ENV, None)
        if self.bar is not None:
            env[progress.ENV] = progress.LAUNCHER
        out, err = sys.stdout, sys.stderr  # the real streams: the bar redirects sys.stderr above itself
        self.proc = subprocess.Popen(
            plan.command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            # torchrun holds the run directory's lock too, so that it stays held while torchrun
            # stops its workers after the launcher died.
            pass_fds=(lock.fileno(),) if lock is not None else (),
        )
        if self.bar is not None:
            self.bar.start()
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self.readers = [
            threading.Thread(
                target=self._pump, args=(stream, to, progress.TorchrunFilter(stderr)), daemon=True
            )
            for stream, to, stderr in ((self.proc.stdout, out, False), (self.proc.stderr, err, True))
        ]
        for reader in self.readers:
            reader.start()
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()
        self.previous = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _pump(self, lines: IO[str], out: TextIO, noise: progress.TorchrunFilter) -> None:
        """Pass one of the workers' streams on to ours, less the noise; above the live bar where
        `out` is the terminal it is drawn on."""
        for line in lines:
            if noise.stderr:
                self.exits.read(line)
            match = _RANK_ERROR.match(line.rstrip("\n"))
            if match:  # printed once, as the headline, when the run has failed
                rank = int(match["rank"])
                self.rank_lines.append(
                    (time.time(), RankError(rank, match["message"], self.files.rank_error(rank)))
                )
            elif not noise.keep(line):
                continue
            elif self.bar is not None and out.isatty():
                self.bar.print(line)
            else:
                out.write(line)
                out.flush()

    def _forward(self, signum: int, frame: object) -> None:
        self.signals.append(signum)
        if len(self.signals) == 1:
            # The workers checkpoint and exit at the next step boundary; the watch thread
            # stops them after launch.stop_grace if they do not.
            self.stop_at = time.time()
            targets = child_pids(self.proc.pid) or [self.proc.pid]
            print(
                f"\nmplaunch: {signal.Signals(signum).name}: asking the workers to checkpoint and stop; "
                f"they get {format_duration(self._grace_s())} ({self._grace_source()}), then their stacks "
                "are dumped and they are killed (again to stop at once)",
                file=sys.stderr,
                flush=True,
            )
        else:
            targets = [self.proc.pid]
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _grace_s(self) -> float:
        grace = self.plan.recipe.launch.stop_grace
        return self.rule.limit_s if grace == "auto" else float(grace)

    def _grace_source(self) -> str:
        if self.plan.recipe.launch.stop_grace == "auto":
            return f"launch.stop_grace=auto: the hang timeout, {self.rule.describe_limit()}"
        return f"launch.stop_grace={float(self.plan.recipe.launch.stop_grace):g}"

    def _watch(self) -> None:
        while not self.done.wait(POLL_S):
            now = time.time()
            beats = self._beats()
            if self.bar is not None:
                self.bar.update(beats)
            if self.stop_at is not None:
                self.rule.observe(beats)
                if now - self.stop_at > self._grace_s():
                    self._stop_after_grace(beats, now)
                    return
                continue
            hang = self.rule.check(beats, now)
            if hang is not None:
                self._stop_hung(hang)
                return

    def _beats(self) -> dict[int, Beat]:
        parsed = (Beat.parse(raw) for raw in self.files.heartbeats().values())
        return {b.rank: b for b in parsed if b is not None}

    def _stop_hung(self, hang: Hang) -> None:
        frames, written = self._dump_stacks({b.rank: b.pid for b in hang.stuck})
        stacks = [self.files.stack_dump(r) for r in written]
        self.verdict = hang_verdict(hang, self.rule.describe_limit(), frames, stacks)
        print(f"mplaunch: {self.verdict}", file=sys.stderr, flush=True)
        self._terminate()

    def _stop_after_grace(self, beats: dict[int, Beat], now: float) -> None:
        assert self.stop_at is not None
        behind = sorted(b.rank for b in beats.values() if b.phase != "exit" and b.time < self.stop_at)
        frames, written = self._dump_stacks({b.rank: b.pid for b in beats.values() if b.phase != "exit"})
        stacks = stacks_note([self.files.stack_dump(r) for r in written])
        late = ", ".join(
            f"rank {r} (last step {beats[r].step}, {now - beats[r].time:.0f}s ago"
            + (f", at {frames[r]})" if r in frames else ")")
            for r in behind
        )
        name = signal.Signals(self.signals[0]).name
        self.verdict = (
            f"the workers did not stop within {format_duration(self._grace_s())} of {name} "
            f"({self._grace_source()})"
            + (f"; not at a step boundary since: {late}" if late else "")
            + f"{stacks}; killed them without a checkpoint"
        )
        print(f"mplaunch: {self.verdict}", file=sys.stderr, flush=True)
        self._terminate()

    def _dump_stacks(self, pids: dict[int, int]) -> tuple[dict[int, str], list[int]]:
        """SIGUSR2 to each rank (faulthandler writes its stacks); returns each rank's innermost
        frame, and the ranks whose stacks were written."""
        sent = signal_stacks(pids, child_pids(self.proc.pid))
        written = wait_for_stacks(self.files, sent, STACK_WAIT_S)
        return innermost_frames(self.files, written), written

    def _terminate(self) -> None:
        """SIGTERM to torchrun and the workers, SIGKILL to whatever is left after a grace."""
        stop_workers(self.proc.pid, self._ended)

    def _ended(self, timeout_s: float) -> bool:
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def wait(self) -> int:
        try:
            code = self.proc.wait()
        finally:
            self.done.set()
            self.watcher.join(timeout=STACK_WAIT_S + 2 * KILL_GRACE_S)
            for reader in self.readers:
                reader.join(timeout=5)
            if self.bar is not None:  # the final step, then the bar stays above what follows
                self.bar.update(self._beats())
                self.bar.stop()
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
        code = 128 - code if code < 0 else code
        if self.verdict is not None:  # the watch stopped the workers: a failure even after a Ctrl-C
            self._record_error(self.verdict)
            return 128 + self.signals[0] if self.signals else 1
        if len(self.signals) > 1:  # the second one stopped the workers at once
            self._report_at_once()
            return 128 + self.signals[0]
        if code != 0 and not self.signals:
            printed = [e for _, e in self.rank_lines]
            self._record_error(_report_failure(self.plan, code, printed, self.exits.killed()))
        if self.signals:
            return 128 + self.signals[0] if code == 0 else code
        return code or self._stopped_by_a_rank()

    def _events(self, name: str) -> list[dict[str, Any]]:
        """This attempt's events called `name` in metrics.jsonl."""
        try:
            events = read_metrics(self.files.path).named(name)
        except (UserError, OSError):
            return []
        return [e for e in events if float(str(e.get("time", 0))) >= self.began]

    def _stopped_by_a_rank(self) -> int:
        """128 + the lowest rank's signal when the workers stopped because ranks got one (rank 0
        said which: "stopped at step N: rank 1 got SIGTERM"); 0 for a run that finished."""
        stops = [s["signals"] for s in self._events("stop") if s.get("signals")]
        by_rank = {int(rank): name for rank, name in stops[-1].items()} if stops else {}
        return 128 + signal.Signals[by_rank[min(by_rank)]] if by_rank else 0

    def _report_at_once(self) -> None:
        """The one line after a second Ctrl-C: rank 0's (which names the checkpoint it abandoned),
        else the launcher's own, recorded as an "interrupted" event."""
        if self._events("interrupted") or self._events("stop"):  # said, or stopped before it came
            return
        steps = self.files.checkpoint_steps()
        then = f"resumes from step {steps[-1]}" if steps else "starts from step 0"
        message = (
            f"the second {signal.Signals(self.signals[-1]).name} stopped the workers at once, abandoning any "
            f"checkpoint in progress; running the same recipe again {then}"
        )
        print(f"mplaunch: {message}", file=sys.stderr, flush=True)
        self.files.append_event(self.files.last_step(), "interrupted", message)

    def _record_error(self, headline: str) -> None:
        """The "error" event `mplaunch report` shows; best-effort (the disk may be full)."""
        if not self.files.append_event(self.files.last_step(), "error", headline):
            print(f"mplaunch: (could not record the error in {self.files.metrics})", file=sys.stderr)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the launcher dies, even by SIGKILL.

    torchrun runs in its own session (so a terminal's Ctrl-C reaches only the
    launcher); without this, killing the launcher would leave it training
    unattended. torchrun passes the SIGTERM on to its workers.
    """
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _report_failure(plan: Plan, code: int, printed: list[RankError], killed: dict[int, str]) -> str:
    """Print the failed run's headline and where to look; returns the headline.

    A rank a signal killed before it reported anything (`killed`, as torchrun reported it) is
    the cause: nothing a peer does kills a rank that way, SIGABRT aside; its death is written to
    its logs/rank-N.err for later readers. Otherwise the cause is taken from the ranks' error
    files, and from the error lines they printed (`printed`, in the order they came) for ranks
    whose file a full disk kept from being written; another rank's consequence (a closed
    connection) never wins over a cause.
    """
    run_dir = RunDir.from_plan(plan)
    reported = {e.rank for e in [*run_dir.rank_errors(), *printed]}  # a rank may abort as it exits
    deaths = [RankError(r, m, run_dir.rank_error(r)) for r, m in sorted(killed.items()) if r not in reported]
    for death in deaths:
        run_dir.write_rank_error(death.rank, death.message, "(no traceback: torchrun reported the signal)\n")
    first = next((d for d in deaths if not is_secondary(d.message)), None) or run_dir.failed_rank(printed)
    if first is not None:
        headline = first.headline
        print(f"mplaunch: {headline}", file=sys.stderr)
        if first.path.exists() and first not in deaths:
            print(f"mplaunch: full traceback: {first.path}", file=sys.stderr)
    else:
        headline = f"the workers exited with status {code} without an error report (killed by the system? out of memory?)"
        print(f"mplaunch: {headline}; see {plan.command_line()}", file=sys.stderr)
    print(f"mplaunch: {ownership.rerun(run_dir.checkpoints)}", file=sys.stderr)
    return headline
