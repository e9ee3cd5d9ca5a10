"""Two checkpoints compared bit for bit: every tensor and value their state files hold.

Shared by the e2e resume tests (tests/e2e/test_resume.py, test_resume_sources.py,
test_checkpoint_integrity.py); it loads checkpoints with torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

# Files whose tensors hold model, optimizer, scheduler, scaler and RNG state in a final checkpoint.
STATE_SUFFIXES = (".pt", ".bin", ".pkl")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    if isinstance(value, (list, tuple)):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    if hasattr(value, "__dict__") and not isinstance(value, (torch.Tensor, np.ndarray, type)):
        return _flatten(vars(value), f"{prefix}<{type(value).__name__}>")  # e.g. DeepSpeed's loss scaler
    return {prefix: value}


def _state(final: Path) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for path in sorted(final.rglob("*")):
        if path.suffix in STATE_SUFFIXES:
            loaded = torch.load(path, map_location="cpu", weights_only=False)
            state.update(_flatten(loaded, str(path.relative_to(final))))
    if (
        final / "dcp"
    ).is_dir():  # FSDP2: the shards of every rank, merged as export reads them (model and optimizer)
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        merged = final / "dcp-merged.pt.tmp"
        dcp_to_torch_save(final / "dcp", merged)
        try:
            state.update(_flatten(torch.load(merged, map_location="cpu", weights_only=False), "dcp"))
        finally:
            merged.unlink()
    assert state, f"no state files in {final}"
    if any("/fp32_flat_groups[" in key for key in state):
        # ZeRO-3 pads each parameter's partition with uninitialised memory that no computation
        # reads; its raw flat groups therefore hold arbitrary bits there. Compare the fp32 master
        # weights as DeepSpeed consolidates them (padding stripped) instead.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = {k: v for k, v in state.items() if "/fp32_flat_groups[" not in k}
        master = get_fp32_state_dict_from_zero_checkpoint(str(final), tag="deepspeed")
        state.update(_flatten(dict(master), "consolidated fp32 master weights"))
    return state


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def assert_bitwise_equal(left: Path, right: Path) -> None:
    """Every tensor and value in two checkpoints' state files is the same, bit for bit."""
    a, b = _state(left), _state(right)
    assert a.keys() == b.keys()
    tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
    assert tensors, "no tensors compared"
    differ = [k for k in a if not _same(a[k], b[k])]
    assert not differ, f"{len(differ)} entries differ, e.g. {differ[:5]}"


def final_checkpoint(run_dir: Path, step: int) -> Path:
    """The checkpoint of `step` in a run directory laid out by default."""
    return run_dir / "checkpoints" / f"step-{step:08d}"
