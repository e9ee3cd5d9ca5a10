"""train.loss: the labelled head gives full's loss and gradients with less work; model is the model's own.

The tiny Hugging Face directories come from recipes/models/make_tiny.py (the `tiny_models` fixture).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from launcher import cli  # noqa: E402
from launcher.worker import model_setup  # noqa: E402
from launcher.plan.hardware import Hardware  # noqa: E402
from launcher.plan.resolve import resolve  # noqa: E402
from launcher.recipe.schema import load  # noqa: E402
from launcher.worker.models import LMLoss, split_head  # noqa: E402
from tests.conftest import RECIPES  # noqa: E402


MODELS = [("tiny-bert", "AutoModelForMaskedLM", False), ("tiny-gpt2", "AutoModelForCausalLM", True),
          ("tiny-llama", "AutoModelForCausalLM", True)]  # fmt: skip


def _model(directory: Path, auto: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, auto).from_pretrained(directory)


def _batch(vocab: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (4, 24), generator=gen)
    if causal:  # an SFT row: no loss on the prompt
        labels = ids.clone()
        labels[:, :6] = -100
    else:
        labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.15, ids, -100)
    return ids, labels


def _loss_and_grads(lm: nn.Module, causal: bool, loss: str, ids: torch.Tensor, labels: torch.Tensor):
    wrapped = LMLoss(lm, causal, loss)
    wrapped.choose_loss()
    lm.zero_grad()
    value = wrapped(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids))
    value.backward()
    return value.detach(), [p.grad.clone() for p in lm.parameters() if p.grad is not None]


@pytest.mark.parametrize(("name", "auto", "causal"), MODELS)
def test_the_labelled_head_gives_the_full_loss_and_gradients(
    tiny_models: Path, name: str, auto: str, causal: bool
) -> None:
    lm = _model(tiny_models / name, auto).train()
    for module in lm.modules():  # dropout off: the three must see the same network
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    assert split_head(lm) is not None
    ids, labels = _batch(lm.config.vocab_size, causal)
    full, full_grads = _loss_and_grads(lm, causal, "full", ids, labels)
    for loss in ("labelled", "model"):
        value, grads = _loss_and_grads(lm, causal, loss, ids, labels)
        assert torch.allclose(value, full, rtol=1e-6, atol=1e-6), (loss, value, full)
        assert len(grads) == len(full_grads)
        for g, f in zip(grads, full_grads, strict=True):
            assert torch.allclose(g, f, rtol=1e-4, atol=1e-7), loss


def test_a_model_that_is_not_base_plus_head_keeps_the_full_head(tiny_models: Path) -> None:
    lm = _model(tiny_models / "tiny-gpt2", "AutoModelForCausalLM")
    scale = 0.5

    def scaled(*args: object, **kwargs: object) -> object:  # an LM that scales its logits after the head
        out = type(lm).forward(lm, *args, **kwargs)
        out.logits = out.logits * scale
        return out

    lm.forward = scaled  # type: ignore[method-assign]
    assert split_head(lm) is None
    wrapped = LMLoss(lm, True, "labelled")
    note = wrapped.choose_loss()
    assert note is not None
    assert note.startswith("train.loss labelled: GPT2LMHeadModel is not its base model followed by one head")
    ids, labels = _batch(lm.config.vocab_size, True)
    expected = nn.functional.cross_entropy(
        (lm(input_ids=ids).logits[:, :-1]).reshape(-1, lm.config.vocab_size).float(),
        labels[:, 1:].reshape(-1),
    )
    assert torch.allclose(wrapped(input_ids=ids, labels=labels), expected)


def test_the_recipe_chooses_the_loss_of_the_built_model(tiny_models: Path) -> None:
    for loss in ("labelled", "full", "model"):
        plan = resolve(load(RECIPES / "gpt2_tiny.yaml", [f"train.loss={loss}"]), Hardware(cpu_count=2))
        model, notes = model_setup.model_for(plan)
        assert isinstance(model, LMLoss)
        assert model.loss == loss
        assert not any(n.startswith("train.loss") for n in notes)  # each runs as asked


def test_train_loss_beside_a_model_without_an_lm_loss_is_warned(capsys: pytest.CaptureFixture[str]) -> None:
    tiny_mlp = ["model.name=tiny-mlp", "data.kind=synthetic", "data.paths=[]"]
    assert cli.main(["check", str(RECIPES / "bert_tiny.yaml"), *tiny_mlp, "train.loss=full"]) == 0
    assert "warning: train.loss: has no effect" in capsys.readouterr().err
    assert cli.main(["check", str(RECIPES / "bert_tiny.yaml"), "train.loss=full"]) == 0
    assert capsys.readouterr().err == ""
    assert cli.main(["check", str(RECIPES / "bert_tiny.yaml"), "train.loss=fp32"]) == 2
    assert "train.loss" in capsys.readouterr().err
