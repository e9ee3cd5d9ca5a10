"""Packed documents in one process: a packed row's logits and loss equal each document's alone,
positions restart at each document, and the probe tells which models keep documents apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from launcher.plan.hardware import Hardware
from launcher.plan.resolve import resolve
from launcher.recipe.schema import load
from launcher.run import token_cache
from launcher.worker import data, model_setup
from launcher.worker.models import LMLoss
from tests.runs import TINY

BERT_TINY = TINY  # its data: the shipped corpus, one document per line


# --------------------------------------------------------------------------- end to end

CAUSAL = ("model.name=gpt2-lm", "data.task=causal-lm")  # the tiny GPT-2 on it


CPU = Hardware(cpu_count=2)


VOCAB = 97


SEP = 3


# Document lengths (separator included) of the hand-made stream: rows of 5 tokens cut them at every
# offset: a document that spans two and three rows, one-token documents, one that ends a row exactly.
LENGTHS = (3, 7, 2, 9, 1, 1, 4, 13)


def _plan(tmp_path: Path, *overrides: str):
    """The plan as the launcher leaves it for the workers: RUN_DIR/tokenizer in place."""
    plan = resolve(load(BERT_TINY, [f"logging.dir={tmp_path}", *overrides]), CPU)
    token_cache.place_tokenizer(plan)
    return plan


def _tiny_lm(family: str, attn: str) -> nn.Module:
    """A two-layer causal LM of transformers with fresh weights, in eval mode (no dropout)."""
    import transformers

    torch.manual_seed(0)
    width = {"num_hidden_layers": 2, "num_attention_heads": 4, "attn_implementation": attn}
    configs = {
        "gpt2": ("GPT2", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "bos_token_id": None,
                          "eos_token_id": None, "attn_implementation": attn}),
        "llama": ("Llama", {**width, "hidden_size": 32, "num_key_value_heads": 2, "intermediate_size": 64,
                            "max_position_embeddings": 64}),
        # Its positions come from the attention mask, not from position_ids: packing it crosses documents.
        "opt": ("OPT", {**width, "hidden_size": 32, "ffn_dim": 64, "max_position_embeddings": 64,
                        "word_embed_proj_dim": 32}),
    }  # fmt: skip
    prefix, kwargs = configs[family]
    config = getattr(transformers, f"{prefix}Config")(vocab_size=VOCAB, **kwargs)
    model_class = getattr(transformers, "GPT2LMHeadModel" if family == "gpt2" else f"{prefix}ForCausalLM")
    lm: nn.Module = model_class(config).eval()
    return lm


def _documents(*lengths: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(5, VOCAB, (n,), generator=gen) for n in lengths]


def _positions(docs: list[torch.Tensor], first: int = 0) -> torch.Tensor:
    runs = [torch.arange(len(d)) for d in docs]
    runs[0] = runs[0] + first
    return torch.cat(runs)[None]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_packed_rows_logits_are_each_documents_alone(family: str, attn: str) -> None:
    lm = _tiny_lm(family, attn)
    assert lm.config.use_cache  # the default: the call below must turn the cache off
    docs = _documents(5, 9, 1, 7)
    row = torch.cat(docs)[None]
    with torch.no_grad():
        packed = lm(input_ids=row, position_ids=_positions(docs), use_cache=False).logits[0]
        alone = torch.cat([lm(input_ids=d[None], use_cache=False).logits[0] for d in docs])
        crossing = lm(input_ids=row, use_cache=False).logits[0]
        cached = lm(input_ids=row, position_ids=_positions(docs)).logits[0]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    # Without position_ids, or with the cache transformers makes when use_cache is on, attention crosses.
    for other in (crossing, cached):
        assert not torch.allclose(other[5:], alone[5:], atol=1e-3)
        # The first document has nothing before it: the same either way.
        torch.testing.assert_close(other[:5], alone[:5], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_only_the_restarts_matter_a_row_may_begin_mid_document(family: str) -> None:
    # transformers starts a new sequence where a position is not its predecessor's + 1: a first
    # document counted from 3 is still one sequence (its positions are its own, 3, 4, ...).
    lm = _tiny_lm(family, "sdpa")
    docs = _documents(4, 6)
    with torch.no_grad():
        packed = lm(input_ids=torch.cat(docs)[None], position_ids=_positions(docs, first=3), use_cache=False)
        tail = lm(input_ids=docs[0][None], position_ids=torch.arange(3, 7)[None], use_cache=False).logits[0]
        second = lm(input_ids=docs[1][None], use_cache=False).logits[0]
    torch.testing.assert_close(packed.logits[0], torch.cat([tail, second]), rtol=1e-5, atol=1e-5)


def test_the_loss_of_a_packed_row_is_that_of_its_documents_alone() -> None:
    lm = _tiny_lm("gpt2", "sdpa")
    docs = _documents(6, 3, 8)
    row, positions = torch.cat(docs)[None], _positions(docs)
    labels = row.masked_fill(positions == 0, -100)  # what data.Batches gives
    with torch.no_grad():
        loss = LMLoss(lm, causal=True)(input_ids=row, labels=labels, position_ids=positions)
        alone = [lm(input_ids=d[None], use_cache=False).logits[0, :-1] for d in docs]
    sums = [nn.functional.cross_entropy(x, d[1:], reduction="sum") for x, d in zip(alone, docs, strict=True)]
    torch.testing.assert_close(loss, sum(sums) / sum(len(d) - 1 for d in docs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("family", "keeps"), [("gpt2", True), ("llama", True), ("opt", False)])
def test_the_probe_tells_models_that_keep_documents_apart(family: str, keeps: bool) -> None:
    lm = _tiny_lm(family, "sdpa").train()
    assert model_setup.keeps_documents_apart(lm) is keeps
    assert lm.training  # put back in its mode
    told, note = model_setup.document_positions(LMLoss(lm, causal=True))
    assert told is keeps
    assert note.startswith("packed documents kept apart" if keeps else "packed documents NOT kept apart")


class _TakesPositions(nn.Module):
    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        return input_ids.float().mean()


class _TakesAnything(nn.Module):
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return input_ids.float().mean()


def test_a_model_target_is_given_position_ids_only_when_its_forward_names_them() -> None:
    assert model_setup.document_positions(_TakesPositions()) == (
        True,
        "packed documents kept apart: _TakesPositions gets position_ids restarting at each document "
        "(no loss on a document's first token)",
    )
    told, note = model_setup.document_positions(_TakesAnything())
    assert not told
    assert "_TakesAnything.forward has no position_ids parameter" in note


@pytest.mark.parametrize("overrides", [(), ("model.lora.rank=2",)])
def test_the_built_in_gpt2_keeps_documents_apart(tmp_path: Path, overrides: tuple[str, ...]) -> None:
    model, _ = model_setup.model_for(_plan(tmp_path, *CAUSAL, *overrides))
    assert model_setup.document_positions(model)[0]


def _stream(tmp_path: Path, lengths: tuple[int, ...] = LENGTHS) -> token_cache.TokenCache:
    """A token cache of documents of these lengths, each ending in SEP, ids 10, 11, ... otherwise."""
    ids = (np.arange(sum(lengths)) % 80 + 10).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.uint64)
    ids[offsets[1:].astype(np.int64) - 1] = SEP
    ids.tofile(tmp_path / token_cache.TOKENS_FILE)
    offsets.tofile(tmp_path / token_cache.OFFSETS_FILE)
    return token_cache.TokenCache(tmp_path, "uint16", int(ids.size), len(lengths), SEP)


def _reference_positions(lengths: tuple[int, ...], body: int, row: int) -> list[int]:
    """Positions by counting: from 0 at each document start and at the row's start."""
    starts = set(np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist())
    out, pos = [], 0
    for t in range(row * body, (row + 1) * body):
        pos = 0 if t in starts or t == row * body else pos + 1
        out.append(pos)
    return out


def test_positions_restart_at_each_document_and_each_row(tmp_path: Path) -> None:
    rows = data.StreamRows(_stream(tmp_path), 5, None, pack=True)
    assert len(rows) == sum(LENGTHS) // 5 == 8
    every = np.arange(len(rows))
    got = rows.positions(every)
    assert got.dtype == torch.int64 and got.shape == (8, 5)
    assert got.tolist() == [_reference_positions(LENGTHS, 5, r) for r in every]
    # The 9-token document at stream[12:21] starts in row 2 after a 2-token one, fills row 3 and ends
    # row 4's first token (its separator), which counts from 0 again; two 1-token documents follow.
    assert got[2].tolist() == [0, 1, 0, 1, 2]
    assert got[3].tolist() == [0, 1, 2, 3, 4]
    assert got[4].tolist() == [0, 0, 0, 0, 1]
    assert torch.equal(rows.positions(np.array([4, 2])), got[[4, 2]])  # any rows, in any order


def test_packed_batches_carry_positions_and_no_loss_across_a_boundary(tmp_path: Path) -> None:
    plan = _plan(tmp_path / "runs", *CAUSAL)
    (tmp_path / "cache").mkdir()
    tokens = data.Tokens(data.StreamRows(_stream(tmp_path / "cache"), 5, None), VOCAB, -1, (SEP,))
    assert data.documents(tokens, plan)
    every = np.arange(len(tokens.ids))
    batch = data.Batches(tokens, every, plan, 0, evaluation=True, positions=True).collate(every, epoch=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no padding: no attention_mask
    ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
    assert torch.equal(positions, tokens.ids.positions(every))
    starts = positions == 0
    assert (labels[starts] == -100).all() and torch.equal(labels[~starts], ids[~starts])
    # Inside a row a document starts right after a separator (it belongs to the document it ends).
    assert torch.equal(starts[:, 1:], ids[:, :-1] == SEP)
    # Without position_ids (a model that cannot keep documents apart) the batch is today's.
    today = data.Batches(tokens, every, plan, 0, evaluation=True).collate(every, epoch=0)
    assert set(today) == {"input_ids", "labels"} and torch.equal(today["labels"], ids)


def test_only_packed_causal_lm_rows_have_documents_to_keep_apart(tmp_path: Path) -> None:
    cache = _stream(tmp_path)
    causal, masked = _plan(tmp_path / "c", *CAUSAL), _plan(tmp_path / "m")
    packed = data.Tokens(data.StreamRows(cache, 5, None), VOCAB, -1, (SEP,))
    unpacked = data.Tokens(data.StreamRows(cache, 5, None, pack=False), VOCAB, -1, (SEP,))
    framed = data.Tokens(data.StreamRows(cache, 7, (1, SEP)), VOCAB, 4, (1, SEP, 4))
    assert data.documents(packed, causal)
    assert not data.documents(unpacked, causal)
    assert not data.documents(framed, masked)  # masked-lm attends both ways: boundaries not kept
    assert not data.documents(packed, masked)
    with pytest.raises(AssertionError, match="packed documents"):
        data.Batches(unpacked, np.arange(5), causal, 0, evaluation=True, positions=True)


def test_real_text_positions_follow_the_separators_and_depend_only_on_the_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MPLAUNCH_CACHE", str(tmp_path / "cache"))
    plan = _plan(tmp_path, *CAUSAL)
    tokens = data.load_tokens(plan, 0, lambda: None)
    assert isinstance(tokens.ids, data.StreamRows) and data.documents(tokens, plan)
    sep = tokens.ids.cache.separator_id
    every = np.arange(len(tokens.ids))
    ids, positions = tokens.ids.take(every)[0], tokens.ids.positions(every)
    assert torch.equal(positions[:, 1:] == 0, ids[:, :-1] == sep)
    assert (positions[:, 0] == 0).all()
    assert 0 < int(positions.max()) < plan.recipe.data.seq_len
    rows = data.split(len(tokens.ids), plan.recipe.data.eval_fraction, plan.recipe.train.seed)
    first = data.Batches(tokens, rows.train, plan, 1, positions=True).for_step(5)
    again = data.Batches(tokens, rows.train, plan, 1, positions=True).for_step(5)
    for a, b in zip(first, again, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
