"""The slurm.* values of a recipe, checked before they reach the sbatch script.

Every value lands on an `#SBATCH` line or in the script's shell code, so each is held to
a shape that cannot break out of its line. slurm.extra_sbatch lines pass through as
written, except the options mplaunch writes itself (MANAGED_OPTIONS) and those that
would break what the script relies on (REFUSED_OPTIONS): one job per run directory,
started where mplaunch ran, with the submitting environment, requeued by the script.

sbatch reads its `#SBATCH` lines with getopt_long, as its command line: an unambiguous
prefix stands for the whole option (`--chd` is `--chdir`), so prefixes are refused too.

Light side: the standard library only.
"""

from __future__ import annotations

import re
import sys

from launcher.recipe import schema as recipe_mod

# Options mplaunch writes itself; set them through the slurm.* keys instead.
MANAGED_OPTIONS = {
    "job-name": "name", "nodes": "launch.nnodes", "ntasks-per-node": None, "ntasks": None,
    "gpus-per-node": "slurm.gpus_per_node", "cpus-per-task": "slurm.cpus_per_task", "mem": "slurm.mem",
    "time": "slurm.time", "partition": "slurm.partition", "account": "slurm.account", "qos": "slurm.qos",
    "output": None, "error": None, "signal": "slurm.signal_s", "requeue": None, "no-requeue": None,
    "open-mode": None,
}  # fmt: skip

_ENVIRONMENT = "the job needs the submitting environment (the venv's python, PATH for srun and torchrun)"
_ON_THIS_CLUSTER = (
    "mplaunch follows the job with squeue and scontrol on this cluster (and --test-only checks it)"
)
# Options that would break the job's contract, with the reason a user is told.
REFUSED_OPTIONS = {
    # Each array task would be a job of its own on the same run directory: one holds the
    # lock, the others fail, or they take turns on one plan and one set of checkpoints.
    "array": "one run directory is one job (array tasks would share and fight over its lock and checkpoints)",
    "chdir": "the job starts where mplaunch ran: slurm.setup lines and relative paths are read there",
    "cluster": _ON_THIS_CLUSTER,
    "clusters": _ON_THIS_CLUSTER,
    # Refused unless ALL is in its list (_keeps_environment): NONE or a list of names drops PATH.
    "export": f"{_ENVIRONMENT}; keep ALL in the list (--export=ALL,NAME=value) or set slurm.env",
    # sbatch unsets its whole environment and sends only the file's variables.
    "export-file": f"it replaces the environment, and {_ENVIRONMENT}; set slurm.env instead",
    "hold": "the job would sit held until `scontrol release`; --begin=TIME delays a start",
    "parsable": "mplaunch reads sbatch's answer itself (it passes --parsable on the command line)",
    "test-only": "nothing would be queued; mplaunch runs sbatch --test-only itself before submitting",
    "uid": "the job must run as the user who wrote the run directory (its lock, plan and checkpoints)",
    # mplaunch holds RUN_DIR/.lock until sbatch answers; the job waits for it, then fails.
    "wait": "sbatch would not answer until the job ends, and the job cannot start while mplaunch waits",
    # sbatch reads --wrap only on its command line and ignores it on an #SBATCH line.
    "wrap": "the job's script is mplaunch's (sbatch ignores --wrap on an #SBATCH line)",
}

ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
NAME_VALUE = re.compile(r"[A-Za-z0-9_.,+-]+")  # partition (lists too), account, qos
MEM_VALUE = re.compile(r"(\d+)([KMGT]?)", re.IGNORECASE)
MEM_UNIT_KB = {"K": 1, "": 1024, "M": 1024, "G": 1024**2, "T": 1024**3}  # sbatch's default unit is M
TIME_VALUE = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")
EXTRA_OPTION = re.compile(r"--([a-z][a-z0-9-]*)(=[^\s'\"`\\]+)?")


def check_values(recipe: recipe_mod.Recipe) -> list[str]:
    """Every slurm.* value that reaches the script, checked so that none can break out of its line."""
    s = recipe.slurm
    problems = []
    for key in ("partition", "account", "qos"):
        value = getattr(s, key)
        if value is not None and not NAME_VALUE.fullmatch(value):
            problems.append(f"slurm.{key}: {value!r} is not a Slurm name (letters, digits, _ . , + -)")
    if s.mem is not None and not MEM_VALUE.fullmatch(s.mem):
        problems.append(f"slurm.mem: {s.mem!r} is not a size like 64G or 512000M")
    limit_s = time_limit_s(s.time)
    if limit_s is None:
        problems.append(f"slurm.time: {s.time!r} is not a Slurm time (MM, HH:MM:SS, D-HH, D-HH:MM:SS)")
    elif limit_s <= s.signal_s:
        problems.append(
            f"slurm.signal_s: the {s.signal_s} s warning must come before the time limit {s.time}"
        )
    for i, line in enumerate(s.extra_sbatch):
        problems += check_extra(i, line)
    for key in s.env:
        if not ENV_KEY.fullmatch(key):
            problems.append(
                f"slurm.env: {key!r} is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)"
            )
    for i, line in enumerate(s.setup):
        if "\n" in line or "\r" in line:
            problems.append(f"slurm.setup[{i}]: one shell line per item (it contains a line break)")
    return problems


def check_extra(i: int, line: str) -> list[str]:
    """The problem with slurm.extra_sbatch[i], if any: not one long option, or one mplaunch writes or refuses."""
    match = EXTRA_OPTION.fullmatch(line)
    if match is None:
        return [
            f"slurm.extra_sbatch[{i}]: {line!r} is not a single --option or --option=value "
            "(no spaces, quotes, backslashes or short options)"
        ]
    option, value = match.group(1), (match.group(2) or "=")[1:]
    where = f"slurm.extra_sbatch[{i}]: --{option}"
    names = [name for name in (*MANAGED_OPTIONS, *REFUSED_OPTIONS) if name.startswith(option)]
    if option in names:
        names = [option]
    if len(names) > 1:  # sbatch refuses an ambiguous prefix; it would be one of these at best
        read_as = " or ".join(f"--{name}" for name in names)
        return [f"{where} (sbatch may read it as {read_as}) is refused: spell out the option meant"]
    if not names:
        return []
    name = names[0]
    shown = where if name == option else f"{where} (sbatch reads it as --{name})"
    if name in MANAGED_OPTIONS:
        key = MANAGED_OPTIONS[name]
        return [f"{shown} is written by mplaunch ({f'set {key} instead' if key else 'mplaunch sets it'})"]
    if name == "export" and _keeps_environment(value):
        return []
    return [f"{shown} is refused: {REFUSED_OPTIONS[name]}"]


def _keeps_environment(value: str) -> bool:
    # sbatch exports the whole environment when ALL is one of the list's items, in any case
    # (env_merge_filter); without a value, --export on an #SBATCH line takes the next word.
    return any(item.upper() == "ALL" for item in value.split(","))


def mem_mb(text: str) -> int:
    """Megabytes in a checked slurm.mem value (sbatch's units: K, M, G, T of 1024; M without one)."""
    match = MEM_VALUE.fullmatch(text)
    assert match is not None, text  # check_values refused any other
    kb = int(match.group(1)) * MEM_UNIT_KB[match.group(2).upper()]
    return -(-kb // 1024)


def time_limit_s(text: str) -> int | None:
    """Seconds in an sbatch --time value, or None when it is not one (UNLIMITED counts as no limit)."""
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return sys.maxsize
    m = TIME_VALUE.fullmatch(text)
    if m is None:
        return None
    days, first, second, third = (int(g) if g is not None else None for g in m.groups())
    assert first is not None  # TIME_VALUE always captures the first number
    if days is not None:  # D-H, D-H:M, D-H:M:S
        return days * 86400 + first * 3600 + (second or 0) * 60 + (third or 0)
    if third is not None:  # H:M:S
        return first * 3600 + (second or 0) * 60 + third
    return first * 60 + (second or 0)  # M or M:S
