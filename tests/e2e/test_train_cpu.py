"""Real 2-rank gloo trainings on CPU through `mplaunch`, checked against a 1-process fp32 reference.

Every run sees the same global batches (the sample order depends only on the
seed and the step), dropout is off, so the only differences are the
precision and the reduction order.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.runs import FAST, FAST_USER_MODEL, explain, last_loss, losses, mplaunch, records, write_recipe

pytestmark = pytest.mark.slow

STEPS = FAST["train"]["max_steps"]
# Relative difference of the mean loss over the last 3 steps from the fp32 reference.
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 3e-2}


def _last_loss(run_dir: Path) -> float:
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    return last_loss(run_dir)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def reference(workdir: Path) -> float:
    """One process, fp32, DeepSpeed stage 0, the same global batch by accumulation."""
    recipe = write_recipe(
        workdir,
        "reference",
        FAST,
        {"launch": {"nproc_per_node": 1}, "precision": {"dtype": "fp32"}, "zero": {"stage": 0}},
    )
    result = mplaunch(str(recipe))
    assert result.returncode == 0, explain(result)
    return _last_loss(workdir / "runs" / "reference")


def _train(workdir: Path, name: str, backend: str, stage: int, dtype: str) -> Path:
    recipe = write_recipe(
        workdir,
        name,
        FAST,
        {
            "backend": backend,
            "zero": {"stage": stage},
            "precision": {"dtype": dtype},
            "logging": {"memory_report": True},
        },
    )
    result = mplaunch(str(recipe))
    assert result.returncode == 0, explain(result)
    assert "finished 6 steps" in result.stdout
    return workdir / "runs" / name


Cell = Callable[[str, int, str], Path]  # (backend, stage, dtype) -> that run's directory


@pytest.fixture(scope="module")
def matrix(workdir: Path) -> Cell:
    """The run directory of one cell of the matrix, trained the first time any test asks for it.

    The loss test and the sharding and planner tests below share these runs, and each trains what
    it needs, so any one of them runs alone (`-k`) as well as after the others."""
    done: dict[tuple[str, int, str], Path] = {}

    def cell(backend: str, stage: int, dtype: str) -> Path:
        if (backend, stage, dtype) not in done:
            done[backend, stage, dtype] = _train(
                workdir, f"{backend}-z{stage}-{dtype}", backend, stage, dtype
            )
        return done[backend, stage, dtype]

    return cell


MATRIX = [("deepspeed", stage, dtype) for stage in (0, 1, 2, 3) for dtype in ("fp32", "bf16")] + [
    ("accelerate", 0, dtype) for dtype in ("fp32", "bf16", "fp16")
]


@pytest.mark.parametrize(("backend", "stage", "dtype"), MATRIX, ids=lambda v: str(v))
def test_loss_matches_single_process_fp32(
    matrix: Cell, reference: float, backend: str, stage: int, dtype: str
) -> None:
    run_dir = matrix(backend, stage, dtype)
    loss = _last_loss(run_dir)
    assert abs(loss - reference) / reference < TOLERANCE[dtype], (loss, reference)
    first = records(run_dir, "train")[0]
    assert first["loss"] > loss, "the loss should fall"
    assert (first["loss_scale"] is not None) == (dtype == "fp16")
    assert first["skipped_steps"] == 0
    # Each rank writes what it holds; the sharding and planner tests below read it.
    for rank in (0, 1):
        held = json.loads((run_dir / "memory" / f"rank-{rank}.json").read_text())["bytes"]
        assert held["params"] > 0
        assert held["optimizer"] > 0


def _by_hand_first_step(run_dir: Path) -> tuple[float, float]:
    """Step 1's loss and gradient norm computed in this process on the rows both ranks trained on:
    the summed masked-LM cross-entropy of every label of the 2 ranks x 2 micro-batches over their
    count (train.loss_normalization tokens, the default), from the weights the run started with."""
    import torch
    from torch import nn

    from launcher.plan.resolve import Plan
    from launcher.worker import data
    from launcher.worker.checkpointer import seed_all
    from launcher.worker.model_setup import model_for

    plan = Plan.from_json((run_dir / "plan.json").read_text())
    seed_all(plan.recipe.train.seed)  # as train.setup: the seed, the data, then the model
    tokens = data.load_tokens(plan, 0, lambda: None)
    model = model_for(plan)[0]
    rows = data.split(len(tokens.ids), plan.recipe.data.eval_fraction, plan.recipe.train.seed).train
    micro = [b for rank in (0, 1) for b in data.Batches(tokens, rows, plan, rank).for_step(0)]
    assert len(micro) == 4
    assert len({int((b["labels"] != -100).sum()) for b in micro}) > 1  # unequal: tokens differs from batch
    total, count = torch.zeros(()), 0
    for batch in micro:
        logits = model.lm(input_ids=batch["input_ids"]).logits
        flat = logits.reshape(-1, logits.shape[-1]).float()
        total = total + nn.functional.cross_entropy(flat, batch["labels"].reshape(-1), reduction="sum")
        count += int((batch["labels"] != -100).sum())
    loss = total / count
    loss.backward()
    grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    return float(loss.detach()), float(torch.linalg.vector_norm(torch.stack(grads)))


@pytest.mark.parametrize(("backend", "stage"), [("deepspeed", 0), ("deepspeed", 2), ("accelerate", 0)])
def test_first_step_is_the_token_weighted_mean_over_ranks_and_accumulation(
    matrix: Cell, backend: str, stage: int
) -> None:
    """2 ranks x grad_accum 2 with micro-batches of unequal label counts: the logged loss and gradient
    norm of step 1 are those of the step's token-weighted loss (Hugging Face Trainer's)."""
    run_dir = matrix(backend, stage, "fp32")
    loss, norm = _by_hand_first_step(run_dir)
    first = records(run_dir, "train")[0]
    assert first["loss"] == pytest.approx(loss, rel=1e-5)
    assert first["grad_norm"] == pytest.approx(norm, rel=1e-5)


def _held(matrix: Cell, stage: int, dtype: str, rank: int) -> dict[str, int]:
    """What `rank` of the DeepSpeed run at this stage and dtype held, by its memory report."""
    path = matrix("deepspeed", stage, dtype) / "memory" / f"rank-{rank}.json"
    return json.loads(path.read_text())["bytes"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_zero_shards_master_weights_and_optimizer_state(matrix: Cell, dtype: str) -> None:
    """From stage 1 on each rank holds 1/world of the fp32 master weights and Adam state.
    Bytes measured on the live tensors."""
    full = _held(matrix, 0, dtype, 0)
    master_full = full["master"] if dtype == "bf16" else full["params"]  # fp32 stage 0 has no copy
    for stage in (1, 2, 3):
        for rank in (0, 1):
            held = _held(matrix, stage, dtype, rank)
            assert held["optimizer"] == pytest.approx(full["optimizer"] / 2, rel=0.02), (stage, rank, held)
            assert held["master"] == pytest.approx(master_full / 2, rel=0.02), (stage, rank, held)
            if stage < 3:  # unsharded; DeepSpeed's flat buffers add a few bytes of alignment
                assert held["params"] == pytest.approx(full["params"], rel=1e-3), (stage, rank, held)
            # Stage 3 shards the parameters too, but keeps tensors under 1e5 elements whole on every
            # rank, which is all of the tiny BERT: the planner test below checks that row.


# The planner's model-state rows against the bytes each rank really held (launcher/plan/estimate/state_bytes.py
# documents which tensors each row counts). 5 %: padding to DeepSpeed's alignment and the
# partition boundaries account for a few bytes per tensor on a model this small. Gradients are
# the most any micro-batch's backward left held (grad_accum 2 here). At stage 2 they are not
# compared: rank 0 ends a micro-batch holding up to 22 % more than its partition (measured:
# 673,024 bytes of bf16 gradients against a 551,730-byte partition; rank 1 within 2 %), which
# the planner does not model.
PLANNER_TOLERANCE = 0.05


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_memory_planner_matches_what_each_rank_holds(matrix: Cell, stage: int, dtype: str) -> None:
    from launcher.plan.estimate import state_bytes
    from launcher.recipe.schema import Model
    from launcher.recipe.shapes import shape_of

    run_dir = matrix("deepspeed", stage, dtype)
    vocab = len(json.loads((run_dir / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"])
    shape = shape_of(Model(name="bert-mlm", size="tiny", max_position_embeddings=512), vocab_size=vocab)
    predicted = state_bytes.model_state_bytes(
        shape, dtype, "deepspeed", stage, 2, overlap_comm=False, grad_accum=2
    )
    for rank in (0, 1):
        held = _held(matrix, stage, dtype, rank)
        for row in ("params", "master", "optimizer", *(("grads",) if stage != 2 else ())):
            expected = getattr(predicted, row)
            assert held[row] == pytest.approx(expected, rel=PLANNER_TOLERANCE, abs=64), (
                row,
                rank,
                held,
                predicted,
            )


def _spiky(workdir: Path, name: str, spike_steps: list[int], loss_scale: dict, max_steps: int = 8) -> tuple:
    recipe = write_recipe(
        workdir,
        name,
        FAST_USER_MODEL,
        {
            "backend": "accelerate",
            "precision": {"dtype": "fp16", "loss_scale": loss_scale},
            "model": {
                "name": None,
                "target": "spiky_model:build",
                "kwargs": {"vocab_size": 512, "spike_steps": spike_steps, "accum": 2},
            },
            "data": {"kind": "synthetic", "paths": [], "num_samples": 512},
            "train": {"max_steps": max_steps},
        },
    )
    return mplaunch(str(recipe)), workdir / "runs" / name


def test_overflowing_steps_are_skipped_and_the_scale_backs_off(workdir: Path) -> None:
    result, run_dir = _spiky(workdir, "overflow", [3, 4, 5], {"initial": 2.0**16, "hysteresis": 2})
    assert result.returncode == 0, explain(result)
    train = {r["step"]: r for r in records(run_dir, "train")}
    assert [train[s]["skipped_steps"] for s in range(1, 9)] == [0, 0, 1, 2, 3, 3, 3, 3]
    # Hysteresis 2: the first overflow keeps the scale, the next two halve it.
    assert [train[s]["loss_scale"] for s in (2, 3, 4, 5, 8)] == [2.0**16, 2.0**16, 2.0**15, 2.0**14, 2.0**14]
    overflow_events = [r for r in records(run_dir, "event") if r["event"] == "overflow"]
    assert [e["step"] for e in overflow_events] == [3, 4, 5]
    assert "loss scale now 16384" in overflow_events[-1]["message"]
    assert "step 5: fp16 gradients overflowed; step skipped, loss scale now 16384" in result.stdout
    assert "finished 8 steps" in result.stdout  # training went on after the overflows


def test_overflow_at_the_minimum_scale_stops_with_a_clear_message(workdir: Path) -> None:
    result, run_dir = _spiky(workdir, "floor", [-1], {"initial": 2.0**16, "min": 2.0**14, "hysteresis": 1})
    assert result.returncode == 1, explain(result)
    message = [line for line in result.stderr.splitlines() if "the run failed" in line]
    assert len(message) == 1, result.stderr
    assert "minimum loss scale 16384" in message[0]
    assert "precision.dtype=bf16" in message[0]
    assert "Traceback" not in result.stderr
    assert not (run_dir / "FINISHED").exists()


def test_infinite_loss_in_fp32_stops_before_a_checkpoint(workdir: Path) -> None:
    recipe = write_recipe(
        workdir,
        "nan",
        FAST_USER_MODEL,
        {
            "precision": {"dtype": "fp32"},
            "model": {
                "name": None,
                "target": "spiky_model:build",
                "kwargs": {"vocab_size": 512, "spike_steps": [3], "accum": 2, "spike": 1e39},
            },
            "data": {"kind": "synthetic", "paths": [], "num_samples": 512},
            "checkpoint": {"every_steps": 2},
        },
    )
    result = mplaunch(str(recipe))
    assert result.returncode == 1, explain(result)
    assert "the loss became NaN or infinite in fp32" in result.stderr
    ckpts = sorted(p.name for p in (workdir / "runs" / "nan" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000002"]  # the good checkpoint stays, no bad one is written


def test_a_failing_rank_shows_its_error_not_torchruns_noise(workdir: Path) -> None:
    # The module is found (check looks for it), its factory only by the ranks.
    recipe = write_recipe(
        workdir,
        "badtarget",
        FAST_USER_MODEL,
        {"model": {"name": None, "target": "spiky_model:no_such_factory"}},
    )
    result = mplaunch(str(recipe))
    assert result.returncode == 1
    assert "model.target: 'spiky_model' has no function 'no_such_factory'" in result.stderr
    assert "ChildFailedError" not in result.stderr
    assert "Traceback" not in result.stderr
