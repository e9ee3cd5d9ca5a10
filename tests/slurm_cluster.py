"""A real two-node Slurm cluster on this one machine, for the `slurm` tests.

Debian's slurmctld, two `slurmd -N n1` / `slurmd -N n2` (own ports, both at
127.0.0.1) and a munged with a freshly generated key, all under a temporary
directory; clients find it through SLURM_CONF. The node names are added to
/etc/hosts so the rendezvous endpoint `n1:PORT` resolves, and removed again.

Both nodes share 127.0.0.1, which the sbatch script rejects for multi-node
runs unless the job says it is a one-machine test cluster: jobs submitted by
the tests set MPLAUNCH_SLURM_ALLOW_LOOPBACK=1 (see README, section Slurm).

Use the `slurm_cluster` fixture (session-scoped; import slurm_cluster_fixture
into the test module), or start one by hand to experiment:

    python tests/slurm_cluster.py /tmp/cluster    # prints SLURM_CONF, Ctrl-C stops it
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

NODES = ("n1", "n2")
CPUS_PER_NODE = 2
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARK = "# mplaunch test cluster"
READY_TIMEOUT_S = 60.0

# cred_expire: a requeued job may start again cred_expire + 1 s later (default 120 s);
# sched_interval: pending jobs that become eligible are looked at this often (default 60 s).
SLURM_CONF = """\
ClusterName=mplaunch
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.sock,cred_expire=10
StateSaveLocation={root}/state
SlurmctldPidFile={root}/slurmctld.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdSpoolDir={root}/spool/%n
SlurmdPidFile={root}/slurmd-%n.pid
SlurmdLogFile={root}/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
KillWait=20
MinJobAge=600
InactiveLimit=0
Waittime=0
SlurmctldDebug=info
SlurmdDebug=info
{nodes}
PartitionName=test Nodes={node_list} Default=YES MaxTime=INFINITE State=UP
"""


def missing_binaries() -> list[str]:
    """Slurm/munge programs this machine lacks (the tests skip when any is missing)."""
    return [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def skip_reason() -> str | None:
    """Why the live-cluster tests cannot run here, or None."""
    missing = missing_binaries()
    if missing:
        names = ", ".join(missing)
        return f"Slurm binaries absent ({names}); .ci/run installs slurmctld slurmd slurm-client munge"
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (slurmd runs jobs and /etc/hosts gets the node names)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class SlurmCluster:
    """A running cluster; `env` is what a client (sbatch, scontrol, mplaunch) needs."""

    root: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    added_hosts: bool = False

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), "MPLAUNCH_SLURM_ALLOW_LOOPBACK": "1"}

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster."""
        return subprocess.run(
            [_exe(argv[0]), *argv[1:]],
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def mplaunch(self, cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
        """Run `mplaunch ARGS --slurm ...` against this cluster; return the id of the job it submitted."""
        argv = [sys.executable, "-m", "launcher", *args]
        done = subprocess.run(argv, env=env or self.env, capture_output=True, text=True, cwd=cwd, timeout=120)
        assert done.returncode == 0, f"{argv}\n{done.stdout}\n{done.stderr}"
        return done.stdout.split("submitted job ")[1].split(":")[0]

    def sbatch(self, script: Path, *options: str) -> str:
        """Submit a batch script; return the job id."""
        return self.run("sbatch", "--parsable", *options, str(script)).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (empty once Slurm has forgotten the job)."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
        fields = {}
        for item in out.split():
            key, sep, value = item.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait_state(self, job_id: str, states: set[str], timeout_s: float) -> dict[str, str]:
        """Poll until the job reaches one of `states`; fail with the job and logs on timeout."""
        deadline = time.monotonic() + timeout_s
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise AssertionError(
            f"job {job_id} not in {sorted(states)} after {timeout_s:.0f} s: {info}\n{self.logs()}"
        )

    def wait_finished(self, job_id: str, timeout_s: float) -> dict[str, str]:
        """Wait for a terminal state (COMPLETED, FAILED, CANCELLED, TIMEOUT, ...)."""
        terminal = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
        return self.wait_state(job_id, terminal, timeout_s)

    def logs(self, tail: int = 30) -> str:
        """The daemons' last log lines, for failure messages."""
        parts = []
        for log in sorted(self.root.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def start(self) -> None:
        """Write the configuration, start munged, slurmctld and both slurmd, wait until the nodes are idle."""
        self._write_config()
        self._add_hosts()
        munge = self.root / "munge"
        self._spawn(
            "munged",
            "--foreground",
            "--force",
            f"--socket={munge}/munge.sock",
            f"--key-file={munge}/munge.key",
            f"--pid-file={munge}/munged.pid",
            f"--log-file={self.root}/munged.log",
            f"--seed-file={munge}/munged.seed",
        )
        self._wait_for(lambda: (munge / "munge.sock").exists(), "munged socket")
        self._spawn("slurmctld", "-D", "-i", "-f", str(self.conf))
        for node in NODES:
            self._spawn("slurmd", "-D", "-N", node, "-f", str(self.conf))
        self._wait_for(self._nodes_idle, "both nodes idle")

    def stop(self) -> None:
        """Cancel its jobs, stop the daemons it started and what its jobs left behind, undo /etc/hosts."""
        if self.procs and all(p.poll() is None for p in self.procs):
            self._cancel_jobs()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        self._kill_leftovers()
        if self.added_hosts:
            lines = HOSTS_FILE.read_text().splitlines(keepends=True)
            HOSTS_FILE.write_text("".join(line for line in lines if HOSTS_MARK not in line))
            self.added_hosts = False

    def _cancel_jobs(self) -> None:
        jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if not jobs:
            return
        self.run("scancel", *jobs, check=False)
        deadline = time.monotonic() + 40  # KillWait is 20 s
        while (
            time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip()
        ):
            time.sleep(0.5)

    def _kill_leftovers(self) -> None:
        """slurmstepd and job processes outlive slurmd; they carry this cluster's SLURM_CONF."""
        mark = f"SLURM_CONF={self.conf}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if mark in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                continue

    def _write_config(self) -> None:
        for sub in ("state", "spool", "munge", *(f"spool/{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={n} NodeAddr=127.0.0.1 Port={_free_port()} "
            f"CPUs={CPUS_PER_NODE} RealMemory=2000 State=UNKNOWN"
            for n in NODES
        )
        self.conf.write_text(
            SLURM_CONF.format(
                host=socket.gethostname().split(".")[0],
                ctld_port=_free_port(),
                user="root",
                root=self.root,
                nodes=nodes,
                node_list=",".join(NODES),
            )
        )

    def _add_hosts(self) -> None:
        text = HOSTS_FILE.read_text()
        missing = [
            n for n in NODES if not any(n in line.split()[1:] for line in text.splitlines() if line.strip())
        ]
        if missing:
            sep = "" if text.endswith("\n") or not text else "\n"
            HOSTS_FILE.write_text(f"{text}{sep}127.0.0.1 {' '.join(missing)} {HOSTS_MARK}\n")
            self.added_hosts = True

    def _spawn(self, name: str, *argv: str) -> None:
        log = (self.root / f"{name}-stdout.txt").open("ab")
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        proc = subprocess.Popen(
            [_exe(name), *argv], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.procs.append(proc)

    def _nodes_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2], strict=False))
        return all(states.get(n) == "idle" for n in NODES)

    def _wait_for(self, ready: object, what: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(
                    f"local Slurm cluster: {dead} exited while waiting for {what}\n{self.logs()}"
                )
            if ready():  # type: ignore[operator]
                return
            time.sleep(0.3)
        raise RuntimeError(f"local Slurm cluster: no {what} after {READY_TIMEOUT_S:.0f} s\n{self.logs()}")


_CLUSTER: SlurmCluster | None = None


@contextlib.contextmanager
def running_cluster(root: Path) -> Iterator[SlurmCluster]:
    """Start a cluster under `root` and stop it on exit."""
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """One cluster per test session, shared by every module that imports this fixture."""
    global _CLUSTER
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    if _CLUSTER is not None:
        yield _CLUSTER
        return
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    atexit.register(cluster.stop)
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        raise
    _CLUSTER = cluster
    try:
        yield cluster
    finally:
        _CLUSTER = None
        cluster.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    with running_cluster(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/mplaunch-slurm").resolve()) as c:
        print(f"export SLURM_CONF={c.conf} MPLAUNCH_SLURM_ALLOW_LOOPBACK=1", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
