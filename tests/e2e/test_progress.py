"""The live progress bar the launcher draws on a terminal, and rank 0's plain lines everywhere else.

Two real 2-rank runs check what a user sees: under a pseudo-terminal (the launcher's stdout and
stderr are a TTY) and with its output piped. The bar's text, the metrics tail and the output
filter alone are in tests/unit/test_progress.py.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from launcher.plan import processes
from tests.runs import FAST, ROOT, TESTS, explain, mplaunch, records, write_recipe

STEPS = FAST["train"]["max_steps"]
PLAIN_LINE = re.compile(r"step \d+/\d+ \|")
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# ------------------------------------------------------------------ real runs


def _recipe(tmp_path: Path, name: str) -> Path:
    return write_recipe(tmp_path, name, FAST, {"logging": {"progress": True}})


def _run_in_pty(
    args: list[str], timeout_s: float = 300, extra_env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run the CLI with its stdin, stdout and stderr on a pseudo-terminal; (exit status, all output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    env = {**os.environ, "PYTHONPATH": str(TESTS), "TERM": "xterm-256color", **(extra_env or {})}
    for name in ("FORCE_COLOR", "NO_COLOR", "TTY_INTERACTIVE", "TTY_COMPATIBLE", "COLUMNS", "LINES"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_on_a_terminal_the_launcher_draws_one_live_bar(tmp_path: Path) -> None:
    code, out = _run_in_pty([str(_recipe(tmp_path, "tty"))])
    shown = ESCAPE.sub("", out).replace("\r", "\n")
    assert code == 0, out[-4000:]
    assert "\x1b[?25l" in out and "\x1b[2K" in out, out[-4000:]  # rich's live display: cursor control
    final = rf"\b{STEPS}/{STEPS} loss \d+\.\d{{4}} \| [\d,.]+ samples/s \| eta 0:00"
    assert re.search(final, shown), shown[-4000:]
    assert not PLAIN_LINE.search(shown), shown[-4000:]  # rank 0 drew nothing of its own
    assert f"finished {STEPS} steps" in shown  # the workers' notes still reach the terminal
    assert "built successfully" not in shown
    assert [r["step"] for r in records(tmp_path / "runs" / "tty", "train")] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_piped_output_is_plain_lines_without_escape_codes(tmp_path: Path) -> None:
    result = mplaunch(str(_recipe(tmp_path, "piped")))
    assert result.returncode == 0, explain(result)
    assert "\x1b" not in result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if PLAIN_LINE.match(line)]
    assert [line.split(" |")[0] for line in lines] == [f"step {s}/{STEPS}" for s in range(1, STEPS + 1)]
    assert "built successfully" not in result.stdout + result.stderr


BUILDING = "building DeepSpeed's CPU communication op (first run only, ~1-2 min)"


@pytest.mark.slow
def test_a_first_run_says_it_builds_deepspeeds_op_and_the_next_does_not(tmp_path: Path) -> None:
    """An empty TORCH_EXTENSIONS_DIR, as on a fresh machine: while DeepSpeed builds its CPU
    communication op (a minute or two), the bar says so and counts the time; the next run in the
    same environment finds the op built (launcher.plan.processes.op_built, on the real build)."""
    ops = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ops")}
    code, out = _run_in_pty([str(_recipe(tmp_path, "fresh"))], timeout_s=600, extra_env=ops)
    shown = ESCAPE.sub("", out).replace("\r", "\n")
    assert code == 0, out[-4000:]
    assert re.search(rf"setup .* 0/{STEPS} {re.escape(BUILDING)} \| 0:\d\d elapsed", shown), shown[-4000:]
    assert f"still {BUILDING}" not in shown  # the bar says it: rank 0 prints nothing of its own
    built = tmp_path / "ops" / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    assert processes.op_built(tmp_path / "ops", "deepspeed_shm_comm")
    when = built.stat().st_mtime
    again = mplaunch(str(_recipe(tmp_path, "again")), env=ops)
    assert again.returncode == 0, explain(again)
    assert "building DeepSpeed" not in again.stdout + again.stderr
    assert built.stat().st_mtime == when  # not rebuilt


@pytest.mark.slow
def test_piped_a_long_setup_phase_gets_one_line(tmp_path: Path) -> None:
    """Off a terminal (CI, a log file) rank 0 says what takes long once it has taken 10 s."""
    ops = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ops")}
    result = mplaunch(str(_recipe(tmp_path, "piped-build")), env=ops)
    assert result.returncode == 0, explain(result)
    lines = result.stdout.splitlines()
    assert lines.count(f"mplaunch: still {BUILDING} after 10 s") == 1, explain(result)
    first_step = next(i for i, line in enumerate(lines) if PLAIN_LINE.match(line))
    assert lines.index(f"mplaunch: still {BUILDING} after 10 s") < first_step
