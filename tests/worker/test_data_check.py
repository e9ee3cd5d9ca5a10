"""The worker's hint when the data cannot fill one global batch."""

from __future__ import annotations

import pytest

from launcher.plan.hardware import Hardware
from launcher.recipe.schema import load
from tests.runs import TINY  # packed masked-lm on data/corpus.txt (1200 lines), data.seq_len 64


def test_the_workers_hint_names_num_samples_only_for_synthetic_data() -> None:
    import numpy as np

    from launcher.plan.resolve import resolve
    from launcher.worker import data

    for overrides, hint in (
        ([], "lower train.global_batch_size or add data, or lower data.eval_fraction (0.05)"),
        (["data.kind=synthetic", "data.paths=[]"], "lower train.global_batch_size or raise data.num_samples"),
    ):
        plan = resolve(load(TINY, overrides), Hardware(cpu_count=2))
        with pytest.raises(ValueError, match="cannot fill one global batch of 32") as info:
            data.Batches(None, np.arange(20), plan, 0)  # type: ignore[arg-type]  # no row is read
        assert str(info.value).startswith("20 training samples")
        assert hint in str(info.value)
        assert ("num_samples" in str(info.value)) == bool(overrides)
