"""Files damaged the way disks and crashes damage them, for the checkpoint integrity tests of every tier."""

from __future__ import annotations

import random
from pathlib import Path


def flip_bytes(path: Path, rng: random.Random | None = None, count: int = 64) -> None:
    """Invert `count` bytes of a file in place (a start chosen by `rng`): its size stays, its checksum changes."""
    data = bytearray(path.read_bytes())
    start = (rng or random.Random(0)).randrange(0, max(1, len(data) - count))
    for i in range(start, min(len(data), start + count)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    """Cut a file to half its size, as a crash mid-write leaves it."""
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
