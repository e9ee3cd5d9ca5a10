"""Whose checkpoints: one folder per run when runs share a checkpoint.dir, and what a rerun will do.

A checkpoint.dir inside the run directory (the default RUN_DIR/checkpoints, or a relative
path that stays inside) is the run's own. One outside it may be shared by runs, so each run
keeps its checkpoints in its own subfolder, checkpoint.dir/NAME (launcher.rundir.layout),
and every manifest names the run directory that wrote it (`identity`): a run neither resumes
from nor prunes a checkpoint another run directory wrote (the same NAME under another
logging.dir). A run directory that was moved is no other run: its old path holds no run.

mplaunch before this layout wrote every run's checkpoints straight into a shared
checkpoint.dir. `legacy` finds this run's among them by the name their manifests' recipe
records, and `adopt` moves them into the run's folder (the launcher does, holding the run's
lock, before it starts); until then `report`, `export` and `--resume` read them where they are.

Light side: the standard library only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from launcher.rundir import checkpoint

RUN_KEY = "run"  # the manifest's record of the run that wrote it: {"name": ..., "dir": ...}


def identity(run_path: Path) -> dict[str, str]:
    """What a manifest records of the run writing it: its name and absolute directory."""
    path = Path(os.path.abspath(run_path))
    return {"name": path.name, "dir": str(path)}


def writer(manifest: dict[str, Any]) -> str | None:
    """The run directory that wrote a checkpoint, as its manifest names it (None: it does not)."""
    run = manifest.get(RUN_KEY)
    return str(run["dir"]) if isinstance(run, dict) and isinstance(run.get("dir"), str) else None


def foreign(manifest: dict[str, Any], run_path: Path) -> str | None:
    """The other run directory that wrote a checkpoint found in the folder of the run at `run_path`
    (the same name under another logging.dir), or None when it is this run's: written here, not
    named (an older mplaunch), or named for a directory that is gone (this run, moved)."""
    other = writer(manifest)
    if other is None or os.path.realpath(other) == os.path.realpath(run_path):
        return None
    return other if Path(other).is_dir() else None


def resume_point(root: Path, shared: Path | None) -> checkpoint.Found:
    """`checkpoint.find_latest(root)`; where `root` has no complete checkpoint (nor a corrupt one),
    the newest of this run's checkpoints in the older layout of the shared folder `shared`."""
    found = checkpoint.find_latest(root)
    if found.path is None and shared is not None and not checkpoint.corrupt(root):
        older = legacy_found(shared, root.name)
        return older if older.path is not None else found
    return found


def complete(root: Path, shared: Path | None) -> list[tuple[Path, dict[str, Any]]]:
    """The complete checkpoints in `root`, else those of this run in the older layout of `shared`,
    with their manifests, the highest step first."""
    found = checkpoint.newest_first(root)
    return legacy(shared, root.name) if not found and shared is not None else found


def run_name(manifest: dict[str, Any]) -> str | None:
    """The name of the run that wrote a checkpoint: its run record's, else its recipe's."""
    for section in (manifest.get(RUN_KEY), manifest.get("recipe")):
        if isinstance(section, dict) and isinstance(section.get("name"), str):
            return str(section["name"])
    return None


def legacy(shared: Path, name: str) -> list[tuple[Path, dict[str, Any]]]:
    """The complete checkpoints of run `name` that an older mplaunch wrote straight into the
    shared checkpoint.dir `shared`, the highest step first."""
    return [(p, m) for p, m in checkpoint.newest_first(shared) if run_name(m) == name]


def legacy_found(shared: Path, name: str) -> checkpoint.Found:
    """The newest of `legacy` whose files are there at their sizes (the launcher's resume check)."""
    for path, manifest in legacy(shared, name):
        if checkpoint.check_sizes(path, manifest) is None:
            return checkpoint.Found(path, manifest, ())
    return checkpoint.Found(None, None, ())


def adopt(shared: Path, root: Path, name: str) -> list[str]:
    """Move run `name`'s checkpoints (complete or kept as corrupt) from the older shared layout
    into its folder `root`; returns their names. Another run's, and anything whose run cannot
    be told (no readable manifest), stay where they are."""
    mine = [p for p, _ in legacy(shared, name)]
    for path in checkpoint.corrupt(shared):
        try:
            if run_name(checkpoint.read_manifest(path)) == name:
                mine.append(path)
        except (OSError, ValueError):
            continue
    moved = []
    for path in sorted(mine):
        if not (root / path.name).exists():
            root.mkdir(parents=True, exist_ok=True)
            path.rename(root / path.name)  # the same file system: one atomic rename each
            moved.append(path.name)
    return moved


def rerun(root: Path) -> str:
    """What running the same recipe again will do with the checkpoints in `root`, in a few words
    (after a failure; launcher.run.preflight.check_resume decides it the same way)."""
    found = checkpoint.find_latest(root)
    if found.manifest is not None:
        return (
            f"checkpoints are in {root}; running the same recipe again resumes from the latest complete "
            f"one, step {found.manifest['step']}"
        )
    bad = checkpoint.corrupt(root)
    if bad:
        return (
            f"no checkpoint in {root} passed verification ({', '.join(p.name for p in bad)}, kept for "
            f"inspection); running the same recipe again is refused {UNTIL_MOVED}"
        )
    return f"no checkpoint was saved in {root}; running the same recipe again starts from step 0"


# Why a run whose checkpoints all failed verification does not start afresh, and how it can.
UNTIL_MOVED = (
    "until they are moved away (checkpoint.resume=never starts from step 0 beside them; "
    "another name starts a new run)"
)
