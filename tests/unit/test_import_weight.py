"""`mplaunch --help`, `check` and `--dry-run` stay on the light side: no torch, deepspeed, accelerate, transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "deepspeed", "accelerate", "transformers")

# Runs in a fresh interpreter so that nothing another test imported counts.
PROBE = """
import json, sys
from launcher import cli
try:
    code = cli.main(sys.argv[1:])
except SystemExit as exc:  # --help
    code = exc.code
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print(json.dumps({{"code": code, "heavy": heavy}}))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["check", "recipes/bert.yaml"],
        ["check", "recipes/bert_tiny.yaml", "--explain"],
        ["recipes/bert.yaml", "--dry-run"],
        ["recipes/bert_tiny.yaml", "--dry-run", "backend=accelerate", "zero.stage=3"],
        ["recipes"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_light_commands_import_no_heavy_library(argv: list[str]) -> None:
    code = PROBE.format(heavy=HEAVY)
    out = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}, out.stderr
