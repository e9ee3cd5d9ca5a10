"""Command line: every verb's arguments are parsed here; each verb then calls one plain function.

mplaunch RECIPE [key=value ...] [--dry-run] [--resume RUN_DIR]
mplaunch RECIPE --slurm [--nodes N ...] [--dry-run]
mplaunch check RECIPE [key=value ...] [--explain [--markdown]]
mplaunch env
mplaunch recipes [NAME] [--copy PATH]
mplaunch plan RECIPE [key=value ...] [--gpu-memory SIZE] [--num-params N]
mplaunch report RUN_DIR [--out DIR]
mplaunch sweep RECIPE key=v1,v2 [key=value ...] [--points FILE] [--name NAME] [--dry-run] [--slurm ...]
mplaunch compare RUN_DIR... | SWEEP_DIR [--out DIR]
mplaunch parity RECIPE [key=value ...] --steps N [--tolerance F] [--out DIR]
mplaunch export RUN_DIR [--step N] [--dtype fp32|bf16|fp16] [--lora merge|adapter] --out DIR [--force]
mplaunch prepare RECIPE [key=value ...]

A UserError becomes one line per problem and exit 2.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from launcher import __version__
from launcher.analysis import parity
from launcher.analysis.report import write_report
from launcher.errors import UserError, report
from launcher.recipe import schema as recipe_mod
from launcher.recipe import shipped
from launcher.run import environment, export, slurm, start, sweep_local


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}", hint=f"see {self.prog} --help")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mplaunch` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        verb = args[0] if args and args[0] in VERBS else "run"
        if verb != "run":
            args = args[1:]
        return VERBS[verb](args)
    except UserError as err:
        return report(err)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `mplaunch check --explain | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _recipe_arguments(
    p: argparse.ArgumentParser, overrides_help: str = "dotted overrides, read as YAML scalars"
) -> None:
    p.add_argument("recipe", help="recipe file, or the name of a shipped recipe (see `mplaunch recipes`)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)


# --------------------------------------------------------------------------- run (and --slurm)

# Each Slurm flag sets one recipe key and is validated like `key=value`:
# (flag, key, metavar, help, whether its text is read as a YAML scalar like an override's).
SLURM_FLAGS = (
    ("--nodes", "launch.nnodes", "N", "nodes", True),
    ("--partition", "slurm.partition", "P", "partition", False),
    ("--time", "slurm.time", "T", "time limit, e.g. 04:00:00 or 1-00:00:00", False),
    ("--account", "slurm.account", "A", "account", False),
    ("--qos", "slurm.qos", "Q", "quality of service", False),
    ("--gpus-per-node", "slurm.gpus_per_node", "G", "GPUs per node, 0 for CPU", True),
)


def _run_parser() -> _Parser:
    p = _Parser(
        prog="mplaunch",
        description="Train the model a YAML recipe names, on DeepSpeed or Accelerate, with mixed precision.",
        epilog=(
            f"other commands: {', '.join(f'mplaunch {v}' for v in VERBS if v != 'run')} (each with --help). "
            "Overrides use the recipe's dotted keys: train.max_steps=20 precision.dtype=bf16 zero.stage=3"
        ),
    )
    p.add_argument(
        "recipe", nargs="?", help="recipe file, or the name of a shipped recipe (see `mplaunch recipes`)"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, read as YAML scalars")
    p.add_argument(
        "--dry-run", action="store_true", help="print the resolved plan and command; start nothing"
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its latest checkpoint (with RUN_DIR/recipe.yaml if no recipe is given)",
    )
    p.add_argument("--version", action="version", version=f"mplaunch {__version__}")
    _slurm_arguments(p, "render an sbatch script into RUN_DIR/slurm and submit it")
    return p


def _slurm_arguments(p: argparse.ArgumentParser, what: str) -> argparse._ArgumentGroup:
    g = p.add_argument_group("Slurm (with --slurm; each flag is the override of the recipe key named)")
    g.add_argument("--slurm", action="store_true", help=what)
    for flag, key, metavar, text, _ in SLURM_FLAGS:
        g.add_argument(flag, metavar=metavar, help=f"{text} ({key})")
    g.add_argument(
        "--slurm-template",
        metavar="PATH",
        help=f"your own Jinja2 template (default {slurm.DEFAULT_TEMPLATE.name})",
    )
    return g


def slurm_values(args: argparse.Namespace) -> dict[str, Any]:
    """The Slurm flags given, as recipe values; applied after the user's overrides (so the flags win)."""
    values: dict[str, Any] = {}
    for flag, key, _, _, as_yaml in SLURM_FLAGS:
        text = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if text is not None:
            # Counts are read like `key=value`; names and times stay text (1:00:00 is no number).
            values[key] = recipe_mod.parse_value(key, text) if as_yaml else text
    return values


def cmd_run(argv: list[str]) -> int:
    args = _run_parser().parse_intermixed_args(argv)
    recipe, overrides = args.recipe, args.overrides
    if args.resume and recipe and "=" in recipe and not Path(recipe).exists():
        # `mplaunch --resume DIR key=value`: argparse took the first override for the recipe.
        recipe, overrides = None, [recipe, *overrides]
    values: dict[str, Any] = {}
    if args.resume:
        saved, values = start.resume_target(args.resume, slurm_job=args.slurm)
        recipe = recipe or saved
    elif recipe is None:
        raise UserError("mplaunch: the following arguments are required: recipe", hint="see mplaunch --help")
    if args.slurm:
        template = Path(args.slurm_template) if args.slurm_template else None
        return start.submit(
            find_recipe(recipe), overrides, slurm_values(args), template, dry_run=args.dry_run
        )
    return start.start(
        find_recipe(recipe), overrides, values, dry_run=args.dry_run, resumed=bool(args.resume)
    )


def find_recipe(name: str) -> Path:
    """The recipe file `name` means for every verb that takes one: a file (as given, or with .yaml or
    .yml) before a shipped recipe by name; one line on stderr says which when both match. A mistyped
    verb gets a hint."""
    path, note = shipped.locate(name, verbs=[v for v in VERBS if v != "run"])
    if note is not None:
        print(f"mplaunch: {note}", file=sys.stderr)
    return path


# --------------------------------------------------------------------------- check, env, recipes


def cmd_check(argv: list[str]) -> int:
    p = _Parser(prog="mplaunch check", description="Validate a recipe and its plan; exit 0 if it would run.")
    p.add_argument("recipe", nargs="?", help="recipe file or shipped recipe name (optional with --explain)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--explain", action="store_true", help="also print every recipe key with its description")
    p.add_argument(
        "--markdown", action="store_true", help="with --explain: print the README's reference table"
    )
    args = p.parse_intermixed_args(argv)
    if args.recipe is None and not args.explain:
        p.error("the following arguments are required: recipe")
    path = find_recipe(args.recipe) if args.recipe is not None else None
    if path is not None:  # every problem of the recipe and of its plan at once (resolve.plan_file)
        from launcher.plan.hardware import Hardware
        from launcher.plan.resolve import plan_file
        from launcher.run.preflight import print_warnings

        plan = plan_file(path, args.overrides, Hardware.probe())
        print_warnings(plan.warnings)
        print(f"ok: {plan.recipe.source} ({plan.batch.equation(plan.nnodes, plan.nproc_per_node)})")
        if plan.precision.fp8 is not None:
            from launcher.plan.fp8 import summary

            print(summary(plan.precision))
    return start.check(None, args.overrides, explain=args.explain, markdown=args.markdown)


def cmd_env(argv: list[str]) -> int:
    _Parser(prog="mplaunch env", description="Report versions and GPUs.").parse_args(argv)
    print(environment.report())
    return 0


def cmd_recipes(argv: list[str]) -> int:
    p = _Parser(prog="mplaunch recipes", description="List, print or copy the shipped recipes.")
    p.add_argument("name", nargs="?", help="print this recipe")
    p.add_argument(
        "--copy", metavar="PATH", help="copy the recipe (and the files it extends) to PATH for editing"
    )
    args = p.parse_args(argv)
    if args.name is None:
        if args.copy:
            raise UserError("mplaunch recipes: --copy needs a recipe name")
        return shipped.list_all()
    # The shipped one, even beside an edited copy of the same name (what find_recipe's note points to).
    path = shipped.named(args.name) or find_recipe(args.name)
    return shipped.show(path) if args.copy is None else shipped.copy(path, args.copy)


# --------------------------------------------------------------------------- plan, report, parity

_UNITS = {"k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str) -> int:
    """80GB (decimal), 80GiB or 80G (binary, as Slurm reads it), 512MiB, ... -> bytes.

    Raises:
        UserError: not a positive size with a unit.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt])(i?b?)\s*", text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"--gpu-memory: expected a size such as 80GB, 80GiB or 24G, got {text!r}")
    number, unit, suffix = match.groups()
    base = 1000 if suffix.lower() == "b" else 1024
    return int(float(number) * base ** _UNITS[unit.lower()])


def parse_count(text: str) -> int:
    """350M, 1.3B, 20k, 1000 -> a parameter count (`--num-params`)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmb]?)\s*", text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"--num-params: expected a count such as 350M or 1.3B, got {text!r}")
    return int(float(match.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[match.group(2).lower()])


def cmd_plan(argv: list[str]) -> int:
    p = _Parser(prog="mplaunch plan", description="Estimate per-GPU memory under ZeRO stages 0-3.")
    _recipe_arguments(p)
    p.add_argument("--gpu-memory", metavar="SIZE", help="80GB (10^9 bytes), 80GiB or 80G; default: the GPU's")
    p.add_argument("--num-params", metavar="N", help="parameter count of a model.target model, e.g. 350M")
    args = p.parse_intermixed_args(argv)
    num_params = parse_count(args.num_params) if args.num_params is not None else None
    gpu_memory = (parse_size(args.gpu_memory), args.gpu_memory) if args.gpu_memory is not None else None
    return start.estimate(find_recipe(args.recipe), args.overrides, gpu_memory, num_params)


def cmd_report(argv: list[str]) -> int:
    p = _Parser(prog="mplaunch report", description="Plot a run's metrics and print a summary table.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory: finished, running, crashed or copied")
    p.add_argument("--out", metavar="DIR", help="where to write the PNGs (default: RUN_DIR/report)")
    args = p.parse_args(argv)
    write_report(Path(args.run_dir), Path(args.out) if args.out else None)
    return 0


def cmd_parity(argv: list[str]) -> int:
    p = _Parser(
        prog="mplaunch parity",
        description="Train N steps in the reference precision (fp32; bf16 for fp8) and in the recipe's mixed "
        "precision from the same seed and data; compare the losses. Exit 0 on PASS, 1 on FAIL.",
    )
    _recipe_arguments(p, overrides_help="dotted overrides for both runs")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps of each run")
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest final relative loss difference that passes "
        f"(default {parity.DEFAULT_TOLERANCE}; {parity.FP8_TOLERANCE} for fp8 against bf16)",
    )
    p.add_argument("--out", metavar="DIR", help="where the two runs go (default LOGGING_DIR/parity-NAME)")
    args = p.parse_intermixed_args(argv)
    if args.steps < 1:
        raise UserError(f"--steps: {args.steps}; need at least 1")
    if args.tolerance is not None and not (args.tolerance >= 0 and math.isfinite(args.tolerance)):
        raise UserError(f"--tolerance: {args.tolerance}; need a fraction >= 0, e.g. 0.02 for 2 %")
    out = Path(args.out) if args.out else None
    return parity.check(find_recipe(args.recipe), args.overrides, args.steps, args.tolerance, out)


# --------------------------------------------------------------------------- sweep, compare


def _sweep_parser() -> _Parser:
    p = _Parser(
        prog="mplaunch sweep",
        description="One run per point of a grid (commas inside [], {} or quotes do not split values) or of "
        "a --points file (crossed with the grid when both are given), each in SWEEP_DIR/POINT (SWEEP_DIR: "
        "the recipe's logging.dir/NAME). A rerun skips the finished points and resumes the others.",
    )
    _recipe_arguments(p, "key=v1,v2 sweeps a key (each combination is a point); key=value is for all")
    p.add_argument("--points", metavar="FILE", help="YAML list of points {dotted.key: value, name: N}")
    p.add_argument("--name", help="the sweep's folder in logging.dir (default: RECIPE_NAME-sweep)")
    p.add_argument("--dry-run", action="store_true", help="list the points and their state; start nothing")
    g = _slurm_arguments(p, "submit the unfinished points as one Slurm job array")
    g.add_argument("--max-parallel", type=int, metavar="N", help="at most N points running at once")
    return p


def cmd_sweep(argv: list[str]) -> int:
    args = _sweep_parser().parse_intermixed_args(argv)
    return sweep_local.sweep(
        find_recipe(args.recipe),
        args.overrides,
        points_file=Path(args.points) if args.points else None,
        name=args.name,
        dry_run=args.dry_run,
        slurm=args.slurm,
        values=slurm_values(args),
        template=Path(args.slurm_template) if args.slurm_template else None,
        max_parallel=args.max_parallel,
    )


def cmd_compare(argv: list[str]) -> int:
    p = _Parser(prog="mplaunch compare", description="One table and overlaid plots of several runs.")
    p.add_argument("targets", nargs="+", metavar="RUN_DIR", help="run directories, or one sweep's directory")
    p.add_argument("--out", metavar="DIR", help="where to write the PNGs")
    args = p.parse_args(argv)
    from launcher.analysis.compare_runs import compare

    code: int = compare([Path(t) for t in args.targets], Path(args.out) if args.out else None)
    return code


# --------------------------------------------------------------------------- export, prepare


def _export_parser() -> _Parser:
    p = _Parser(
        prog="mplaunch export",
        description="Write a run's trained weights (a verified checkpoint's fp32 master weights, "
        "consolidated) as a Hugging Face model directory with the run's tokenizer.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (it holds plan.json and checkpoints)")
    p.add_argument(
        "--step", type=int, metavar="N", help="the checkpoint's step (default: the newest complete one)"
    )
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="dtype of the written weights (default fp32)",
    )
    p.add_argument(
        "--lora",
        choices=("merge", "adapter"),
        default="merge",
        help="a LoRA run: merge the adapters into the weights (default), or write the adapters alone "
        "as a peft adapter directory naming the base model",
    )
    p.add_argument("--out", metavar="DIR", required=True, help="where to write; a new or empty directory")
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --out, replacing the files an export writes (others stay)",
    )
    return p


def cmd_export(argv: list[str]) -> int:
    args = _export_parser().parse_args(argv)
    return export.export(
        args.run_dir, args.out, step=args.step, dtype=args.dtype, lora=args.lora, force=args.force
    )


def cmd_prepare(argv: list[str]) -> int:
    p = _Parser(
        prog="mplaunch prepare",
        description="Tokenize a recipe's data files once into the token cache (MPLAUNCH_CACHE, default "
        "~/.cache/mplaunch), training its tokenizer first if it needs one; runs on the same files then map it.",
    )
    _recipe_arguments(p)
    args = p.parse_intermixed_args(argv)
    return start.prepare(find_recipe(args.recipe), args.overrides)


VERBS: dict[str, Callable[[list[str]], int]] = {
    "run": cmd_run,
    "check": cmd_check,
    "env": cmd_env,
    "recipes": cmd_recipes,
    "plan": cmd_plan,
    "report": cmd_report,
    "parity": cmd_parity,
    "export": cmd_export,
    "prepare": cmd_prepare,
    "sweep": cmd_sweep,
    "compare": cmd_compare,
}
