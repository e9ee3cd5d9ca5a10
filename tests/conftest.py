"""Test hygiene and gating: GPU and Slurm tests skip cleanly where those are absent."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"


def _has_cuda() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    need_gpu = any("gpu" in item.keywords for item in items)
    has_gpu = _has_cuda() if need_gpu else False
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session", autouse=True)
def _inductor_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> object:
    """torch sets TORCHINDUCTOR_CACHE_DIR for good the first time anything asks for inductor's cache
    (an optimizer step, some imports), in whichever test comes first: set for the whole session, the
    per-test leak check below sees it unchanged."""
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor").resolve())
    yield
    if before is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


@pytest.fixture(autouse=True)
def _no_leaked_env() -> object:
    """Fail a test that leaves environment variables changed."""
    before = dict(os.environ)
    yield
    after = dict(os.environ)
    leaked = {k for k in before.keys() ^ after.keys()} | {
        k for k in before if k in after and before[k] != after[k]
    }
    leaked.discard("PYTEST_CURRENT_TEST")  # pytest itself rewrites it for each phase
    os.environ.clear()
    os.environ.update(before)
    assert not leaked, f"test leaked environment changes: {sorted(leaked)}"


@pytest.fixture(autouse=True)
def _hub_answers() -> Iterator[None]:
    """The Hugging Face Hub answers as it does online: it has every model id a test names. The plan asks
    it once per Hub id (launcher.plan.model.hub_answer); tests/unit/test_check_model_files.py sets its
    own answers, and subprocesses ask for real. (A MonkeyPatch of its own: the `monkeypatch` fixture
    here would be undone after the environment check.)"""
    from launcher.plan import model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model, "hub_answer", lambda endpoint, name: (200, ""))
        yield


TINY_MODELS = ("tiny-bert", "tiny-llama", "tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    """recipes/models, holding the tiny Hugging Face model directories the shipped recipes name:
    saved by recipes/models/make_tiny.py (in a subprocess, as a user runs it) unless they are there."""
    import sys

    out = RECIPES / "models"
    if not all((out / name / "config.json").is_file() for name in TINY_MODELS):
        made = subprocess.run([sys.executable, str(out / "make_tiny.py")], capture_output=True, text=True)
        assert made.returncode == 0, made.stderr[-2000:]
    return out


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB tmpfs: room for one checkpoint of the tiny model (8.6 MB), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)
