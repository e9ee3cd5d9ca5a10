"""A full disk, said in one line wherever mplaunch writes: the lock, plan.json, checkpoints, error files.

A write that fails for want of space raises OSError with errno ENOSPC (or EDQUOT, a
quota), naming the path. torch.save's writer is the exception: on a full disk it fails
with an opaque RuntimeError from inline_container.cc that names no path, so it counts
as a full disk when the file system it wrote to has less than NEARLY_FULL_BYTES free.
`message` is the one line either way; `refused_when_full` turns the launcher's own
writes into that line (a UserError: exit 2) before any worker starts.

Light side: the standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import re
import shutil
import traceback
from collections.abc import Iterator
from pathlib import Path

from launcher.errors import UserError

# A file system with less free space than this is full for a checkpoint: torch.save's
# opaque write errors then mean no space left, whatever the few bytes left over.
NEARLY_FULL_BYTES = 1 << 20
FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
_TORCH_WRITE_FAILED = re.compile(r"file write failed|inline_container\.cc|PytorchStreamWriter")
# What the launcher says when its own write fails: nothing has started, so nothing is half-done.
NOT_STARTED = (
    "nothing was started: free space there (or set logging.dir or checkpoint.dir to a larger file system) "
    "and run again"
)


class DiskFull(OSError):
    """A full disk's error raised again after the failed write's files were removed: `free_bytes`
    is what the write found, not the room the cleanup made."""

    free_bytes: int | None = None


def is_full(exc: BaseException) -> bool:
    """True for an OSError of a full file system or an exhausted quota."""
    return isinstance(exc, OSError) and exc.errno in FULL


def full_error(exc: BaseException, where: Path) -> DiskFull | None:
    """`exc` as a DiskFull naming `where` when a full file system caused it, else None.

    Call it before removing anything a failed write left: the free space it records (and, for
    torch.save's pathless errors, judges by) is the space that write found.
    """
    free = free_bytes(where)
    if is_full(exc):
        assert isinstance(exc, OSError)
        code = exc.errno or errno.ENOSPC
    elif isinstance(exc, RuntimeError) and _TORCH_WRITE_FAILED.search(str(exc)):
        if free is None or free >= NEARLY_FULL_BYTES:
            return None
        code = errno.ENOSPC
    else:
        return None
    full = DiskFull(code, os.strerror(code), str(where))
    full.free_bytes = free
    return full


def remove_partial(directory: Path, exc: BaseException) -> None:
    """Remove what a write that failed with `exc` left in `directory`, freeing its space: first the
    files the failed writers' frames still hold open are closed (a removed file's space is freed
    only once it is closed), by clearing those frames; the traceback's lines survive."""
    traceback.clear_frames(exc.__traceback__)
    gc.collect()  # a writer in a reference cycle
    shutil.rmtree(directory, ignore_errors=True)


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system of `path` or its nearest existing parent."""
    for candidate in (Path(path), *Path(path).parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def message(exc: OSError, fallback: Path, then: str) -> str:
    """ "no space left on device: PATH (N bytes free); THEN" for a full-disk OSError (`is_full`).

    PATH is the file the write named, else `fallback`.
    """
    path = str(exc.filename) if exc.filename else str(fallback)
    free = exc.free_bytes if isinstance(exc, DiskFull) else free_bytes(path)
    shown = "unknown bytes free" if free is None else f"{free:,} bytes free"
    return f"{FULL.get(exc.errno or 0, 'no space left on device')}: {path} ({shown}); {then}"


@contextlib.contextmanager
def refused_when_full(fallback: Path) -> Iterator[None]:
    """Turn a full disk inside the block into the one-line UserError (`message`, NOT_STARTED).

    For the launcher's writes before any worker starts (the lock, plan.json and its
    neighbours, moving or removing checkpoints); other errors pass through unchanged.
    """
    try:
        yield
    except OSError as exc:
        if not is_full(exc):
            raise
        raise UserError(message(exc, fallback, NOT_STARTED)) from None
