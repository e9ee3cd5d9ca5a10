"""A user's model.target in the worker: a vocabulary too small for the first batch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.user_code import MODEL_FILE


@pytest.fixture
def import_hygiene(monkeypatch: pytest.MonkeyPatch) -> object:
    """models.build puts the import folder on sys.path and the module in sys.modules: undo both."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    sys.modules.pop("my_models", None)


@pytest.mark.usefixtures("import_hygiene")
def test_an_embedding_too_small_for_the_first_batch_is_one_clear_error(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from launcher.plan.targets import takes
    from launcher.recipe.schema import Model
    from launcher.worker.models import ModelError, build

    (tmp_path / "my_models.py").write_text(MODEL_FILE)
    model = build(Model(name=None, target="my_models:fixed"), None, 300, str(tmp_path))
    ids = torch.full((2, 4), 299)
    with pytest.raises(ModelError, match=r"embedding 'embed' has 50 rows but the first batch holds id 299;"):
        model(input_ids=ids, labels=ids)
    # The input embedding must cover the vocabulary even when the first batch's ids fit.
    model = build(Model(name=None, target="my_models:fixed"), None, 300, str(tmp_path))
    small = torch.full((2, 4), 7)
    with pytest.raises(
        ModelError, match=r"'embed' has 50 rows but it embeds input_ids; .* vocabulary is 300"
    ):
        model(input_ids=small, labels=small)
    with_positions = build(Model(name=None, target="my_models:positions"), None, 300, str(tmp_path))
    assert torch.isfinite(with_positions(input_ids=small, labels=small))
    # A factory that takes vocab_size (or **kwargs) is given the run's; one that does not is not.
    built = build(Model(name=None, target="my_models:build"), None, 300, str(tmp_path))
    assert built.embed.num_embeddings == 300
    loss = built(input_ids=ids, labels=ids)
    assert torch.isfinite(loss)
    assert not built.embed._forward_pre_hooks  # checked once, then gone
    assert build(Model(name=None, target="my_models:build", kwargs={"vocab_size": 400}), None, 300, None)
    mod = __import__("my_models")
    assert [takes(f, "vocab_size") for f in (mod.build, mod.fixed, mod.anything)] == [True, False, True]
