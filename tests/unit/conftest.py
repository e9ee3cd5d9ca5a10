"""The unit tier stays torch-free: when only tests/unit runs, the first test after which a heavy
library sits in this process fails, naming it.

It bites only when every collected test is a unit test (`python -m pytest tests/unit`), the case
it exists for: a full run imports torch in tests/e2e and tests/worker, and is not failed by it.
A unit test file that imports torch at module level is caught too (at its first test).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from launcher.plan import extras

HEAVY = ("torch", "deepspeed", "accelerate", "transformers", "peft")
UNIT = Path(__file__).resolve().parent
_watch = {"on": False}


def pytest_collection_finish(session: pytest.Session) -> None:
    _watch["on"] = bool(session.items) and all(UNIT in item.path.parents for item in session.items)


@pytest.fixture(autouse=True)
def _stays_torch_free() -> Iterator[None]:
    yield
    imported = sorted(name for name in HEAVY if name in sys.modules)
    if _watch["on"] and imported:
        _watch["on"] = False  # once: every later test would see the same modules
        pytest.fail(f"{imported} imported by this test, its fixtures or its module: move it to tests/worker")


@pytest.fixture
def lacking(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """`lacking("numpy", ...)`: this machine has every package but these (launcher.plan.extras sees)."""

    def hide(*modules: str) -> None:
        monkeypatch.setattr(extras, "installed", lambda module: module not in modules)

    hide()
    return hide
