"""Save tiny Hugging Face models with their tokenizers, as `save_pretrained` writes them:
the local model directories the fine-tuning recipes (and the tests) start from.

    python recipes/models/make_tiny.py [OUT_DIR] [--missing]   # default: beside this file

mplaunch runs it on first use (with --missing: only the models not there yet) when a recipe's
model.hf names one of them here (launcher.plan.model), so a fresh clone needs no extra step; run
it by hand to make them somewhere else (a copied recipe's models/ folder) or to save them again.
It downloads nothing, and gives the same files on every run (with the same library versions).
Each model is written to a temporary folder and renamed into place, so a reader never sees half of one.

- tiny-bert/   BertForMaskedLM with a WordPiece tokenizer ([CLS] … [SEP]); bert_finetune_tiny.yaml
               fine-tunes it as a sequence classifier (a new head on the pretrained encoder).
- tiny-llama/  LlamaForCausalLM with a byte-level BPE tokenizer (<s> … </s>); llama_sft_tiny.yaml.
- tiny-gpt2/   GPT2LMHeadModel with a byte-level BPE tokenizer (<|endoftext|>).

Weights are a seeded random initialisation (no download): what matters here is the
format, which is exactly what a pretrained checkpoint of the hub has. The tokenizers come from
recipes/data (the corpus and the task files), so every word has ids: byte-level BPE trained on
it, and a WordPiece vocabulary of its words and characters.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
    PreTrainedTokenizerFast,
)  # fmt: skip

DATA = Path(__file__).parents[1] / "data"
VOCAB = 2000
NAMES = ("tiny-bert", "tiny-llama", "tiny-gpt2")
# The tiny BERT's vocabulary, [unusedN] tokens (as in BERT's own) filling it up: the size of the WordPiece
# tokenizer it was first trained with, so that every model's seeded weights (drawn one model after
# another) stay what the tests were written against.
BERT_VOCAB = 583
SHAPE = {"hidden": 64, "layers": 2, "heads": 4, "intermediate": 128, "positions": 256}


def texts() -> list[str]:
    lines = (DATA / "corpus.txt").read_text().splitlines()
    for name in ("topics.jsonl", "questions.jsonl"):
        for line in (DATA / name).read_text().splitlines():
            lines.extend(str(v) for v in json.loads(line).values() if isinstance(v, str))
    return lines


def wordpiece() -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    # Every word of the data whole, and each character alone and as a "##" piece for other words. (The
    # WordPiece trainer numbers its pieces in hash order, so two trainings differ; this vocabulary is the
    # same on every run.)
    words = {w for t in texts() for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t))}
    chars = sorted({c for w in words for c in w})
    vocab = [*specials, *chars, *(f"##{c}" for c in chars), *sorted(words - set(chars))]
    assert len(vocab) <= BERT_VOCAB, len(vocab)
    vocab += [f"[unused{i}]" for i in range(BERT_VOCAB - len(vocab))]
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    roles = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), specials, strict=True))
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=SHAPE["positions"], **roles)


def byte_bpe(bos: str | None, eos: str, pad: str) -> PreTrainedTokenizerFast:
    specials = list(dict.fromkeys([t for t in (pad, bos, eos) if t]))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts(), trainer)
    if bos:  # Llama's tokenizer starts every text with <s>
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    roles = {"eos_token": eos, "pad_token": pad, **({"bos_token": bos} if bos else {})}
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=SHAPE["positions"], **roles)


def save(out: Path, model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, missing_only: bool) -> None:
    if missing_only and (out / "config.json").is_file():
        return  # built all the same: the models draw their seeded weights one after another
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if missing_only and out.exists():  # another process saved it meanwhile
        shutil.rmtree(tmp)
        return
    if out.is_dir():
        shutil.rmtree(out)
    os.replace(tmp, out)
    count = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {type(model).__name__}, {count:,} parameters, {len(tokenizer)} tokens")


def main(argv: list[str]) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    missing_only = "--missing" in argv
    paths = [a for a in argv if a != "--missing"]
    root = Path(paths[0]) if paths else Path(__file__).parent
    root.mkdir(parents=True, exist_ok=True)
    if missing_only and all((root / name / "config.json").is_file() for name in NAMES):
        return 0
    s = SHAPE
    torch.manual_seed(0)
    bert_tok = wordpiece()
    bert = BertConfig(
        vocab_size=len(bert_tok), hidden_size=s["hidden"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], intermediate_size=s["intermediate"], max_position_embeddings=s["positions"],
        pad_token_id=bert_tok.pad_token_id,
    )  # fmt: skip
    save(root / "tiny-bert", BertForMaskedLM(bert), bert_tok, missing_only)
    llama_tok = byte_bpe("<s>", "</s>", "<pad>")
    llama = LlamaConfig(
        vocab_size=len(llama_tok), hidden_size=s["hidden"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=2, intermediate_size=s["intermediate"],
        max_position_embeddings=s["positions"], bos_token_id=llama_tok.bos_token_id,
        eos_token_id=llama_tok.eos_token_id, pad_token_id=llama_tok.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    save(root / "tiny-llama", LlamaForCausalLM(llama), llama_tok, missing_only)
    gpt_tok = byte_bpe(None, "<|endoftext|>", "<|endoftext|>")
    gpt2 = GPT2Config(
        vocab_size=len(gpt_tok), n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"],
        n_inner=s["intermediate"], n_positions=s["positions"], bos_token_id=gpt_tok.eos_token_id,
        eos_token_id=gpt_tok.eos_token_id, pad_token_id=gpt_tok.pad_token_id,
    )  # fmt: skip
    save(root / "tiny-gpt2", GPT2LMHeadModel(gpt2), gpt_tok, missing_only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
