"""This rank's place in the job, the host-side collectives the loop needs, and stop requests.

`Dist` is what launcher.worker.train builds once the process group is up; `StopRequest`
turns signals into a flag, and `StopAgreement` makes every rank stop at the same step.
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
    """SIGINT, SIGTERM and SIGUSR1 (Slurm's warning) only set a flag; the loop acts on it."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.signal = signum


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
