"""mplaunch env where torch is installed: the versions and devices it reports."""

from __future__ import annotations

import pytest

from launcher import cli


def test_env_reports_versions(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["env"])
    out = capsys.readouterr().out
    assert code == 0
    names = [line.split()[0] for line in out.splitlines() if not line.startswith(" ")]
    assert names[:7] == ["python", "mplaunch", "torch", "deepspeed", "accelerate", "transformers", "pydantic"]
    try:
        import torch  # noqa: F401
    except ImportError:
        assert names[-1] == "cuda"
    else:
        assert names[-3:] == ["cuda", "nccl", "gpus"]
