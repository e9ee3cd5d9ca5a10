"""The training objective (data.task): which batches the model receives (README.md, "Batches").

Light side: decided from the recipe alone, so `check` and the dry run say it,
and the workers' collation (launcher.data) and the built-in models follow it.

- masked-lm: `input_ids` with BERT's masking (of data.mask_prob of the tokens, 80 %
  [MASK], 10 % a random token, 10 % kept) and `labels` equal to the original token at
  the chosen positions and -100 elsewhere. Needs a [MASK] token.
- causal-lm: `input_ids` and `labels` equal to them; the model shifts (predicts token
  t+1 from tokens up to t), as Hugging Face causal LMs do. Any tokenizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launcher.recipe import Recipe

MASKED_LM = "masked-lm"
CAUSAL_LM = "causal-lm"
# The objective each built-in model is made for.
BUILT_IN = {"bert-mlm": MASKED_LM, "gpt2-lm": CAUSAL_LM, "tiny-mlp": MASKED_LM}


def resolve(recipe: Recipe) -> str:
    """data.task, with auto decided by the built-in model (masked-lm for a model.target)."""
    if recipe.data.task != "auto":
        return recipe.data.task
    if recipe.model.target is None and recipe.model.name is not None:
        return BUILT_IN[recipe.model.name]
    return MASKED_LM


def problems(recipe: Recipe) -> list[str]:
    """A built-in model asked to learn an objective it is not made for, one line each."""
    name, task = recipe.model.name, recipe.data.task
    if recipe.model.target is not None or name is None or task == "auto" or BUILT_IN[name] == task:
        return []
    return [
        f"data.task: {name} is a {BUILT_IN[name]} model, it cannot train {task}; "
        "use the other built-in model or a model.target"
    ]
