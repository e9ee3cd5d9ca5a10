"""The reference side of tests/e2e/test_reference_trainer.py: Hugging Face `Trainer` on the rows an
mplaunch run of the same recipe trains on, in the same order, to the same ranks.

    torchrun --nproc_per_node 2 tests/reference_trainer.py SPEC.json OUT.json

SPEC.json holds the run's settings (see `main`); OUT.json gets, from rank 0:

    train         {step: loss}  token-weighted over all label tokens of the step (every rank, every
                  micro-batch): the loss Trainer minimises with average_tokens_across_devices
    train_batch   {step: loss}  the mean of the micro-batch means, for telling a normalisation gap apart
    lr            {step: lr}    the learning rate the step's update used
    eval          token-weighted loss over every held-out row after the last step
    trainer_eval  Trainer.evaluate()'s eval_loss (its mean of batch means)
    decay_mismatch  parameters Trainer decays where mplaunch does not, or the reverse (should be [])

The rows are rebuilt here from mplaunch's documented contract, not from its code (launcher.worker.data):
each text line is a document, tokenized without special tokens and followed by the separator, cut or
padded to seq_len (data.pack false; padding gets no label); a seeded split holds rows out; optimizer
step k of epoch e takes perm_e[k*G:(k+1)*G], and micro-batch j of rank r its slice (j*world + r)*micro.
Trainer is given that sequence with train_sampling_strategy "sequential": Accelerate hands batch b to
rank b % world, which is the same assignment.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import transformers

SEPARATORS = ("[SEP]", "<|endoftext|>", "</s>", "<eos>")
PAD_TOKENS = ("[PAD]", "<pad>")


def rows(model_dir: str, text: str, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """Every document as one row: input_ids, attention_mask and labels (-100 on padding)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    sep = next(i for i in map(tok.token_to_id, SEPARATORS) if i is not None)
    pad = next((i for i in map(tok.token_to_id, PAD_TOKENS) if i is not None), 0)
    lines = [line for line in Path(text).read_text().splitlines() if line.strip()]
    out = []
    for enc in tok.encode_batch(lines, add_special_tokens=False):
        kept = [*enc.ids, sep][:seq_len]
        n = len(kept)
        ids = torch.tensor(kept + [pad] * (seq_len - n))
        mask = (torch.arange(seq_len) < n).long()
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def schedule(num_rows: int, spec: dict[str, Any], world: int) -> tuple[list[int], list[int]]:
    """(training rows in the order Trainer's sequential sampler must give them, held-out rows)."""
    seed = spec["seed"]
    order = np.random.default_rng([seed, 7]).permutation(num_rows)
    n_eval = int(num_rows * spec["eval_fraction"])
    train, held = np.sort(order[n_eval:]), np.sort(order[:n_eval])
    per_step = spec["micro"] * spec["accum"] * world
    per_epoch = len(train) // per_step
    sequence: list[int] = []
    for step in range(spec["steps"]):
        epoch, k = divmod(step, per_epoch)
        shuffled = train[np.random.default_rng([seed, epoch]).permutation(len(train))]
        sequence += shuffled[k * per_step : (k + 1) * per_step].tolist()
    return sequence, held.tolist()


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the next-token cross-entropies in fp32, number of label tokens)."""
    shifted = labels[:, 1:]
    total = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        shifted.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return total, shifted.ne(-100).sum()


def build_model(spec: dict[str, Any]) -> torch.nn.Module:
    """The folder's weights (seeded as mplaunch seeds before building), with peft adapters if asked."""
    seed = spec["seed"]
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    model: torch.nn.Module = transformers.AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype=torch.float32, attn_implementation="sdpa"
    )
    lora = spec.get("lora")
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0,
            target_modules=lora["target_modules"], bias="none",
        )  # fmt: skip
        model = get_peft_model(model, config)
    return model


def decay_mismatch(trainer: Any, model: torch.nn.Module) -> list[str]:
    """Trainable parameters whose weight decay differs between Trainer and mplaunch (decay iff ndim >= 2)."""
    decayed = set(trainer.get_decay_parameter_names(model))
    return sorted(
        n for n, p in model.named_parameters() if p.requires_grad and (n in decayed) != (p.ndim >= 2)
    )


class StepLog(transformers.TrainerCallback):
    """Each step's lr (before the step) and losses (after it), from the micro-batches `seen` recorded."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # this rank's (loss sum, tokens) this step
        self.log: dict[str, dict[int, float]] = {"train": {}, "train_batch": {}, "lr": {}}

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.log["lr"][state.global_step + 1] = float(kwargs["lr_scheduler"].get_last_lr()[0])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sums = torch.stack([torch.stack([t, c.to(t.dtype), t / c]) for t, c in self.seen]).sum(0)
        sums = torch.cat([sums, torch.tensor([float(len(self.seen))])])
        dist.all_reduce(sums)  # every rank's micro-batches
        self.log["train"][state.global_step] = float(sums[0] / sums[1])
        self.log["train_batch"][state.global_step] = float(sums[2] / sums[3])
        self.seen.clear()


def arguments(spec: dict[str, Any], out_dir: Path) -> transformers.TrainingArguments:
    """The spec as TrainingArguments: 2 CPU ranks over gloo, the sampler sequential, nothing saved."""
    return transformers.TrainingArguments(
        output_dir=str(out_dir / "trainer"),
        per_device_train_batch_size=spec["micro"], per_device_eval_batch_size=spec["micro"],
        gradient_accumulation_steps=spec["accum"], max_steps=spec["steps"],
        learning_rate=spec["lr"], adam_beta1=spec["betas"][0], adam_beta2=spec["betas"][1],
        adam_epsilon=spec["eps"], weight_decay=spec["weight_decay"], optim="adamw_torch",
        lr_scheduler_type=spec["scheduler"], warmup_steps=spec["warmup_steps"], max_grad_norm=spec["grad_clip"],
        bf16=spec["dtype"] == "bf16", use_cpu=True, ddp_backend="gloo", seed=spec["seed"],
        train_sampling_strategy="sequential", average_tokens_across_devices=True,
        label_names=["labels"], report_to="none", save_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_drop_last=False,
    )  # fmt: skip


def main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    every = rows(spec["model"], spec["data"], spec["seq_len"])
    sequence, held = schedule(len(every), spec, world)
    model = build_model(spec)
    steps = StepLog()

    def loss_func(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        # Trainer passes the step's label tokens on every rank while training (and scales by the
        # world size, undoing DDP's mean); None in evaluation.
        total, count = token_loss(outputs.logits, labels)
        if torch.is_grad_enabled():
            steps.seen.append((total.detach(), count))
        return total / (num_items_in_batch if num_items_in_batch is not None else count)

    trainer = transformers.Trainer(
        model=model,
        args=arguments(spec, Path(out_path).parent),
        train_dataset=[every[i] for i in sequence],
        eval_dataset=[every[i] for i in held],
        data_collator=transformers.default_data_collator,
        compute_loss_func=loss_func,
        callbacks=[steps],
    )
    trainer.train()
    result = {
        **steps.log,
        "eval": held_out_loss(trainer, [every[i] for i in held], spec),
        "trainer_eval": trainer.evaluate()["eval_loss"],
        "decay_mismatch": decay_mismatch(trainer, model),
    }
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out_path).write_text(json.dumps(result, indent=1))
    return 0


@torch.no_grad()
def held_out_loss(trainer: Any, held: list[dict[str, torch.Tensor]], spec: dict[str, Any]) -> float:
    """The trained model's loss over every held-out label token (each rank computes all of it)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.eval()
    total, count = torch.zeros(()), torch.zeros((), dtype=torch.long)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["dtype"] == "bf16")
    for start in range(0, len(held), spec["micro"]):
        batch = stack(held[start : start + spec["micro"]])
        with autocast:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        s, c = token_loss(logits, batch["labels"])
        total, count = total + s, count + c
    return float(total / count)


def stack(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A batch of these rows."""
    return {k: torch.stack([item[k] for item in items]) for k in items[0]}


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
