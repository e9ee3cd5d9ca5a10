"""Could Slurm ever start this job? Asked before submitting, so that a job no node can hold is
refused in one line instead of pending forever (squeue's reason PartitionConfig or PartitionNodeLimit).

`sbatch --test-only` (the script on stdin; nothing is queued) asks the controller when the job
would start. It prints nothing on stdout; on stderr it says "sbatch: Job N to start at TIME using
P processors on nodes LIST in partition P" (exit 0) or "allocation failure: REASON" (exit 1).
The controller gives the same RESOURCE_REASONS for a request no node has and for one that only
nodes down, drained or reserved have, so the nodes' configuration (`sinfo -N`, every node of the
job's partitions whatever its state) decides:

- a shortfall it shows (no node has 64 CPUs; fewer nodes than asked have the request) is
  refused, naming it and the nodes that come closest;
- no shortfall (the nodes exist but cannot take jobs now): the job is submitted and waits, with a note;
- sinfo not readable: refused with sbatch's reason.

Any other failure of the check (no answer from the controller, a timeout, a reason of another
kind) never blocks a submission: sbatch itself then answers for the job. Not seen: partition
time limits (--test-only accepts a job over MaxTime, which then pends with PartitionTimeLimit),
and node constraints or lists in slurm.extra_sbatch.

Light side: the standard library only.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

from launcher.errors import UserError

TEST_ONLY_TIMEOUT_S = 60
SINFO_TIMEOUT_S = 30
# Slurm's words (slurm_errno.c) for a request that the partition's nodes do not have, or do not have now.
RESOURCE_REASONS = (
    "Requested node configuration is not available",
    "Requested partition configuration not available now",
    "More processors requested than permitted",
    "Node count specification invalid",
    "CPU count specification invalid",
    "Memory required by task is not available",
    "Invalid generic resource (gres) specification",
)
# One line per node and partition: name, partition (the default one marked *), CPUs, MB, gres.
SINFO_FORMAT = "%N|%P|%c|%m|%G"
# gres items such as gpu:4, gpu:a100:4(S:0-1); a node may list several types.
GPU_GRES = re.compile(r"(?:^|,)gpu(?::[^:,()]+)?:(\d+)")
SHOWN_NAMES = 5


@dataclass(frozen=True)
class Request:
    """What the job asks of each of its nodes; `partitions` empty: the cluster's default one."""

    nodes: int
    cpus: int
    gpus: int
    memory_mb: int | None
    partitions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Node:
    """One node of one partition, as configured (sinfo -N)."""

    name: str
    partition: str
    default: bool
    cpus: int
    memory_mb: int
    gpus: int


def check(sbatch: str, script: str, request: Request) -> None:
    """Refuse a job that could never start; notes on stderr when the check cannot decide.

    Raises:
        UserError: sbatch --test-only says the job cannot start and either the nodes' configuration
            shows what none of them has (named), or that configuration cannot be read (sbatch's reason).
    """
    answer = test_only(sbatch, script)
    if answer is None:
        return
    reason, resource = answer
    if not resource:
        _note(f"could not check that the job can start (sbatch --test-only: {reason}); submitting it")
        return
    nodes = read_nodes()
    found = shortfalls(request, nodes) if nodes is not None else None
    if found is None:
        raise UserError(
            f"sbatch --test-only says the job cannot start: {reason}; nothing was submitted",
            hint="compare --nodes, slurm.cpus_per_task, slurm.gpus_per_node and slurm.mem with `sinfo -N -l`",
        )
    if found:
        lines, hints = zip(*found, strict=True)
        raise UserError(
            f"the job could never start, nothing was submitted: {'; '.join(lines)}",
            hint="; ".join(dict.fromkeys(hints)),
        )
    _note(
        f"sbatch --test-only: {reason}, yet the partition's nodes have what the job asks "
        "(some may be down, drained or reserved now); submitting it, it waits for them"
    )


def test_only(sbatch: str, script: str) -> tuple[str, bool] | None:
    """None when `sbatch --test-only` accepts the script, else (its reason, whether the reason is about resources)."""
    try:
        done = subprocess.run(
            [sbatch, "--test-only"], input=script, capture_output=True, text=True, timeout=TEST_ONLY_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return f"no answer in {TEST_ONLY_TIMEOUT_S} s", False
    except OSError as exc:
        return exc.strerror or str(exc), False
    if done.returncode == 0:
        return None
    return _reason(done.stderr, done.returncode), any(r in done.stderr for r in RESOURCE_REASONS)


def _reason(stderr: str, returncode: int) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("allocation failure: "):
            return line.removeprefix("allocation failure: ")
    if lines:
        return lines[-1].removeprefix("sbatch: error: ")
    return f"exit {returncode}"


def read_nodes() -> list[Node] | None:
    """Every node of every partition (hidden ones too), or None when sinfo cannot tell."""
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        return None
    try:
        done = subprocess.run(
            [sinfo, "--all", "--noheader", "--Node", f"--format={SINFO_FORMAT}"],
            capture_output=True,
            text=True,
            timeout=SINFO_TIMEOUT_S,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nodes(done.stdout) if done.returncode == 0 else None


def parse_nodes(text: str) -> list[Node] | None:
    """sinfo's SINFO_FORMAT lines as nodes; None when a line is not one (another sinfo, an error)."""
    nodes = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.strip().split("|")
        cpus, memory = (re.match(r"\d+", f) for f in fields[2:4]) if len(fields) == 5 else (None, None)
        if cpus is None or memory is None or not fields[0] or not fields[1]:
            return None
        gpus = sum(int(n) for n in GPU_GRES.findall(fields[4]))
        partition = fields[1].rstrip("*")
        nodes.append(Node(fields[0], partition, fields[1] != partition, int(cpus[0]), int(memory[0]), gpus))
    return nodes or None


def shortfalls(request: Request, nodes: list[Node]) -> list[tuple[str, str]] | None:
    """(what no node has, a hint) for each partition the job may use, when none can ever take it;
    [] when one can; None when the nodes do not tell (no default partition, one sinfo does not list)."""
    partitions = request.partitions or tuple(sorted({n.partition for n in nodes if n.default}))
    if not partitions or any(p not in {n.partition for n in nodes} for p in partitions):
        return None
    found = [_short_of(request, p, [n for n in nodes if n.partition == p]) for p in partitions]
    return [] if any(f is None for f in found) else [f for f in found if f is not None]


def _short_of(request: Request, partition: str, nodes: list[Node]) -> tuple[str, str] | None:
    # (asked per node, what a node has, the amount as a number or a size, as a phrase, the key)
    wants: list[tuple[int, Callable[[Node], int], Callable[[int], str], Callable[[int], str], str]] = [
        (request.cpus, lambda n: n.cpus, str, lambda k: _count(k, "CPU"), "slurm.cpus_per_task"),
        (request.gpus, lambda n: n.gpus, str, lambda k: _count(k, "GPU"), "slurm.gpus_per_node"),
        (
            request.memory_mb or 0,
            lambda n: n.memory_mb,
            _size,
            lambda mb: f"{_size(mb)} of memory",
            "slurm.mem",
        ),
    ]
    wants = [w for w in wants if w[0] > 0]
    for need, has, amount, shown, key in wants:
        most = max(has(n) for n in nodes)
        if most < need and most == 0:
            return (
                f"no node of partition {partition} has {shown(need)} (none has any)",
                "use another slurm.partition",
            )
        if most < need:
            closest = _names([n for n in nodes if has(n) == most])
            return (
                f"no node of partition {partition} has {shown(need)} (the most is {amount(most)}: {closest})",
                f"ask for at most {shown(most)} ({key}) or use another slurm.partition",
            )
    fit = [n for n in nodes if all(has(n) >= need for need, has, *_ in wants)]
    if len(fit) >= request.nodes:
        return None
    asked = " and ".join(shown(need) for need, _, _, shown, _ in wants)
    if not fit:
        return f"no node of partition {partition} has {asked} together", "ask for less per node"
    return (
        f"only {_count(len(fit), 'node')} of partition {partition} ({_names(fit)}) "
        f"{'has' if len(fit) == 1 else 'have'} {asked}; the job asks for {request.nodes}",
        f"use at most --nodes {len(fit)}, or ask for less per node",
    )


def _count(k: int, what: str) -> str:
    return f"{k} {what}" if k == 1 else f"{k} {what}s"


def _size(mb: int) -> str:
    return f"{mb // 1024}G" if mb and mb % 1024 == 0 else f"{mb}M"


def _names(nodes: list[Node]) -> str:
    names = sorted({n.name for n in nodes})
    more = len(names) - SHOWN_NAMES
    return ", ".join(names[:SHOWN_NAMES]) + (f" and {more} more" if more > 0 else "")


def _note(text: str) -> None:
    print(f"mplaunch: {text}", file=sys.stderr)
