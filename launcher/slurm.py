"""Slurm: placeholder until the Slurm issue lands (replaced by its implementation)."""

from __future__ import annotations

import argparse

from launcher.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slurm", action="store_true", help="render an sbatch script and submit it")


def run(args: argparse.Namespace) -> int:
    raise UserError("--slurm is not available yet")
