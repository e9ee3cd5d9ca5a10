"""Built-in models by name, and the one door for a user's own (`model.target`).

A model here is an nn.Module whose forward(**batch) returns the loss (a
tensor, or an output object with a `.loss`). Built-in transformers are made
from a config, never downloaded, with PyTorch SDPA attention.

A user's factory ("module:factory") is imported with the recipe's folder
first on the module search path (`Plan.import_dir`), then the worker's working
directory and PYTHONPATH. It is called with `model.kwargs`, plus
`vocab_size=<the run's vocabulary>` when its signature takes a `vocab_size`
parameter (or **kwargs) and model.kwargs does not set it. Its embeddings are
checked against the first batch, so ids past an embedding are one clear line
instead of an IndexError (or a CUDA device-side assert).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from launcher.plan import targets
from launcher.plan.model import LOSSES
from launcher.recipe import tasks
from launcher.recipe.families import FAMILIES
from launcher.recipe.sections import Model
from launcher.recipe.shapes import Shape


class ModelError(Exception):
    """A user's model factory could not be imported or called: reported as one clear line."""


def build(
    model: Model,
    shape: Shape | None,
    vocab_size: int | None = None,
    import_dir: str | None = None,
    causal: bool | None = None,
) -> nn.Module:
    """The recipe's model: a user's factory (model.target), or a built-in one of the plan's `shape`.

    Args:
        model: the recipe's model section.
        shape: the plan's shape of a built-in model (None for model.target).
        vocab_size: the run's vocabulary (`Plan.vocab_size`): given to a factory that takes it,
            and the bound the first batch's ids are checked against.
        import_dir: where model.target is imported from first (`Plan.import_dir`).
        causal: a built-in LM predicts the next token (`Plan.model.causal`); None: as its family's own task.

    Raises:
        ModelError: the factory cannot be imported or called, or returns no nn.Module.
    """
    if model.target is not None:
        return _from_target(model.target, dict(model.kwargs), vocab_size, import_dir)
    assert shape is not None, "the plan derives a shape for every built-in model"
    family = FAMILIES[shape.family]
    module_name, _, name = family.builder.partition(":")
    built = getattr(importlib.import_module(module_name), name)(shape, model.dropout)
    if not family.language_model:
        return built
    return LMLoss(built, causal=family.tasks[0] in tasks.CAUSAL if causal is None else causal)


class LMLoss(nn.Module):
    """A transformers LM trained on the cross-entropy `train.loss` chooses.

    labelled  the output head runs on the labelled positions only (masked-LM: the ~15 % masked
              tokens; causal-LM: every position but padding and an SFT prompt), and the
              cross-entropy is taken from those logits upcast to fp32. The same loss as `full`
              (row by row the same logits), without the head's work on positions without a label:
              for a masked LM with a large vocabulary that is most of the head. Used when the LM is
              its base model followed by one head module, and the two give its own logits
              (`split_head`, checked once on a short row); else `full`.
    full      the head on every position, the cross-entropy of all logits upcast to fp32.
    model     the model's own loss (`labels=`), in the logits' dtype as transformers computes it:
              what a plain training script does. Under bf16 a masked LM's loss is then rounded to
              about 1/32 near 6, and the softmax's gradient is bf16 too.
    """

    def __init__(self, lm: nn.Module, causal: bool, loss: str = "labelled") -> None:
        super().__init__()
        assert loss in LOSSES, loss
        self.lm = lm
        self.causal = causal
        self.loss = loss
        # The block classes FSDP2 shards as units for model.hf (launcher.worker.backends.fsdp2).
        self._no_split_modules = getattr(lm, "_no_split_modules", None)
        # (base model, head) for `labelled`, decided by `choose_loss`; a tuple, so not submodules again.
        self._split: tuple[nn.Module, ...] | None = None

    def choose_loss(self) -> str | None:
        """Decide how `labelled` runs (on the built model, before a backend wraps it); a line saying so
        when it cannot run as asked, else None. Call again after replacing `lm` (model.lora does)."""
        parts = split_head(self.lm) if self.loss == "labelled" else None
        self._split = parts or ()
        if self.loss != "labelled" or parts is not None:
            return None
        name = type(_base_of(self.lm)).__name__
        return (
            f"train.loss labelled: {name} is not its base model followed by one head, so the head runs "
            "on every position (as train.loss full)"
        )

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if "position_ids" in kwargs:
            # transformers builds its packed-sequence mask (one block per document) only when there is
            # no cache, and a model with config.use_cache makes an empty one even in training.
            kwargs["use_cache"] = False
        if self.loss == "model":
            return self.lm(input_ids=input_ids, labels=labels, **kwargs).loss
        if self._split is None:  # built without launcher.worker.model_setup
            self.choose_loss()
        parts = self._split
        if not parts:
            logits = self.lm(input_ids=input_ids, **kwargs).logits
            if self.causal:  # predict token t+1 from tokens up to t
                logits, labels = logits[:, :-1], labels[:, 1:]
            return _cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        body, head = parts
        hidden = body(input_ids=input_ids, **kwargs)[0]
        if self.causal:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        chosen = labels != -100
        return _cross_entropy(head(hidden[chosen]), labels[chosen])

    def label_tokens(self, labels: torch.Tensor) -> int:
        """The label tokens `forward`'s loss is the mean over, in every train.loss mode."""
        return label_tokens(labels, self.causal)


def label_tokens(labels: torch.Tensor, causal: bool) -> int:
    """The label tokens a language model's mean loss is over: the labels other than -100, after the
    causal shift. Read `labels` on the host (a CPU batch: no sync)."""
    return int((labels[:, 1:] if causal else labels).ne(-100).sum())


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100)


def split_head(lm: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The transformers LM's base model and output head, when it is made of just those two (its
    base_model_prefix child and one other) and head(base(x)) gives its logits on a short row; None
    otherwise. A peft model (model.lora) is looked through: its adapters sit inside the two."""
    model = _base_of(lm)
    prefix = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix, None) if prefix else None
    others = [m for n, m in model.named_children() if n != prefix]
    if not isinstance(body, nn.Module) or len(others) != 1 or not _composes(model, body, others[0]):
        return None
    return body, others[0]


def _base_of(lm: nn.Module) -> nn.Module:
    base = getattr(lm, "get_base_model", None)  # a peft PeftModel
    found = base() if callable(base) else lm
    return found if isinstance(found, nn.Module) else lm


@torch.no_grad()
def _composes(model: nn.Module, body: nn.Module, head: nn.Module) -> bool:
    """head(body(x)) gives the model's logits on a short row (in eval mode, so dropout is off).

    Some LMs do more between the two (a logit scale or soft-capping): those keep `full`.
    """
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 2:
        return False
    training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        ids = (1 + torch.arange(8, device=param.device) * 7919 % (vocab - 1)).unsqueeze(
            0
        )  # no id 0 (padding)
        mask = torch.ones_like(ids)
        whole = model(input_ids=ids, attention_mask=mask).logits.float()
        split = head(body(input_ids=ids, attention_mask=mask)[0]).float()
    except Exception:
        return False
    finally:
        model.train(training)
    return whole.shape == split.shape and torch.allclose(whole, split, rtol=1e-4, atol=1e-5)


def bert(shape: Shape, dropout: float) -> nn.Module:
    """The bert-mlm family's model (launcher.recipe.families)."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        attn_implementation="sdpa",  # type: ignore[call-arg]  # a PretrainedConfig keyword
    )
    return BertForMaskedLM(config)


def gpt2(shape: Shape, dropout: float) -> nn.Module:
    """The gpt2-lm family's model (launcher.recipe.families)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=shape.vocab_size,
        n_embd=shape.hidden_size,
        n_layer=shape.num_layers,
        n_head=shape.num_heads,
        n_inner=shape.intermediate_size,
        n_positions=shape.max_position_embeddings,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation="sdpa",  # type: ignore[call-arg]  # a PretrainedConfig keyword
    )
    return GPT2LMHeadModel(config)


class TinyMLP(nn.Module):
    """Embedding, two-layer MLP and a vocabulary head: the smallest masked-token model, for tests."""

    def __init__(self, shape: Shape, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(shape.hidden_size, shape.intermediate_size),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(shape.intermediate_size, shape.hidden_size),
        )
        self.head = nn.Linear(shape.hidden_size, shape.vocab_size)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **_: Any) -> torch.Tensor:
        h = self.embed(input_ids)
        logits = self.head(h + self.mlp(h))
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def _from_target(
    target: str, kwargs: dict[str, Any], vocab_size: int | None, import_dir: str | None
) -> nn.Module:
    try:
        factory = targets.load(target, import_dir, "model.target")
    except ValueError as exc:
        raise ModelError(str(exc)) from None
    given = ""
    if vocab_size is not None and "vocab_size" not in kwargs and targets.takes(factory, "vocab_size"):
        kwargs["vocab_size"] = vocab_size
        given = f" with vocab_size={vocab_size} (the run's vocabulary)"
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise ModelError(f"model.target: {target}(**model.kwargs){given} failed: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model.target: {target} returned {type(model).__name__}, not a torch.nn.Module")
    if vocab_size is not None:
        _check_first_ids(model, target, vocab_size)
    return model


def _check_first_ids(model: nn.Module, target: str, vocab_size: int) -> None:
    """Check each nn.Embedding's first call: no id past its rows, and input_ids' embedding holds the vocabulary.

    An id past an embedding is an IndexError on CPU and a device-side assert
    that kills the CUDA context on a GPU; one line naming both numbers says what
    to change. The embedding that receives the batch's input_ids must have a row
    for every id of the run's vocabulary, even if the first batch happens to hold
    none past it (others, such as positions, are checked on their ids only).
    Each hook removes itself after its first call, so later steps pay nothing;
    under torch.compile the check is skipped (it would break the graph).
    """
    first: dict[str, Any] = {}

    def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not torch.compiler.is_compiling():
            first["input_ids"] = kwargs.get("input_ids", args[0] if args else None)
            handles.pop("").remove()

    def hook_for(name: str, embedding: nn.Embedding) -> Callable[..., None]:
        def check(module: nn.Module, args: tuple[Any, ...]) -> None:
            ids = args[0] if args else None
            if torch.compiler.is_compiling() or not isinstance(ids, torch.Tensor) or not ids.numel():
                return
            handles.pop(name).remove()
            rows, top = embedding.num_embeddings, int(ids.max())
            if top >= rows or (ids is first.get("input_ids") and rows < vocab_size):
                found = f"the first batch holds id {top}" if top >= rows else "it embeds input_ids"
                raise ModelError(
                    f"model.target: {target}'s embedding {name!r} has {rows} rows but {found}; the run's "
                    f"vocabulary is {vocab_size}: build it with at least that many rows (a factory with a "
                    "vocab_size parameter is given it, unless model.kwargs sets one)"
                )
            if len(handles) == 0:
                first.clear()

        return check

    handles: dict[str, Any] = {"": model.register_forward_pre_hook(capture, with_kwargs=True)}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name:
            handles[name] = module.register_forward_pre_hook(hook_for(name, module))


def loss_of(output: Any) -> torch.Tensor:
    """The loss from a model's forward: a tensor, or an object/dict with `loss`."""
    if isinstance(output, torch.Tensor):
        return output
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if loss is None:
        raise ModelError(
            "the model's forward(**batch) returned no loss (return a tensor or an object with .loss)"
        )
    return loss
