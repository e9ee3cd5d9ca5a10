"""The model, resolved once: what the plan, the dry run, the memory planner and the workers read about it.

The plan reads model.hf's directory here, once (launcher.plan.hf_dir), decides the task
(launcher.recipe.tasks, with the config's architecture for data.task auto), the classes of a
sequence classifier, whether the model predicts the next token and which loss mplaunch takes of
it. `Plan.model` carries the result to plan.json; nobody after the plan decides these again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from launcher.plan import hf_dir
from launcher.recipe import tasks
from launcher.recipe.families import FAMILIES
from launcher.recipe.sections import Recipe, Train

# train.loss as the dry run says it (launcher.worker.models.LMLoss does it): the loss names' one table.
LOSSES = {
    "labelled": "train.loss labelled: the output head and an fp32 cross-entropy on labelled positions only",
    "full": "train.loss full: the output head on every position, an fp32 cross-entropy",
    "model": "train.loss model: the model's own loss, in the compute dtype",
}
assert tuple(LOSSES) == get_args(Train.model_fields["loss"].annotation), "train.loss's names are LOSSES'"
# train.loss_normalization as the dry run says it (launcher.worker.backends.TokenWeights does it).
NORMALIZATIONS = {
    "tokens": "averaged over the step's label tokens on every rank (train.loss_normalization tokens)",
    "batch": "the mean of the micro-batches' means (train.loss_normalization batch)",
}
assert tuple(NORMALIZATIONS) == get_args(Train.model_fields["loss_normalization"].annotation)


@dataclass(frozen=True)
class ModelFacts:
    """What the plan decided about the model (`Plan.model`, in plan.json)."""

    task: str  # data.task, auto resolved (launcher.recipe.tasks)
    num_labels: int | None  # sequence-classification: model.num_labels, else model.hf's config's, else 2
    causal: bool  # the model predicts the next token (causal-lm, sft): a language model shifts the labels
    # train.loss for a language model mplaunch takes the loss of (launcher.worker.models.LMLoss: a built-in
    # LM, model.hf with an LM task); None: the model computes its own (tiny-mlp, model.target) or is a
    # classifier (launcher.worker.model_setup.ClassifierLoss).
    loss: str | None

    @property
    def language_model(self) -> bool:
        return self.loss is not None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelFacts:
        return cls(**data)


@dataclass(frozen=True)
class ResolvedModel:
    """The model as the plan read it: model.hf's directory (None without one, or when unreadable), the
    facts, and what stops the plan (one line each)."""

    hf: hf_dir.HfModel | None
    facts: ModelFacts
    problems: tuple[str, ...]


def resolve_model(recipe: Recipe) -> ResolvedModel:
    """Read model.hf's directory once and decide the model's facts; the problems the files show."""
    hf, problems = _read_hf(recipe)
    hf_task = hf_dir.task_of(hf) if hf is not None and hf.local else None
    if hf is not None:
        problems += tasks.hf_problems(recipe, hf_task)
    task = tasks.resolve(recipe, hf_task)
    if not tasks.known(recipe):  # launcher.recipe.rules checked the tasks the recipe decides alone
        problems += tasks.record_problems(recipe.data.kind, task)
    problems += _init_from(recipe)
    return ResolvedModel(hf, facts_of(recipe, task, hf), tuple(problems))


def facts_of(recipe: Recipe, task: str, hf: hf_dir.HfModel | None) -> ModelFacts:
    """The facts of the recipe's model given its resolved task (and model.hf's directory, if read)."""
    m = recipe.model
    if m.hf is not None:
        language_model = task != tasks.SEQUENCE_CLASSIFICATION
    else:
        language_model = m.target is None and m.name is not None and FAMILIES[m.name].language_model
    classes = (m.num_labels or hf_dir.num_labels(hf)) if task == tasks.SEQUENCE_CLASSIFICATION else None
    return ModelFacts(
        task=task,
        num_labels=classes,
        causal=task in tasks.CAUSAL,
        loss=recipe.train.loss if language_model else None,
    )


def _read_hf(recipe: Recipe) -> tuple[hf_dir.HfModel | None, list[str]]:
    m = recipe.model
    if m.hf is None:
        return None, []
    hf, problems = hf_dir.read(m.hf, recipe.source, dict(m.config))
    if hf is None:
        return None, problems
    problems += hf_dir.problems(hf, m.weights, dict(m.config), recipe.data.tokenizer is not None)
    if hf.max_positions is not None and recipe.data.seq_len > hf.max_positions:
        problems.append(
            f"data.seq_len: {recipe.data.seq_len} is longer than {hf.source}'s {hf.max_positions} positions"
        )
    return hf, problems


def _init_from(recipe: Recipe) -> list[str]:
    """model.init_from must be a directory of weights the workers can load."""
    if recipe.model.init_from is None:
        return []
    base = Path(recipe.source).parent if recipe.source else Path()
    where = base / recipe.model.init_from
    if not where.is_dir():
        return [f"model.init_from: directory not found: {where}"]
    names = hf_dir.INIT_WEIGHT_FILES
    if not any((where / n).is_file() for n in names):
        return [
            f"model.init_from: {where} holds none of {', '.join(names)}; expected what mplaunch export wrote"
        ]
    return []
