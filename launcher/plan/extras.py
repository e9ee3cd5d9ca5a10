"""What a recipe needs installed beyond mplaunch's own dependencies, and the one line that says how
to install what is missing.

pyproject.toml's extras: `train` (what a run imports), `deepspeed` (installed after torch and without
build isolation: its build imports torch), `report` (`mplaunch report`'s plots), `fp8` (torchao,
for precision.dtype fp8), `wandb` and `mlflow` (logging.trackers). `PACKAGES` says
which extra brings each package, `needs` which recipe setting needs it. A package is looked up with
importlib.util.find_spec, which imports nothing, so `check` and the dry run stay light.

Who asks: launcher.plan.resolve, through `machine_problems` (a package this machine lacks is a
problem of this machine, like a missing GPU: `check` and a launch refuse before any worker starts,
the dry run shows the plan and exits 2) and `require_packages` (before the launcher trains a
tokenizer); launcher.plan.no_effect (`warnings`); launcher.run.export, before the export process
starts; and the worker processes' import guard (launcher.worker), for a package missing there
after all (`import_error_line`).

Light side: the standard library and light launcher modules only.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

from launcher.errors import UserError
from launcher.plan.records import DATASETS_KINDS
from launcher.recipe.sections import Recipe

Extra = Literal["train", "deepspeed", "report", "fp8", "wandb", "mlflow"]
# The import name of each package of pyproject.toml's extras (the same as its distribution's name).
PACKAGES: dict[str, Extra] = {
    "torch": "train",
    "numpy": "train",
    "transformers": "train",
    "tokenizers": "train",
    "datasets": "train",
    "accelerate": "train",
    "peft": "train",
    "tensorboard": "train",
    "deepspeed": "deepspeed",
    "matplotlib": "report",
    "torchao": "fp8",
    "wandb": "wandb",
    "mlflow": "mlflow",  # the mlflow-skinny distribution (the client, no server) is imported as mlflow
}
# When a run needs a package: to plan at all (the data files are read with it, even by a dry run),
# in the launcher before any worker starts (it trains the tokenizer and tokenizes the data), or in
# the workers. `check` and a launch need all three; a dry run and `mplaunch plan` only the first.
Stage = Literal["plan", "launcher", "workers"]
STAGES: tuple[Stage, ...] = ("plan", "launcher", "workers")
DIST_NAME = "mplaunch"


@dataclass(frozen=True)
class Need:
    """One package a recipe needs, and why (the recipe setting, as the user wrote it)."""

    module: str
    reason: str
    stage: Stage = "workers"
    optional: bool = False  # the run goes on without it, less what it gives: a warning, not a problem
    run: bool = True  # a training run imports it
    export: bool = True  # `mplaunch export` of such a run imports it

    @property
    def extra(self) -> Extra:
        return PACKAGES[self.module]


def needs(recipe: Recipe) -> list[Need]:
    """Every package of an extra that a run of `recipe` (and its export) imports."""
    d, m = recipe.data, recipe.model
    text = d.kind != "synthetic"
    rows = [Need("torch", "every run"), Need("numpy", "every run", stage="launcher" if text else "workers")]
    if m.hf is not None:
        rows.append(Need("transformers", "model.hf"))
    elif m.name is not None and m.name != "tiny-mlp":  # the built-in transformers are transformers' classes
        rows.append(Need("transformers", f"model.name {m.name}"))
    if text:
        rows.append(Need("tokenizers", f"data.kind {d.kind}", stage="launcher"))
        rows.append(Need("transformers", "the exported tokenizer", run=False))
    if d.kind in DATASETS_KINDS or d.kind == "hf-disk":
        rows.append(Need("datasets", f"data.kind {d.kind}", stage="plan", export=False))
    if recipe.backend == "deepspeed":
        rows.append(Need("deepspeed", "backend deepspeed"))
    else:
        rows.append(Need("accelerate", "backend accelerate", export=False))
    if m.lora.rank:
        rows.append(Need("peft", f"model.lora.rank {m.lora.rank}"))
    if recipe.precision.dtype == "fp8":  # an fp8 run's export is a plain bf16/fp32 model
        rows.append(Need("torchao", "precision.dtype fp8", export=False))
    trackers = recipe.logging.enabled_trackers
    if "tensorboard" in trackers:
        rows.append(Need("tensorboard", "logging.tensorboard", optional=True, export=False))
    # Asked for by name, so refused when missing (a tracker that fails later only warns: the worker's).
    rows += [Need(t, f"logging.trackers {t}", export=False) for t in trackers if t != "tensorboard"]
    return rows


def problems(recipe: Recipe, up_to: Stage = "workers") -> list[str]:
    """One line per extra whose packages a run of `recipe` needs by stage `up_to` and this machine
    lacks: the packages, why, and the `pip install` that brings them. Empty when nothing is missing."""
    stages = STAGES[: STAGES.index(up_to) + 1]
    return _lines([n for n in needs(recipe) if n.run and not n.optional and n.stage in stages])


def machine_problems(recipe: Recipe) -> list[str]:
    """`problems`, as the plan keeps them: a dry run shows the plan, then refuses it.

    Raises:
        UserError: a package needed to plan at all is missing (every package the run lacks is named).
    """
    require_packages(recipe, up_to="plan")
    return problems(recipe)


def require_packages(recipe: Recipe, up_to: Stage) -> None:
    """Refuse a run of `recipe` that lacks a package needed by stage `up_to`, naming every package it lacks.

    Raises:
        UserError: one line per extra with missing packages.
    """
    if problems(recipe, up_to):
        raise UserError(problems(recipe))


def export_problems(recipe: Recipe) -> list[str]:
    """As `problems`, for `mplaunch export` of a run of `recipe`."""
    return _lines([n for n in needs(recipe) if n.export and not n.optional])


def warnings(recipe: Recipe) -> list[str]:
    """A `key: ...` warning per package a run of `recipe` goes on without, less what it gives."""
    return [
        f"{n.reason}: {n.module} is not installed, so the run writes no TensorBoard logs; "
        f"install it with {install_command(n.extra)}, or set {n.reason}=false"
        for n in needs(recipe)
        if n.optional and not installed(n.module)
    ]


def problem(module: str, reason: str) -> str | None:
    """The line for one package `reason` (a verb, say) needs, or None if it is installed."""
    lines = _lines([Need(module, reason)])
    return lines[0] if lines else None


def import_error_line(exc: BaseException) -> str | None:
    """The line for an ImportError a process died of, when it is a package of an extra that is not
    installed (`No module named 'numpy'`); None for anything else (a missing submodule or name is
    another version of the package, not a missing one)."""
    name = getattr(exc, "name", None)
    if not isinstance(exc, ModuleNotFoundError) or name not in PACKAGES:
        return None
    return _line(PACKAGES[name], [name])


def installed(module: str) -> bool:
    """`module` (a top-level name) can be imported here; nothing is imported to find out."""
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # in sys.modules without a __spec__: imported already
        return True
    except ImportError:  # a finder that refuses it
        return False


def install_command(extra: Extra) -> str:
    """`pip install` of `extra`, the way mplaunch was installed: editable from a clone (the README's
    way; `.` in the clone, else its path), from a folder or a wheel, or from a package index."""
    flags = "--no-build-isolation " if extra == "deepspeed" else ""  # deepspeed's build imports torch
    source, editable = installed_from()
    if source is None:
        return f"pip install {flags}{shlex.quote(f'{DIST_NAME}[{extra}]')}"
    try:
        shown = "." if source == Path.cwd() else str(source)
    except OSError:  # the working directory was removed
        shown = str(source)
    return f"pip install {flags}{'-e ' if editable else ''}{shlex.quote(f'{shown}[{extra}]')}"


def installed_from() -> tuple[Path | None, bool]:
    """Where pip installed mplaunch from and whether editable (PEP 610's direct_url.json); (None,
    False) for a package index; the source tree this module is in when mplaunch is not installed
    (run from a clone on PYTHONPATH)."""
    from importlib import metadata

    try:
        direct = metadata.distribution(DIST_NAME).read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        clone = Path(__file__).resolve().parents[2]
        return (clone, True) if (clone / "pyproject.toml").is_file() else (None, False)
    try:
        info = json.loads(direct) if direct else {}
    except ValueError:
        info = {}
    url = urlparse(str(info.get("url", "")))
    if url.scheme != "file":  # an index, or a VCS or remote archive: the index name is the way back
        return None, False
    dir_info = info.get("dir_info")
    return Path(unquote(url.path)), isinstance(dir_info, dict) and dir_info.get("editable") is True


def _lines(wanted: list[Need]) -> list[str]:
    missing: dict[str, Need] = {}
    for n in wanted:
        if n.module not in missing and not installed(n.module):
            missing[n.module] = n
    by_extra: dict[Extra, list[str]] = {}
    for n in missing.values():
        by_extra.setdefault(n.extra, []).append(f"{n.module} ({n.reason})")
    return [_line(extra, names) for extra, names in by_extra.items()]


def _line(extra: Extra, names: list[str]) -> str:
    """ "missing packages of the train extra: numpy (every run), ...; install them with: pip install ..." """
    one = len(names) == 1
    return (
        f"missing {'package' if one else 'packages'} of the {extra} extra: {', '.join(names)}; "
        f"install {'it' if one else 'them'} with: {install_command(extra)}"
    )
