"""The training objective (data.task): which batches the model receives (README.md, "Batches").

Light side: decided from the recipe alone, and for model.hf with data.task auto from its
config.json, which the plan reads (launcher.plan.model, whose `ModelFacts.task` everyone after the
plan reads): `check` and the dry run say it, and the workers' collation (launcher.worker.data,
launcher.worker.examples) and the models follow it. Every batch holds `input_ids` and `labels`:

- masked-lm: `input_ids` with BERT's masking (of data.mask_prob of the tokens, 80 %
  [MASK], 10 % a random token, 10 % kept) and `labels` equal to the original token at
  the chosen positions and -100 elsewhere. Needs a [MASK] token.
- causal-lm: `labels` equal to `input_ids`; the model shifts (predicts token t+1 from
  tokens up to t), as Hugging Face causal LMs do. Any tokenizer. Packed rows (data.pack
  true) given to a model that keeps documents apart (model_setup.document_positions) also
  hold `position_ids`, 0 at each document's first token (the separator ends the document
  before it) and at the row's first, and the label of each document's first token is
  -100: no attention and no loss crosses a document boundary. Masked-LM rows, and causal
  ones for other models, let attention cross boundaries.
- sequence-classification: one record per row, `input_ids` and `attention_mask`
  (1 on tokens, 0 on padding), and `labels` of shape (batch,): the record's class.
- sft: prompt then response per row, with `attention_mask`; `labels` equal to
  `input_ids` on the response tokens and -100 on the prompt and padding (the model
  shifts, as for causal-lm).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from launcher.recipe import families

if TYPE_CHECKING:
    from launcher.recipe.sections import Recipe

MASKED_LM = "masked-lm"
CAUSAL_LM = "causal-lm"
SEQUENCE_CLASSIFICATION = "sequence-classification"
SFT = "sft"
# Tasks whose rows are records (one per row, padded) rather than windows of a token stream.
PER_RECORD = (SEQUENCE_CLASSIFICATION, SFT)
# Tasks whose model predicts the next token (the model shifts the labels).
CAUSAL = (CAUSAL_LM, SFT)
# What a record holds for each per-record task, beyond the text.
_RECORD_FIELDS = {
    SEQUENCE_CLASSIFICATION: "data.label_field",
    SFT: "data.prompt_field and data.response_field",
}


def resolve(recipe: Recipe, hf_task: str | None = None) -> str:
    """data.task, with auto decided by the model: the built-in's, model.hf's architecture's, else masked-lm.

    Args:
        recipe: the validated recipe.
        hf_task: the task model.hf's config names (launcher.plan.hf_dir.task_of), which only the plan
            reads; None when it names none or is not read.
    """
    if recipe.data.task != "auto":
        return recipe.data.task
    if recipe.model.hf is not None:
        return hf_task or MASKED_LM
    if recipe.model.target is None and recipe.model.name is not None:
        return families.FAMILIES[recipe.model.name].tasks[0]
    return MASKED_LM


def known(recipe: Recipe) -> bool:
    """The task follows from the recipe alone: all but data.task auto with model.hf (its config decides)."""
    return recipe.data.task != "auto" or recipe.model.hf is None


def problems(recipe: Recipe) -> list[str]:
    """A built-in model asked to learn an objective it is not made for, one line each."""
    name, task = recipe.model.name, recipe.data.task
    if recipe.model.hf is not None or recipe.model.target is not None or name is None or task == "auto":
        return []
    made_for = families.FAMILIES[name].tasks
    if task in made_for:
        return []
    return [
        f"data.task: {name} is a {' / '.join(made_for)} model, it cannot train {task}; "
        "use model.hf or a model.target"
    ]


def hf_problems(recipe: Recipe, hf_task: str | None) -> list[str]:
    """data.task auto with a model.hf whose config the plan read names no task (or, a hub id, was not read)."""
    if recipe.data.task != "auto" or recipe.model.hf is None or hf_task is not None:
        return []
    return [
        f"data.task: auto cannot tell what {recipe.model.hf} is for (its config names no "
        "…ForCausalLM, …ForMaskedLM or …ForSequenceClassification architecture); set data.task"
    ]


def record_problems(kind: str, task: str) -> list[str]:
    """Text files (one field per line) cannot feed a task whose rows are records."""
    if kind != "text" or task not in _RECORD_FIELDS:
        return []
    return [
        f"data.kind: text has one field per line; {task} needs records with {_RECORD_FIELDS[task]}: "
        "use jsonl, json, csv, parquet, arrow or hf-disk"
    ]
