"""recipes/gpt2_tiny.yaml as a user runs it: causal-LM pretraining with the byte-level BPE
tokenizer trained on the corpus, then exported and used by transformers' own generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.runs import ROOT, explain, mplaunch


@pytest.mark.slow
def test_gpt2_tiny_trains_a_bpe_tokenizer_and_exports_a_model_that_generates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # transformers' import sets it
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    env = {"DS_ACCELERATOR": "cpu", "MPLAUNCH_CACHE": str(tmp_path / "cache")}
    run = mplaunch(
        str(ROOT / "recipes" / "gpt2_tiny.yaml"), f"logging.dir={tmp_path / 'runs'}", "train.max_steps=4",
        "train.eval_every=0", "checkpoint.every_steps=0", "logging.progress=false", "logging.tensorboard=false",
        env=env,
    )  # fmt: skip
    assert run.returncode == 0, explain(run)
    run_dir = tmp_path / "runs" / "gpt2-tiny-lm"
    trained = json.loads((run_dir / "tokenizer" / "tokenizer.json").read_text())
    assert trained["model"]["type"] == "BPE"
    assert [t["content"] for t in trained["added_tokens"]] == ["<|endoftext|>"]
    plan = json.loads((run_dir / "plan.json").read_text())["plan"]
    assert (
        plan["vocab_size"] == plan["shape"]["vocab_size"] == len(trained["model"]["vocab"])
    )  # the model is sized to the trained tokenizer

    out = tmp_path / "export"
    exported = mplaunch("export", str(run_dir), "--out", str(out), env=env)
    assert exported.returncode == 0, explain(exported)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (end, end)
    # The config names the end of text too, so generate stops there and pads with it.
    assert (model.config.eos_token_id, model.generation_config.eos_token_id) == (end, end)
    text = "Ünïcode the corpus never had: 東京, µs — kept byte for byte"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    prompt = tokenizer("The", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
