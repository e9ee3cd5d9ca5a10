"""The training objective (data.task): which batches the model receives (README.md, "Batches").

Light side: decided from the recipe alone (and model.hf's config.json), so `check`
and the dry run say it, and the workers' collation (launcher.worker.data, launcher.worker.examples)
and the models follow it. Every batch holds `input_ids` and `labels`:

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

if TYPE_CHECKING:
    from launcher.recipe.schema import Recipe

MASKED_LM = "masked-lm"
CAUSAL_LM = "causal-lm"
SEQUENCE_CLASSIFICATION = "sequence-classification"
SFT = "sft"
# Tasks whose rows are records (one per row, padded) rather than windows of a token stream.
PER_RECORD = (SEQUENCE_CLASSIFICATION, SFT)
# The objectives each built-in model is made for; the first is its auto.
BUILT_IN = {"bert-mlm": (MASKED_LM,), "gpt2-lm": (CAUSAL_LM, SFT), "tiny-mlp": (MASKED_LM,)}


def resolve(recipe: Recipe) -> str:
    """data.task, with auto decided by the model: the built-in's, model.hf's architecture's, else masked-lm."""
    if recipe.data.task != "auto":
        return recipe.data.task
    if recipe.model.hf is not None:
        return _hf_task(recipe) or MASKED_LM
    if recipe.model.target is None and recipe.model.name is not None:
        return BUILT_IN[recipe.model.name][0]
    return MASKED_LM


def problems(recipe: Recipe) -> list[str]:
    """A model asked to learn an objective it is not made for, one line each."""
    name, task = recipe.model.name, recipe.data.task
    if recipe.model.hf is not None:
        if task == "auto" and recipe.model.hf is not None and _hf_task(recipe) is None:
            return [
                f"data.task: auto cannot tell what {recipe.model.hf} is for (its config names no "
                "…ForCausalLM, …ForMaskedLM or …ForSequenceClassification architecture); set data.task"
            ]
        return []
    if recipe.model.target is not None or name is None or task == "auto" or task in BUILT_IN[name]:
        return []
    return [
        f"data.task: {name} is a {' / '.join(BUILT_IN[name])} model, it cannot train {task}; "
        "use model.hf or a model.target"
    ]


def _hf_task(recipe: Recipe) -> str | None:
    from launcher.plan import hf_dir

    assert recipe.model.hf is not None
    model, _ = hf_dir.read(recipe.model.hf, recipe.source, dict(recipe.model.config))
    return hf_dir.task_of(model) if model is not None and model.local else None
