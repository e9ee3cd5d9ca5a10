"""This rank's place in the job, the host-side collectives the loop needs, and stop requests.

`Dist` is what launcher.worker.train builds once the process group is up; `StopRequest`
turns signals into a flag, and `StopAgreement` makes every rank stop at the same step and
tells every rank which ranks got which signal (`who`, `describe_signals`).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This rank's place in the job, and the collectives the loop needs."""

    rank: int
    world: int
    local_rank: int
    control: dist.ProcessGroup | None  # a gloo group for host-side agreement

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.control)

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return bool(t.item())


class StopRequest:
    """SIGINT, SIGTERM and SIGUSR1 (Slurm's warning) only set a flag; the loop acts on it.

    A SIGINT after the first signal stops at once (KeyboardInterrupt), even in the middle of a
    checkpoint: `saving` names the step whose checkpoint the loop is writing, so that the stop
    can say which one it abandoned.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self.at_once: int | None = None  # the signal that stopped this rank at once
        self.saving: int | None = None  # the step whose checkpoint is being written
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            # A second Ctrl-C: stop now, without a checkpoint. Further ones are ignored, so that
            # the rank's report of this one is not itself interrupted.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            self.at_once = signum
            raise KeyboardInterrupt
        self.signal = signum

    def describe_at_once(self, sealed: list[int]) -> str:
        """What stopping at once left behind, given the steps of the complete checkpoints."""
        first = signal.Signals(self.signal).name if self.signal else "a signal"
        how = (
            "a second Ctrl-C (SIGINT)" if self.signal == signal.SIGINT else f"a Ctrl-C (SIGINT) after {first}"
        )
        if self.saving is not None and self.saving not in sealed:
            what = f"abandoned the checkpoint of step {self.saving} in progress"
        else:
            what = "stopped the run at once, with no checkpoint in progress"
        then = f"resumes from step {sealed[-1]}" if sealed else "starts from step 0 (no checkpoint was saved)"
        return f"{how} {what}; running the same recipe again {then}"


class StopAgreement:
    """Every rank stops at the same step, without waiting on the others at every step.

    Each step starts an all-reduce of this rank's stop flag over the gloo control group in the
    background (async_op) and reads the one started a step earlier, which has long finished: the
    ranks agree on the flags of step N at the end of step N + 1. A signal is thus honoured one
    step later than it would be by a blocking all-reduce, and no step waits for the slowest rank's
    host to reach the same line (on a GPU that wait would also stop the host from queueing work).
    """

    def __init__(self, d: Dist) -> None:
        self.d = d
        self.pending: tuple[Any, torch.Tensor] | None = None

    def step(self, flag: bool) -> bool:
        """Send this step's flag; True on every rank alike once some rank's flag of the step before was."""
        if self.d.world == 1:
            return flag
        mine = torch.tensor([int(flag)])
        work = dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=self.d.control, async_op=True)
        previous, self.pending = self.pending, (work, mine)
        if previous is None:
            return False
        previous[0].wait()
        return bool(previous[1].item())

    def close(self) -> None:
        """Wait for the last all-reduce (every rank started it), so none is left in flight."""
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None

    def who(self, mine: int | None) -> dict[int, int]:
        """Every rank's stop signal, by rank (ranks that got none are left out); every rank calls it
        once the agreement said stop (a blocking all-reduce of one number per rank)."""
        if self.d.world == 1:
            return {0: mine} if mine else {}
        signals = torch.zeros(self.d.world, dtype=torch.int32)
        signals[self.d.rank] = mine or 0
        dist.all_reduce(signals, op=dist.ReduceOp.MAX, group=self.d.control)
        return {rank: int(s) for rank, s in enumerate(signals.tolist()) if s}


def describe_signals(signals: dict[int, int], world: int) -> str:
    """ "rank 1 got SIGTERM", "ranks 0 and 2 got SIGTERM; rank 1 got SIGUSR1", "every rank got SIGINT"."""
    if not signals:
        return "no rank got a signal"
    if len(signals) == world and len(set(signals.values())) == 1:
        return f"every rank got {signal.Signals(next(iter(signals.values()))).name}"
    by_signal: dict[int, list[int]] = {}
    for rank, signum in sorted(signals.items()):
        by_signal.setdefault(signum, []).append(rank)
    return "; ".join(
        f"{_ranks(ranks)} got {signal.Signals(signum).name}" for signum, ranks in by_signal.items()
    )


def _ranks(ranks: list[int]) -> str:
    """ "rank 1", "ranks 0 and 2", "ranks 0, 2 and 5", "12 ranks (0, 1, 2, ...)"."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if len(ranks) > 4:
        return f"{len(ranks)} ranks ({', '.join(map(str, ranks[:3]))}, ...)"
    return f"ranks {', '.join(map(str, ranks[:-1]))} and {ranks[-1]}"
