"""What the machine offers, probed without importing torch.

`mplaunch check` and `--dry-run` must stay light, so GPUs are read from
`nvidia-smi` rather than from torch.cuda. Tests pass a `Hardware` value in.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    """One visible GPU."""

    index: int
    name: str
    capability: tuple[int, int]
    memory_bytes: int

    @property
    def supports_bf16(self) -> bool:
        return self.capability >= (8, 0)

    @property
    def has_tensor_cores(self) -> bool:
        return self.capability >= (7, 0)


@dataclass(frozen=True)
class Hardware:
    """The GPUs visible to this process and the CPU count."""

    gpus: tuple[Gpu, ...] = ()
    cpu_count: int = 1
    cpu_bf16: bool = False  # the CPU computes bf16 natively (AVX512-BF16 or AMX), not emulated
    memory_bytes: int = 0  # the host's memory; 0: unknown

    @classmethod
    def probe(cls) -> Hardware:
        """Read visible GPUs from nvidia-smi (honouring CUDA_VISIBLE_DEVICES), and the CPU's bf16
        support and the host's memory from /proc and sysconf."""
        return cls(
            gpus=_visible(_nvidia_smi()),
            cpu_count=len(os.sched_getaffinity(0)),
            cpu_bf16=cpu_has_bf16(_read("/proc/cpuinfo")),
            memory_bytes=_host_memory(),
        )


def cpu_has_bf16(cpuinfo: str) -> bool:
    """The CPU's flags (a /proc/cpuinfo text) include native bf16 arithmetic: avx512_bf16 or amx_bf16.

    Without them PyTorch emulates bf16 on the CPU, several times slower than fp32.
    """
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def _nvidia_smi() -> list[Gpu]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    query = "--query-gpu=index,name,compute_cap,memory.total,uuid"
    try:
        out = subprocess.run(
            [exe, query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_nvidia_smi(out)


def parse_nvidia_smi(out: str) -> list[Gpu]:
    """GPUs from `nvidia-smi --query-gpu=index,name,compute_cap,memory.total,uuid` CSV output.

    A line that cannot be read (an old driver prints [N/A] for compute_cap) is
    skipped rather than crashing `check`.
    """
    gpus = []
    for line in out.strip().splitlines():
        fields = line.split(",")
        if len(fields) < 5:
            continue
        # The name is the only field that may itself hold a comma.
        index, name = fields[0].strip(), ",".join(fields[1:-3]).strip()
        cap, mem_mib, uuid = (f.strip() for f in fields[-3:])
        try:
            major, minor = (int(x) for x in cap.split("."))
            gpu = Gpu(int(index), name, (major, minor), int(float(mem_mib)) * 2**20)
        except ValueError:
            continue
        gpus.append(gpu)
        _UUIDS[gpu.index] = uuid
    return gpus


_UUIDS: dict[int, str] = {}


def _visible(gpus: list[Gpu]) -> tuple[Gpu, ...]:
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return tuple(gpus)
    chosen = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            break
        match = [g for g in gpus if str(g.index) == item or _UUIDS.get(g.index, "").startswith(item)]
        if not match:
            break  # CUDA stops at the first invalid entry
        chosen.append(match[0])
    # CUDA renumbers the visible devices from 0.
    return tuple(Gpu(i, g.name, g.capability, g.memory_bytes) for i, g in enumerate(chosen))
