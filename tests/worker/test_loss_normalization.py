"""train.loss_normalization: tokens gives the gradient of the step's token-weighted loss, batch the
mean of the micro-batches' means; both as the backends apply them (TokenWeights, then / grad_accum).

One process here (world 1); tests/e2e/test_train_cpu.py checks 2 ranks on both backends.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from launcher.plan.hardware import Hardware  # noqa: E402
from launcher.plan.resolve import Plan, resolve  # noqa: E402
from launcher.recipe.schema import load  # noqa: E402
from launcher.worker.backends import TokenWeights  # noqa: E402
from launcher.worker.models import LMLoss, gpt2  # noqa: E402
from tests.conftest import RECIPES  # noqa: E402

ACCUM = 2


def _plan(tmp_path: Path, normalization: str, recipe: str = "gpt2_tiny.yaml", *more: str) -> Plan:
    overrides = [
        f"logging.dir={tmp_path}",
        "data.kind=synthetic",
        "data.paths=[]",
        "data.seq_len=16",
        "launch.nproc_per_node=1",
        "train.micro_batch_size=3",
        f"train.global_batch_size={3 * ACCUM}",
        f"train.loss_normalization={normalization}",
        *more,
    ]
    return resolve(load(RECIPES / recipe, overrides), Hardware(cpu_count=2))


def _micro_batches(vocab: int) -> list[dict[str, torch.Tensor]]:
    """Two micro-batches of padded rows: 3 + 15 + 9 label tokens after the shift, then 45."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for lengths in ([4, 16, 10], [16, 16, 16]):
        ids = torch.randint(1, vocab, (3, 16), generator=gen)
        mask = (torch.arange(16) < torch.tensor(lengths)[:, None]).long()
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _step_grads(plan: Plan, model: LMLoss, micro: list[dict[str, torch.Tensor]]) -> tuple[float, list]:
    """What a backend does: weigh each micro-batch's loss, backward it / grad_accum; the logged loss."""
    weights = TokenWeights(plan, torch.device("cpu"))
    model.zero_grad(set_to_none=True)
    weights.start(micro)
    total = 0.0
    for i, batch in enumerate(micro):
        loss = weights(i, model(**batch))
        (loss.float() / ACCUM).backward()
        total += float(loss.detach())
    return total / len(micro), [p.grad.clone() for p in model.parameters()]


def _token_sum(model: LMLoss, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The batch's summed next-token cross-entropy over its labels, by hand, and their count."""
    logits = model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    loss = nn.functional.cross_entropy(flat, labels.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


def _reference(model: LMLoss, micro: list[dict[str, torch.Tensor]], tokens: bool) -> tuple[float, list]:
    model.zero_grad(set_to_none=True)
    sums = [_token_sum(model, b) for b in micro]
    token_mean = sum(s for s, _ in sums) / sum(n for _, n in sums)
    loss = token_mean if tokens else sum(s / n for s, n in sums) / len(sums)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("loss_mode", ["labelled", "full", "model"])
@pytest.mark.parametrize("normalization", ["tokens", "batch"])
def test_step_gradient_is_the_chosen_mean(tmp_path: Path, normalization: str, loss_mode: str) -> None:
    plan = _plan(tmp_path, normalization)
    assert plan.shape is not None
    torch.manual_seed(0)
    model = LMLoss(gpt2(plan.shape, 0.0), causal=True, loss=loss_mode)
    micro = _micro_batches(plan.shape.vocab_size)
    assert [model.label_tokens(b["labels"]) for b in micro] == [27, 45]
    logged, grads = _step_grads(plan, model, micro)
    want_loss, want = _reference(model, micro, tokens=normalization == "tokens")
    assert logged == pytest.approx(want_loss, rel=1e-5)
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    # The two differ here (27 and 45 label tokens): the test can tell them apart.
    other, _ = _reference(model, micro, tokens=normalization != "tokens")
    assert abs(other - want_loss) / want_loss > 1e-4


@pytest.mark.parametrize("loss_mode", ["labelled", "full", "model"])
def test_a_micro_batch_without_labels_adds_nothing(tmp_path: Path, loss_mode: str) -> None:
    plan = _plan(tmp_path, "tokens")
    assert plan.shape is not None
    torch.manual_seed(0)
    model = LMLoss(gpt2(plan.shape, 0.0), causal=True, loss=loss_mode)
    micro = _micro_batches(plan.shape.vocab_size)
    micro[0] = {**micro[0], "labels": torch.full_like(micro[0]["labels"], -100)}
    logged, grads = _step_grads(plan, model, micro)
    want_loss, want = _reference(model, micro[1:], tokens=True)
    assert logged == pytest.approx(want_loss, rel=1e-5)  # the step's label tokens are all the other's
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_models_with_their_own_loss_are_left_alone(tmp_path: Path) -> None:
    """tiny-mlp computes its own loss: tokens changes nothing, and the plan says so when it is written."""
    plan = _plan(tmp_path, "tokens", "bert_tiny.yaml", "model.name=tiny-mlp")
    assert not plan.model.language_model
    weights = TokenWeights(plan, torch.device("cpu"))
    loss = torch.tensor(2.5)
    weights.start([{"labels": torch.zeros(2, 2)}])
    assert weights(0, loss) is loss
    assert any(w.startswith("train.loss_normalization: has no effect") for w in plan.warnings)
    assert not any("loss_normalization" in w for w in _plan(tmp_path, "tokens").warnings)
