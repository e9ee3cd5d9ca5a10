"""`mplaunch compare RUN... | SWEEP_DIR`: one table of many runs, and their curves overlaid.

The targets are run directories, sweep directories (SWEEP_DIR/sweep.json, launcher.run.sweep: its
points' runs in the sweep's order, a point not launched yet listed as "not started"), or a directory
holding run directories (those, sorted by name). Each run is one row (launcher.analysis.compare_runs_rows),
labelled by the recipe keys whose values differ between the runs; the run with the lowest final eval
loss (train loss when no run evaluated) is marked best. The table goes to stdout (rich on a terminal,
aligned text otherwise) and, with the differing keys, to OUT/compare.md; the raw numbers to
OUT/compare.csv; the overlaid curves to OUT/*.png (launcher.analysis.compare_runs_plots), unless
matplotlib (the `report` extra) is missing, which only skips the plots.

This is not launcher.analysis.compare, which judges a `mplaunch parity` pair.

Light side: the standard library and rich; matplotlib only inside the plotting functions.
"""

from __future__ import annotations

import csv
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from launcher.analysis import figure
from launcher.analysis.compare_runs_plots import write_overlays
from launcher.analysis.compare_runs_rows import Row, Run, differing_keys, read_recipe, row_of
from launcher.errors import UserError
from launcher.run.sweep import SWEEP_FILE, read_record
from launcher.rundir.layout import RECIPE_FILE, RunDir

OUT_DIR = "compare"
TABLE_FILE = "compare.md"
CSV_FILE = "compare.csv"
BEST = "*"
GIB = 1024**3


def compare(targets: Sequence[Path], out: Path | None) -> int:
    """`mplaunch compare`: print the table of the runs `targets` name, write it and the plots to `out`.

    Args:
        targets: run directories, sweep directories, or directories holding run directories.
        out: where compare.md, compare.csv and the PNGs go; default SWEEP_DIR/compare for one
            sweep, else ./compare.

    Returns:
        0.

    Raises:
        UserError: a target is not a run directory or a sweep, or no run is found.
    """
    runs, sweeps = find_runs(targets)
    out = out if out is not None else (sweeps[0] / OUT_DIR if len(targets) == 1 and sweeps else Path(OUT_DIR))
    rows, keys = build_rows(runs)
    print_table(rows, keys)
    out.mkdir(parents=True, exist_ok=True)
    written = [write_markdown(rows, keys, out / TABLE_FILE), write_csv(rows, keys, out / CSV_FILE)]
    if importlib.util.find_spec("matplotlib") is None:
        print(f"compare: plots skipped: matplotlib is not installed ({figure.INSTALL_HINT})", file=sys.stderr)
    else:
        written += write_overlays(rows, out, keys, _context(sweeps, rows))
    print(f"compare: wrote {', '.join(p.name for p in written)} in {out}")
    return 0


# ---------------------------------------------------------------- which runs


def find_runs(targets: Sequence[Path]) -> tuple[list[Run], list[Path]]:
    """The runs the targets name, in order, each once; and the sweep directories among the targets.

    Raises:
        UserError: a target is none of the three kinds, or there is no run at all.
    """
    runs: dict[Path, Run] = {}
    sweeps: list[Path] = []
    for target in targets:
        if (target / SWEEP_FILE).is_file():
            sweeps.append(target)
            found = sweep_runs(target)
        elif _is_run(target):
            found = [Run(target)]
        else:
            found = [Run(p) for p in sorted(target.iterdir()) if _is_run(p)] if target.is_dir() else []
            if not found:
                raise UserError(
                    f"compare: {target} is not a run directory or a sweep (no {RECIPE_FILE} or {SWEEP_FILE})"
                )
        for run in found:
            runs.setdefault(run.path.resolve(), run)
    if not runs:
        raise UserError(f"compare: no run to compare in {', '.join(str(t) for t in targets)}")
    return list(runs.values()), sweeps


def _is_run(path: Path) -> bool:
    return path.is_dir() and (RunDir.of(path).is_run_dir() or RunDir.of(path).recipe_file.is_file())


def sweep_runs(sweep_dir: Path) -> list[Run]:
    """A sweep's runs, in its sweep.json's order: SWEEP_DIR/<point name>, launched or not.

    Raises:
        UserError: sweep.json is not a sweep's record.
    """
    path = sweep_dir / SWEEP_FILE
    try:
        record = read_record(sweep_dir)
    except UserError as err:
        raise UserError([f"compare: {line}" for line in err.lines]) from None
    if record is None:  # gone since the caller saw it
        raise UserError(f"compare: {path}: no such file")
    named = [(p["name"], tuple(str(o) for o in p["overrides"] or ())) for p in record["points"]]
    bad = [n for n, _ in named if not isinstance(n, str) or not n or Path(n).name != n or n in (".", "..")]
    if bad:
        raise UserError(f"compare: {path}: point names must be plain directory names, got {bad[0]!r}")
    return [Run(sweep_dir / name, overrides) for name, overrides in named]


def build_rows(runs: Sequence[Run]) -> tuple[list[Row], list[str]]:
    """Every run's row, the best one marked, and the recipe keys that differ between the runs."""
    recipes = [(run, read_recipe(run.path)) for run in runs]
    keys = differing_keys([(run, flat) for run, flat in recipes if flat is not None])
    names = [run.path.name for run in runs]
    rows = [
        row_of(run, run.path.name if names.count(run.path.name) == 1 else _two_parts(run.path), keys, flat)
        for run, flat in recipes
    ]
    return mark_best(rows), keys


def _two_parts(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def mark_best(rows: list[Row]) -> list[Row]:
    """Mark the row with the lowest final eval loss, or the lowest final train loss when none evaluated."""
    by_eval = [(r.final_eval, i) for i, r in enumerate(rows) if r.final_eval is not None]
    by_train = [(r.final_loss, i) for i, r in enumerate(rows) if r.final_loss is not None]
    ranked = by_eval or by_train
    if not ranked:
        return rows
    best = min(ranked)[1]
    return [replace(r, best=i == best) for i, r in enumerate(rows)]


def best_by(rows: Sequence[Row]) -> str:
    return "final eval loss" if any(r.final_eval is not None for r in rows) else "final train loss"


def _context(sweeps: Sequence[Path], rows: Sequence[Row]) -> str:
    where = f"sweep {sweeps[0].name}, " if len(sweeps) == 1 else ""
    return f"{where}{len(rows)} run{'s' * (len(rows) != 1)}"


# ---------------------------------------------------------------- the table

COLUMNS = (
    "run",
    "keys",
    "state",
    "steps",
    "loss",
    "eval loss",
    "best eval (step)",
    "tokens/s",
    "MFU",
    "peak mem",
    "skipped",
    "x-ray warnings",
    "parity",
)
# Columns no run has a value for are left out of the table (and named under it).
OPTIONAL = frozenset(
    {"eval loss", "best eval (step)", "MFU", "peak mem", "skipped", "x-ray warnings", "parity"}
)


def cells(row: Row) -> dict[str, str]:
    """The row as the table shows it; "-" where the run recorded nothing."""

    def num(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    best = row.best_eval
    return {
        "run": f"{row.name} {BEST}" if row.best else row.name,
        "keys": row.label,
        "state": row.state,
        "steps": "-" if row.steps is None else f"{row.steps:,}",
        "loss": num(row.final_loss, ".4f"),
        "eval loss": num(row.final_eval, ".4f"),
        "best eval (step)": "-" if best is None else f"{best[0]:.4f} ({best[1]:,})",
        "tokens/s": num(row.tokens_per_s, ",.0f"),
        "MFU": num(row.mfu, ".1%"),
        "peak mem": "-" if row.peak_mem_bytes is None else f"{row.peak_mem_bytes / GIB:.1f} GiB",
        "skipped": "-" if row.skipped_steps is None else f"{row.skipped_steps:,}",
        "x-ray warnings": "-" if row.xray_warnings is None else f"{row.xray_warnings:,}",
        "parity": "-" if row.parity is None else row.parity.describe(),
    }


def table(rows: Sequence[Row], keys: Sequence[str]) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, cells and the columns left out because no run has a value for them."""
    shown = [dict(cells(r)) for r in rows]
    empty = [c for c in COLUMNS if c in OPTIONAL and all(s[c] == "-" for s in shown)]
    # Without differing keys every label is the run's name: the column would repeat it.
    header = [c for c in COLUMNS if c not in empty and (keys or c != "keys")]
    return header, [[s[c] for c in header] for s in shown], empty


def print_table(rows: Sequence[Row], keys: Sequence[str]) -> None:
    """A rich table on a terminal wide enough for it, aligned plain text otherwise (pipes, logs, tests)."""
    header, body, empty = table(rows, keys)
    numeric = set(COLUMNS[3:-1])  # steps to x-ray warnings
    widths = [max(len(x) for x in (h, *(line[i] for line in body))) for i, h in enumerate(header)]
    if not (sys.stdout.isatty() and _rich_table(header, body, numeric, sum(widths) + 3 * len(widths) + 1)):
        for line in (header, *body):
            print(
                "  ".join(
                    v.rjust(w) if h in numeric else v.ljust(w)
                    for h, v, w in zip(header, line, widths, strict=True)
                ).rstrip()
            )
    for note in _notes(rows, empty):
        print(note)


def _rich_table(header: list[str], body: list[list[str]], numeric: set[str], width: int) -> bool:
    """Print the table with rich; False, printing nothing, when the terminal is narrower than it
    (rich would cut every cell; plain lines wrap whole)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    if width > console.width:
        return False
    view = Table(title="mplaunch compare", title_justify="left")
    for column in header:
        view.add_column(column, justify="right" if column in numeric else "left")
    for line in body:
        view.add_row(*(Text(cell) for cell in line))  # a label's [0.9, 0.95] is no markup
    console.print(view)
    return True


def _notes(rows: Sequence[Row], empty: Sequence[str]) -> list[str]:
    notes = [f"best ({BEST}): the lowest {best_by(rows)}"] if any(r.best for r in rows) else []
    if empty:
        notes.append(f"not shown (no run recorded them): {', '.join(empty)}")
    return notes


def write_markdown(rows: Sequence[Row], keys: Sequence[str], path: Path) -> Path:
    """The table in Markdown, the differing keys and their values, and the plots' names."""
    header, body, empty = table(rows, keys)
    values = {k: list(dict.fromkeys(v for r in rows for key, v in r.values if key == k)) for k in keys}
    lines = [
        f"# mplaunch compare: {len(rows)} run{'s' * (len(rows) != 1)}",
        "",
        "Differing recipe keys: "
        + ("; ".join(f"`{k}` ({', '.join(values[k])})" for k in keys) if keys else "none"),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(" --- " for _ in header) + "|",
        *("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in body),
        "",
        *(f"{note}  " for note in _notes(rows, empty)),
        "",
        "Runs: " + ", ".join(f"`{r.name}` {r.path}" for r in rows),
        "",
    ]
    path.write_text("\n".join(lines))
    return path


CSV_FIELDS = (
    "name", "path", "label", "state", "steps", "max_steps", "final_loss", "final_eval_loss",
    "best_eval_loss", "best_eval_step", "tokens_per_s", "mfu", "peak_mem_bytes", "skipped_steps",
    "xray_warnings", "parity", "parity_final_rel_diff", "parity_max_rel_diff", "best",
)  # fmt: skip


def write_csv(rows: Sequence[Row], keys: Sequence[str], path: Path) -> Path:
    """One line per run: the raw numbers (empty where none), then one column per differing key."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CSV_FIELDS, *keys])
        for r in rows:
            parity = r.parity
            raw = (
                r.name, r.path, r.label, r.state, r.steps, r.max_steps, r.final_loss, r.final_eval,
                r.best_eval[0] if r.best_eval else None, r.best_eval[1] if r.best_eval else None,
                r.tokens_per_s, r.mfu, r.peak_mem_bytes, r.skipped_steps, r.xray_warnings,
                None if parity is None else ("pass" if parity.passed else "fail"),
                None if parity is None else parity.final_rel_diff,
                None if parity is None else parity.max_rel_diff,
                r.best,
            )  # fmt: skip
            own = dict(r.values)
            writer.writerow(["" if v is None else v for v in raw] + [own.get(k, "") for k in keys])
    return path
