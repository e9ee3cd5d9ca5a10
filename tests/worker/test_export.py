"""mplaunch export's writers in one process: a state dict for a model without a config, fp16 overflow refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launcher.errors import UserError
from launcher.worker import export


def test_a_state_dict_is_written_for_models_without_a_config(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    weight = torch.randn(4, 3)
    state = {"embed.weight": weight, "head.weight": weight, "head.bias": torch.randn(4)}
    state["steps"] = torch.tensor(7)
    what = export._save_state_dict(state, torch.bfloat16, tmp_path)
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert loaded.keys() == state.keys()
    assert loaded["head.weight"].dtype == torch.bfloat16
    assert torch.equal(loaded["head.weight"], weight.bfloat16())
    assert loaded["steps"].dtype == torch.int64  # not floating: kept as it is
    assert "4 tensors, 17 elements" in what, what  # the tied weight counts once: 12 + 4 + 1


def test_fp16_overflow_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not finite in float16"):
        export._save_state_dict({"w": torch.tensor([1e6])}, torch.float16, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
