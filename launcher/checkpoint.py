"""Checkpoints that are never half-written, and finding the one to resume from.

A checkpoint is written into `.tmp-step-N`, every file fsynced, then renamed
to `step-N`; the `latest` pointer is replaced atomically afterwards. Only a
directory with a `manifest.json` counts as complete, and the manifest is the
last file written before the rename. A crash at any point therefore leaves
either the previous complete checkpoint or the new one, never a torn one.

This module reads manifests without torch so the launcher can check a resume
before starting any worker; where the checkpoint root is comes from
launcher.rundir, and when and what to save (RNG state, data position) from the
worker-side launcher.checkpointer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
LATEST = "latest"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1
# A resume must match these exactly; anything else in the recipe may change (with a warning).
STRUCTURAL = ("world_size", "backend", "zero_stage")


@dataclass(frozen=True)
class Found:
    """The checkpoint to resume from (or None) and what was skipped on the way."""

    path: Path | None
    manifest: dict[str, Any] | None
    ignored: tuple[str, ...]


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def recipe_hash(recipe_dict: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe_dict, sort_keys=True).encode()).hexdigest()[:16]


def find_latest(root: Path) -> Found:
    """The newest complete checkpoint under `root`: the `latest` pointer if it names a
    complete one, else the highest complete `step-N`. Partial directories are reported."""
    ignored = [f"{p.name}: incomplete (no {MANIFEST}), ignored" for p in _step_dirs(root) if not _complete(p)]
    ignored += (
        [f"{p.name}: interrupted write, ignored" for p in root.glob(f"{TMP_PREFIX}*")]
        if root.is_dir()
        else []
    )
    candidates = []
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if _complete(named):
            candidates.append(named)
    sealed = complete(root)
    if sealed:
        candidates.append(sealed[-1])
    if not candidates:
        return Found(None, None, tuple(ignored))
    # The pointer may lag the newest rename by one checkpoint if the writer died in between.
    best = max(candidates, key=lambda p: read_manifest(p)["step"])
    return Found(best, read_manifest(best), tuple(ignored))


def read_manifest(path: Path) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((path / MANIFEST).read_text())
    return manifest


def structure(plan: Any) -> dict[str, Any]:
    """What a checkpoint's shards depend on: a resume must match it exactly."""
    return {
        "world_size": plan.world_size,
        "backend": plan.recipe.backend,
        "zero_stage": plan.recipe.zero.stage,
    }


def mismatch(manifest: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What makes a checkpoint unusable for the current plan, one line each."""
    names = {"world_size": "world size", "backend": "backend", "zero_stage": "ZeRO stage"}
    return [
        f"the checkpoint was written with {names[k]} {manifest[k]}, this run has {current[k]}"
        for k in STRUCTURAL
        if manifest.get(k) != current[k]
    ]


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved recipes."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(prefix + key)
    return out


def complete(root: Path) -> list[Path]:
    """The complete checkpoints under `root` (a manifest with a step), oldest first."""
    return sorted((p for p in _step_dirs(root) if _complete(p)), key=lambda p: p.name)


def _step_dirs(root: Path) -> list[Path]:
    return [p for p in root.glob(f"{PREFIX}*") if p.is_dir()] if root.is_dir() else []


def _complete(path: Path) -> bool:
    if not (path / MANIFEST).is_file():
        return False
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError):
        return False
    return isinstance(manifest.get("step"), int)


# --------------------------------------------------------------------------- writing (rank 0)


def tmp_dir(root: Path, step: int) -> Path:
    """Where checkpoint `step` is written before it is sealed."""
    return root / f"{TMP_PREFIX}{PREFIX}{step:08d}"


def begin(root: Path, step: int) -> Path:
    """A fresh temporary directory for checkpoint `step` (rank 0, before the ranks write)."""
    tmp = tmp_dir(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, manifest: dict[str, Any], keep: int) -> Path:
    """Seal a fully written temporary directory as the newest checkpoint (rank 0, after a barrier).

    Returns:
        The final `step-N` directory.
    """
    manifest = {**manifest, "format": FORMAT_VERSION, "time": time.time()}
    write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2))
    for path in sorted(tmp.rglob("*")):
        if path.is_file():
            _fsync_file(path)
    for path in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
        _fsync_dir(path)
    _fsync_dir(tmp)
    final = step_dir(tmp.parent, manifest["step"])
    if final.exists():
        # Re-saving a step (a resumed run reaching it again): the old copy goes only after the new one is sealed.
        old = tmp.parent / f"{TMP_PREFIX}old-{final.name}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(final.parent)
    write_atomic(final.parent / LATEST, final.name + "\n")
    prune(final.parent, keep)
    return final


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints; never the one `latest` names."""
    pointer = root / LATEST
    protected = pointer.read_text().strip() if pointer.is_file() else None
    doomed = [p for p in complete(root)[:-keep] if p.name != protected] if keep else []
    for path in doomed:
        # Renamed first so a crash mid-delete leaves no directory that looks complete.
        trash = root / f"{TMP_PREFIX}del-{path.name}"
        path.rename(trash)
        shutil.rmtree(trash)
    # Leftovers of saves or deletions a crash interrupted; only rank 0 writes here, after the save.
    for stale in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    return doomed


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` all at once (temporary file, fsync, rename): readers see
    the old content or the new, never part of it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
