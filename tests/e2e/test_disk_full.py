"""A real run on a disk that fills: the save that found it full leaves nothing on it, every error
report that exists says why, a start while the disk is still full is one line with nothing left
behind, and once there is room the run resumes from the checkpoint it kept.

The disk is a 12 MiB tmpfs (root and a kernel that lets the container mount one; skipped
otherwise): room for the run directory and one checkpoint of the tiny model (8.6 MB), not two.
The same writes fail in-process in tests/unit/test_disk_full.py and tests/worker/test_disk_full.py.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

import pytest

from launcher.rundir import checkpoint
from tests.runs import FAST, explain, losses, mplaunch, records, write_recipe


def _fill(disk: Path) -> Path:
    """Write a file until the disk is full; returns it."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
    assert shutil.disk_usage(disk).free == 0
    return filler


def _temporaries(disk: Path) -> list[str]:
    return sorted(str(p) for p in disk.rglob("*") if ".tmp" in p.name)


@pytest.mark.slow
def test_a_full_disk_leaves_nothing_behind_and_a_start_while_full_is_one_line(tiny_disk: Path) -> None:
    layer = {"logging": {"dir": str(tiny_disk / "runs")}, "checkpoint": {"every_steps": 2, "keep": 3}}
    recipe = write_recipe(tiny_disk.parent, "full", FAST, layer)
    run_dir = tiny_disk / "runs" / "full"
    root = run_dir / "checkpoints"

    result = mplaunch(str(recipe), timeout=300)
    assert result.returncode == 1, explain(result)
    headline = [line for line in result.stderr.splitlines() if "the run failed" in line]
    assert len(headline) == 1, explain(result)
    assert f"no space left on device: {root} (" in headline[0], headline
    assert _temporaries(tiny_disk) == []  # the half-written .tmp-step-00000004 is gone
    reports = sorted(run_dir.glob("logs/rank-*.err"))
    assert reports, explain(result)
    assert all(p.read_text().strip() for p in reports), [p.name for p in reports]  # none is empty
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]
    manifest = checkpoint.read_manifest(root / "step-00000002")
    names = [name for name, _ in checkpoint.listed(manifest)]
    assert checkpoint.check_checksums(root / "step-00000002", manifest, names) is None

    plan_json = (run_dir / "plan.json").read_bytes()
    filler = _fill(tiny_disk)
    result = mplaunch(str(recipe), timeout=300)
    assert result.returncode == 2, explain(result)
    assert "Traceback" not in result.stderr, explain(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, explain(result)
    assert errors[0].startswith(f"error: no space left on device: {run_dir}"), errors
    assert "nothing was started: free space there" in errors[0]
    assert _temporaries(tiny_disk) == []
    assert (run_dir / "plan.json").read_bytes() == plan_json

    # Room again (the file system grown, the filler gone): the run resumes from step 2.
    filler.unlink()
    subprocess.run(["mount", "-o", "remount,size=32m", str(tiny_disk)], check=True)
    result = mplaunch(str(recipe), timeout=300)
    assert result.returncode == 0, explain(result)
    assert "resuming from step 2" in result.stdout, explain(result)
    assert [r["from_step"] for r in records(run_dir, "event") if r["event"] == "resume"] == [2]
    assert max(losses(run_dir)) == FAST["train"]["max_steps"]
    assert _temporaries(tiny_disk) == []
