"""The data files' content: each data path's size and sha256, as a checkpoint's resume signature
records them (launcher.plan.resume), cached so that a large corpus is read once.

Light side: the standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

# data.accept_changed's value: `content-` (so that YAML never reads it as a number) and 12 hex digits.
ACCEPT_PREFIX, ACCEPT_DIGITS = "content-", 12
DIGESTS = "digests"  # under MPLAUNCH_CACHE: one small file per data path
# A file changed this recently may change again within its timestamps' granularity (a second on
# some file systems) without a visible trace: its digest is not cached.
RACY_NS = 2_000_000_000
# The content a worker read when it started (`pin_data_content`), by path.
_PINNED: dict[str, dict[str, Any]] = {}


def data_content(paths: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Each data path's size in bytes and sha256, as a checkpoint's signature records them.

    A directory's (data.kind hf-disk) is that of its files' relative names and sha256s, its size
    their sum. A path this process pinned gives the pinned content. Digests are cached in
    MPLAUNCH_CACHE/digests (default ~/.cache/mplaunch), one small file per path holding each file's
    size, mtime_ns, ctime_ns and inode beside its sha256, so a 1 GB corpus is read once, not at every
    start and every checkpoint. The cache trusts that a file whose four facts are unchanged has its
    content unchanged: the kernel sets ctime at every write and no call can set it back, so an edit is
    seen even when its mtime is restored (touch -r, cp -p); not seen is a change that bypasses the file
    system (a disk's bit rot, a block-level write). Files changed in the last two seconds are not
    cached; deleting the digests folder makes every file read again.

    Raises:
        OSError: a data file cannot be read.
    """
    return {p: dict(_PINNED[p]) if p in _PINNED else _path_content(Path(p)) for p in paths}


def pin_data_content(paths: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """`data_content`, kept for the rest of this process: a worker pins the content it reads when it
    starts, so its checkpoints record what it trained on even if a file is edited during the run."""
    for p in paths:
        _PINNED.setdefault(p, _path_content(Path(p)))
    return data_content(paths)


def content_digest(content: dict[str, dict[str, Any]]) -> str:
    """sha256 of the data's content (each path's sha256 in order, not the paths' names)."""
    key = hashlib.sha256()
    for entry in content.values():
        key.update(str(entry["sha256"]).encode() + b"\0")
    return key.hexdigest()


def accept_token(content: dict[str, dict[str, Any]]) -> str:
    """The value of data.accept_changed that accepts this content."""
    return ACCEPT_PREFIX + content_digest(content)[:ACCEPT_DIGITS]


def _path_content(path: Path) -> dict[str, Any]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    names = [str(f.relative_to(path)) if f != path else "" for f in files]
    cache = Path(os.environ.get("MPLAUNCH_CACHE", Path.home() / ".cache" / "mplaunch")) / DIGESTS
    entry = cache / f"{hashlib.sha256(str(path).encode()).hexdigest()[:24]}.json"
    known = _read_json(entry).get("files")
    known = known if isinstance(known, dict) else {}
    now, fresh, digests = time.time_ns(), True, dict[str, list[Any]]()
    for name, file in zip(names, files, strict=True):
        facts = _facts(file)
        hit = known.get(name)
        if isinstance(hit, list) and hit[:-1] == facts:
            digests[name] = [*facts, hit[-1]]
        else:
            with open(file, "rb") as f:
                sha = hashlib.file_digest(f, "sha256").hexdigest()
            # Written while being read, or so recently that a same-size rewrite could keep its times.
            fresh &= _facts(file) == facts and now - max(facts[1], facts[2]) > RACY_NS
            digests[name] = [*facts, sha]
    if fresh and digests != known:
        _write_json(entry, {"path": str(path), "files": digests})
    if not path.is_dir():
        return {"bytes": digests[""][0], "sha256": digests[""][-1]}
    key = hashlib.sha256()
    for name in names:
        key.update(name.encode() + b"\0" + str(digests[name][-1]).encode() + b"\0")
    return {"bytes": sum(d[0] for d in digests.values()), "sha256": key.hexdigest()}


def _facts(file: Path) -> list[int]:
    st = file.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _write_json(path: Path, body: dict[str, Any]) -> None:
    """Best effort: an unwritable cache only means reading the files again next time."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(body) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
