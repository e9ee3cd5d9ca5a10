"""The hand-written baseline for bench/overhead.py: the training mplaunch runs, written out plainly.

Started by torchrun exactly as mplaunch starts its workers. It trains the
same tiny BERT on the same corpus (its own WordPiece tokenizer, trained the
same way), hands DeepSpeed the same config dict mplaunch generated (read
from that run's plan.json), and prints a JSON line of timings on rank 0:
the wall-clock time when each step finished.

    torchrun --standalone --nproc-per-node=2 bench/plain_train.py PLAN_JSON STEPS OUT_JSON
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    plan_path, steps, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    with open(plan_path) as f:
        plan = json.load(f)
    recipe, config = plan["recipe"], plan["plan"]["backend_config"]
    dist.init_process_group("gloo")
    rank, _world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(recipe["train"]["seed"])

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    texts = [
        line.strip()
        for p in plan["plan"]["data_paths"]
        for line in Path(p).read_text().splitlines()
        if line.strip()
    ]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        texts,
        trainers.WordPieceTrainer(
            vocab_size=8192,
            special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
            show_progress=False,
        ),
    )
    seq = recipe["data"]["seq_len"]
    stream = [i for enc in tok.encode_batch(texts, add_special_tokens=False) for i in [*enc.ids, 3]]
    rows = len(stream) // (seq - 2)
    body = torch.tensor(stream[: rows * (seq - 2)]).view(rows, seq - 2)
    ids = torch.cat([torch.full((rows, 1), 2), body, torch.full((rows, 1), 3)], dim=1)

    import deepspeed
    from transformers import BertConfig, BertForMaskedLM

    m = recipe["model"]
    model = BertForMaskedLM(
        BertConfig(
            vocab_size=tok.get_vocab_size(),
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=512,
            hidden_dropout_prob=m["dropout"],
            attention_probs_dropout_prob=m["dropout"],
            attn_implementation="sdpa",
        )
    )
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)

    micro, accum = config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]
    gen = torch.Generator().manual_seed(rank)
    done = []
    for _ in range(steps):
        for _ in range(accum):
            batch = ids[torch.randint(0, rows, (micro,), generator=gen)]
            chosen = torch.rand(batch.shape, generator=gen) < 0.15
            labels = torch.where(chosen, batch, torch.full_like(batch, -100))
            inputs = torch.where(chosen, torch.full_like(batch, 4), batch)
            loss = engine(input_ids=inputs, labels=labels).loss
            engine.backward(loss)
            engine.step()
        loss.item()  # what a plain script does to print the loss
        done.append(time.time())
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"step_end_times": done, "pid": os.getpid()}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
