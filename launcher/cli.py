"""Command line: parse argv into a verb, turn UserError into one line per problem and exit 2.

mplaunch RECIPE [key=value ...] [--dry-run] [--resume RUN_DIR]
mplaunch check RECIPE [key=value ...] [--explain]
mplaunch env
mplaunch recipes [NAME] [--copy PATH]
mplaunch plan RECIPE [key=value ...] [--gpu-memory SIZE]
mplaunch RECIPE --slurm [--nodes N ...] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from launcher import __version__
from launcher import recipe as recipe_mod
from launcher.errors import EXIT_USAGE, UserError
from launcher.hardware import Hardware
from launcher.plan import Plan, prepare_vocab, resolve
from launcher.recipe import RECIPES_DIR


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
        for line in err.lines:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `mplaunch check --explain | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _run_parser() -> _Parser:
    p = _Parser(
        prog="mplaunch",
        description="Train the model a YAML recipe names, on DeepSpeed or Accelerate, with mixed precision.",
        epilog=(
            "other commands: mplaunch check RECIPE | mplaunch env | mplaunch recipes [NAME]. "
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
    from launcher import slurm

    slurm.add_arguments(p)
    return p


def cmd_run(argv: list[str]) -> int:
    args = _run_parser().parse_intermixed_args(argv)
    if args.resume and args.recipe and "=" in args.recipe and not Path(args.recipe).exists():
        # `mplaunch --resume DIR key=value`: argparse took the first override for the recipe.
        args.recipe, args.overrides = None, [args.recipe, *args.overrides]
    if args.resume:
        args.recipe, args.overrides = _resume_target(args.resume, args.recipe, args.overrides, args.slurm)
    elif args.recipe is None:
        raise UserError("mplaunch: the following arguments are required: recipe", hint="see mplaunch --help")
    if args.slurm:
        from launcher import slurm

        return slurm.run(args)
    plan = _plan(args.recipe, args.overrides, keep_machine_problems=args.dry_run, train_tokenizer=not args.dry_run)
    if args.dry_run:
        print("mplaunch dry run: nothing is started")
        from launcher import memory

        print(plan.describe(memory.describe(plan)))
        # The whole plan is shown (it may be meant for another machine), but
        # the exit code is what a real run here would give: scripts that use
        # --dry-run as a pre-flight check must not be told "ok".
        if plan.problems:
            raise UserError([f"this machine cannot run the plan above: {p}" for p in plan.problems])
        return 0
    _print_warnings(plan.warnings)
    from launcher import launch

    return launch.run(plan)


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
    if args.recipe is not None:
        plan = _plan(args.recipe, args.overrides)
        _print_warnings(plan.warnings)
        print(f"ok: {plan.recipe.source} ({plan.batch.equation(plan.nnodes, plan.nproc_per_node)})")
    if args.explain and args.markdown:
        print(recipe_mod.reference_markdown())
    elif args.explain:
        for key, type_, default, doc in recipe_mod.reference_rows():
            print(f"{key:<44} {type_:<34} {default:<10} {doc}")
    return 0


def cmd_env(argv: list[str]) -> int:
    _Parser(prog="mplaunch env", description="Report versions and GPUs.").parse_args(argv)
    from launcher.environment import report

    print(report())
    return 0


def cmd_recipes(argv: list[str]) -> int:
    p = _Parser(prog="mplaunch recipes", description="List, print or copy the shipped recipes.")
    p.add_argument("name", nargs="?", help="print this recipe")
    p.add_argument(
        "--copy", metavar="PATH", help="copy the recipe (and the files it extends) to PATH for editing"
    )
    args = p.parse_args(argv)
    shipped = sorted(RECIPES_DIR.glob("*.yaml"))
    if args.name is None:
        if args.copy:
            raise UserError("mplaunch recipes: --copy needs a recipe name")
        for path in shipped:
            first = path.read_text().splitlines()[0] if path.read_text() else ""
            print(f"{path.stem:<16} {first.lstrip('# ')}")
        return 0
    path = find_recipe(args.name)
    if args.copy is None:
        print(path.read_text(), end="")
        return 0
    return _copy_recipe(path, Path(args.copy))


def _copy_recipe(path: Path, dest: Path) -> int:
    """Copy a recipe with the files it extends and the data it names, so the copy loads on its own."""
    if dest.is_dir():
        dest = dest / path.name
    pairs = _copy_pairs(path, dest)
    # A base or data file already there with the same bytes (an earlier copy of
    # a sibling recipe) is shared; anything else, and the recipe itself, is refused.
    clashes = [
        str(t)
        for s, t in pairs
        if t.exists() and (t == dest or t.is_dir() or t.read_bytes() != s.read_bytes())
    ]
    if clashes:
        raise UserError([f"{t}: already exists; nothing was copied" for t in clashes])
    for src, target in pairs:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
            print(f"copied {src} -> {target}")
    return 0


def _copy_pairs(path: Path, dest: Path) -> list[tuple[Path, Path]]:
    # Each file keeps its position relative to the file that names it, so
    # `extends:` and `data.paths` in the copies stay correct unedited.
    pairs: list[tuple[Path, Path]] = []
    src: Path | None = path
    while src is not None and src.resolve() not in {s.resolve() for s, _ in pairs}:
        pairs.append((src, dest))
        raw = recipe_mod.read_file(src)
        data = raw.get("data")
        names = data.get("paths", []) if isinstance(data, dict) else []
        for name in names if isinstance(names, list) else []:
            if isinstance(name, str) and not Path(name).is_absolute() and (src.parent / name).is_file():
                pairs.append((src.parent / name, dest.parent / name))
        parent = raw.get("extends")
        src, dest = (src.parent / parent, dest.parent / parent) if isinstance(parent, str) else (None, dest)
    return pairs


def _resume_target(
    run_dir: str, recipe: str | None, overrides: list[str], slurm: bool
) -> tuple[str, list[str]]:
    """The recipe and overrides that continue the run in `run_dir` (`--resume RUN_DIR`)."""
    from launcher import checkpoint

    if slurm:
        raise UserError(
            "--resume: a Slurm job resumes by itself",
            hint=f"resubmit it: sbatch {Path(run_dir) / 'slurm' / 'job.sbatch'}",
        )
    path = Path(run_dir).resolve()
    saved = path / "recipe.yaml"
    if not saved.is_file():
        raise UserError(f"--resume {run_dir}: not a run directory (no recipe.yaml in {path})")
    where = [f"logging.dir={json.dumps(str(path.parent))}", f"name={json.dumps(path.name)}"]
    root = checkpoint.root(path, recipe_mod.load(saved, where).checkpoint.dir)
    if checkpoint.find_latest(root).path is None:
        raise UserError(f"--resume {run_dir}: no complete checkpoint in {root}; nothing to resume")
    return recipe or str(saved), [*overrides, *where, "checkpoint.resume=auto"]


def find_recipe(name: str) -> Path:
    """A recipe path as given, or a shipped recipe by name; a mistyped verb gets a hint."""
    return recipe_mod.locate(name, verbs=[v for v in VERBS if v != "run"])


def _plan(
    recipe_arg: str, overrides: list[str], keep_machine_problems: bool = False, train_tokenizer: bool = False
) -> Plan:
    recipe = recipe_mod.load(find_recipe(recipe_arg), overrides)
    if train_tokenizer:  # a real launch: the plan then knows the trained tokenizer's exact vocabulary
        prepare_vocab(recipe)
    return resolve(recipe, Hardware.probe(), keep_machine_problems=keep_machine_problems)


def cmd_plan(argv: list[str]) -> int:
    from launcher import memory

    return memory.main(argv)


def cmd_report(argv: list[str]) -> int:
    from launcher import report

    return report.main(argv)


def cmd_parity(argv: list[str]) -> int:
    from launcher import parity

    return parity.main(argv)


def _print_warnings(warnings: Sequence[str]) -> None:
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)


VERBS: dict[str, Callable[[list[str]], int]] = {
    "run": cmd_run,
    "check": cmd_check,
    "env": cmd_env,
    "recipes": cmd_recipes,
    "plan": cmd_plan,
    "report": cmd_report,
    "parity": cmd_parity,
}
