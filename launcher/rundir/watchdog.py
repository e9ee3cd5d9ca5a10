"""When the workers stop making progress: the hang rule, read from the ranks' heartbeats.

Each rank rewrites RUN_DIR/logs/rank-N.heartbeat (launcher.rundir.layout) when it starts
("setup"), when its setup is done ("train"), after every step ("step") and every
checkpoint ("checkpoint"), and as it leaves ("exit"). The launcher polls them (in a Slurm
job, each node's watcher: launcher.run.hangwatch); `HangRule.check` says when every rank
still running has gone too long without one, and `hang_verdict` is the line that says so.
The limit is launch.hang_timeout: a number of seconds, or "auto": 10 minutes, or 20
times the slowest step seen after a warm-up of 3 steps, whichever is longer. A rank
still in setup (model build, DeepSpeed's op compile, resume) is allowed
max(limit, 30 minutes).

Light side: the standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

AUTO_MIN_S = 600.0
AUTO_FACTOR = 20.0
WARMUP_STEPS = 3
STARTUP_S = 1800.0
# Collectives wait this much longer than the launcher, so that a hang is reported by the
# launcher, or a Slurm node's watcher (with stacks), rather than as a timed-out collective.
COLLECTIVE_MARGIN_S = 60.0
AUTO_COLLECTIVE_S = 900.0


@dataclass(frozen=True)
class Beat:
    """One rank's heartbeat: the step it last completed, when (Unix s), its pid and phase."""

    rank: int
    step: int
    time: float
    pid: int
    phase: str

    @classmethod
    def parse(cls, raw: Mapping[str, object]) -> Beat | None:
        try:
            return cls(
                int(raw["rank"]),  # type: ignore[call-overload]
                int(raw["step"]),  # type: ignore[call-overload]
                float(raw["time"]),  # type: ignore[arg-type]
                int(raw["pid"]),  # type: ignore[call-overload]
                str(raw["phase"]),
            )
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class Hang:
    """Every running rank has gone `limit_s` without a heartbeat."""

    stuck: tuple[Beat, ...]
    limit_s: float
    now: float

    def to_dict(self) -> dict[str, object]:
        return {"limit_s": self.limit_s, "now": self.now, "stuck": [asdict(b) for b in self.stuck]}

    @classmethod
    def from_dict(cls, raw: Mapping[str, object]) -> Hang | None:
        """The Hang `to_dict` wrote, or None for anything else."""
        stuck, limit_s, now = raw.get("stuck"), raw.get("limit_s"), raw.get("now")
        if not (
            isinstance(stuck, list) and isinstance(limit_s, int | float) and isinstance(now, int | float)
        ):
            return None
        beats = [Beat.parse(b) if isinstance(b, dict) else None for b in stuck]
        if not beats or any(b is None for b in beats):
            return None
        return cls(tuple(b for b in beats if b is not None), float(limit_s), float(now))

    def describe(self, frames: Mapping[int, str] | None = None) -> str:
        """ "rank 0 in step 3 for 21s (at distributed_c10d.py:3252 in all_reduce), rank 1 in setup
        for 21s", for the one-line error; `frames`: each rank's innermost frame, where known."""
        parts = []
        for b in self.stuck:
            where = f"in step {b.step + 1}" if b.phase in ("train", "step", "checkpoint") else f"in {b.phase}"
            at = f" (at {frames[b.rank]})" if frames and b.rank in frames else ""
            parts.append(f"rank {b.rank} {where} for {self.now - b.time:.0f}s{at}")
        return ", ".join(parts)


def hang_verdict(hang: Hang, limit: str, frames: Mapping[int, str], stacks: Sequence[object]) -> str:
    """The one line a hang is reported in, by the local launcher and by a Slurm node's watcher.

    Args:
        hang: what the rule found.
        limit: the rule's `describe_limit()` ("launch.hang_timeout=10").
        frames: each stuck rank's innermost frame, where its stacks were dumped.
        stacks: the stack files written (none: the line says nothing of stacks).
    """
    return (
        f"the run hung: no rank completed a step for {hang.limit_s:.0f}s ({limit}): "
        f"{hang.describe(frames)}{stacks_note(stacks)}; stopped the workers"
    )


def stacks_note(stacks: Sequence[object]) -> str:
    """ "; stacks in FILE, FILE" for a verdict's line, "" without any."""
    return f"; stacks in {', '.join(str(s) for s in stacks)}" if stacks else ""


def collective_timeout_s(setting: str | float) -> float:
    """The process group's timeout for launch.hang_timeout: the fixed limit plus a margin, or 15 min for auto."""
    return AUTO_COLLECTIVE_S if setting == "auto" else float(setting) + COLLECTIVE_MARGIN_S


class HangRule:
    """launch.hang_timeout applied to a stream of heartbeats (call `check` every poll)."""

    def __init__(self, setting: str | float, world_size: int, started: float) -> None:
        self.fixed = None if setting == "auto" else float(setting)
        self.world_size = world_size
        self.started = started  # when the workers were started (Unix s)
        self.slowest_s = 0.0
        self._last: dict[int, Beat] = {}
        self._steps_seen: dict[int, int] = {}

    @property
    def limit_s(self) -> float:
        """The current limit between two heartbeats of a training rank."""
        if self.fixed is not None:
            return self.fixed
        return max(AUTO_MIN_S, AUTO_FACTOR * self.slowest_s)

    def describe_limit(self) -> str:
        if self.fixed is not None:
            return f"launch.hang_timeout={self.fixed:g}"
        return f"launch.hang_timeout=auto, now {self.limit_s:.0f}s"

    def observe(self, beats: Mapping[int, Beat]) -> None:
        """Learn step times from heartbeats that moved on since the last poll (for auto)."""
        for rank, beat in beats.items():
            last = self._last.get(rank)
            self._last[rank] = beat
            if last is None or beat.time <= last.time or last.phase not in ("step", "checkpoint", "train"):
                continue
            if beat.phase not in ("step", "checkpoint"):
                continue
            seen = self._steps_seen.get(rank, 0) + max(1, beat.step - last.step)
            self._steps_seen[rank] = seen
            if seen > WARMUP_STEPS:
                per_step = (beat.time - last.time) / max(1, beat.step - last.step)
                self.slowest_s = max(self.slowest_s, per_step)

    def check(self, beats: Mapping[int, Beat], now: float) -> Hang | None:
        """A Hang when every rank that has not exited is past its allowance, else None."""
        self.observe(beats)
        running = [b for b in beats.values() if b.phase != "exit"]
        missing = self.world_size - len(beats)
        if missing > 0 and now - self.started <= max(self.limit_s, STARTUP_S):
            return None  # a rank has not started yet: still starting up
        if not running:
            return None
        for beat in running:
            allowed = max(self.limit_s, STARTUP_S) if beat.phase == "setup" else self.limit_s
            if now - beat.time <= allowed:
                return None
        return Hang(tuple(sorted(running, key=lambda b: b.rank)), self.limit_s, now)


_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')


def innermost_frame(stack_dump: str) -> str | None:
    """ "hang_model.py:31 in forward": the most recent frame of the main thread in a faulthandler dump.

    The main thread is the one that runs a module's top level (`<module>`).
    """
    blocks = re.split(r"^(?=(?:Current thread|Thread) 0x)", stack_dump, flags=re.MULTILINE)
    for block in reversed(blocks):  # the latest dump is appended last
        frames = [m for m in map(_FRAME.match, block.splitlines()) if m]
        if any(f["func"] == "<module>" for f in frames):
            top = frames[0]
            return f"{top['file'].rsplit('/', 1)[-1]}:{top['line']} in {top['func']}"
    return None
