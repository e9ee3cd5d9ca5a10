"""The hand-written baseline for bench/overhead.py: the training mplaunch runs, written out plainly.

Started by torchrun exactly as mplaunch starts its workers. It reads the plan.json of the
mplaunch run it is compared with and trains the same model (a BERT masked LM of the plan's
shape) on the same kind of data (synthetic ids, 15 % masked), with the same optimizer,
learning-rate schedule, clipping and precision, through the same backend:

* deepspeed: `deepspeed.initialize` with the DeepSpeed config dict mplaunch generated;
* accelerate: an Accelerator (DDP), AdamW, torch.autocast in the plan's dtype, as mplaunch's
  Accelerate backend does.

The loss is the model's own (`model(..., labels=...).loss`), which mplaunch computes with
`train.loss=model`. Rank 0 writes a JSON file with the wall-clock time each step ended.

    torchrun --standalone --nproc-per-node=N bench/plain_train.py PLAN_JSON STEPS OUT_JSON

On the plan's device: CPU ranks over gloo, or one GPU per rank over NCCL.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import torch
import torch.distributed as dist

SPECIALS = 5  # ids below this are special tokens in mplaunch's synthetic data; 4 is [MASK]


def main() -> None:
    plan_path, steps, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    with open(plan_path) as f:
        saved = json.load(f)
    recipe, plan = saved["recipe"], saved["plan"]
    on_gpu = plan["device"] == "cuda"
    dist.init_process_group(plan["dist_backend"])  # gloo on CPU, nccl on GPUs
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    torch.manual_seed(recipe["train"]["seed"])

    from transformers import BertConfig, BertForMaskedLM

    shape, dropout = plan["shape"], recipe["model"]["dropout"]
    model: torch.nn.Module = BertForMaskedLM(
        BertConfig(
            vocab_size=plan["vocab_size"],
            hidden_size=shape["hidden_size"],
            num_hidden_layers=shape["num_layers"],
            num_attention_heads=shape["num_heads"],
            intermediate_size=shape["intermediate_size"],
            max_position_embeddings=shape["max_position_embeddings"],
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            attn_implementation="sdpa",
        )
    )
    model.to(device)
    batch = plan["batch"]
    micro, accum, seq = batch["micro_batch_size"], batch["grad_accum"], recipe["data"]["seq_len"]
    plan["warmup_steps"] = recipe["scheduler"]["warmup_steps"]
    step = _deepspeed(model, plan) if recipe["backend"] == "deepspeed" else _accelerate(model, plan)

    gen = torch.Generator().manual_seed(rank)
    every = recipe["logging"]["every_steps"]
    done: list[float] = []
    for _ in range(steps):
        micro_batches = []
        for _ in range(accum):
            ids = torch.randint(SPECIALS, plan["vocab_size"], (micro, seq), generator=gen)
            chosen = torch.rand(ids.shape, generator=gen) < 0.15
            inputs = torch.where(chosen, torch.full_like(ids, 4), ids)
            labels = torch.where(chosen, ids, torch.full_like(ids, -100))
            micro_batches.append({"input_ids": inputs.to(device), "labels": labels.to(device)})
        loss = step(micro_batches)
        if (len(done) + 1) % every == 0 or len(done) + 1 == steps:
            # What a plain script does to print the loss now and then, at the steps mplaunch logs
            # (and so times): on a GPU it waits for the queued work, as mplaunch's logging does.
            loss.item()
        done.append(time.time())
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"step_end_times": done, "pid": os.getpid(), "process_start": _process_start()}, f)
    dist.destroy_process_group()


def _process_start() -> float:
    """When this process started (Unix s), from /proc, as mplaunch's `ready` event counts it."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
    with open("/proc/stat") as f:
        boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the matrices only, as BERT is trained (and as mplaunch groups AdamW)."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]


def _schedule(plan: dict, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, plan["warmup_steps"])  # linear warm-up, then constant: a step costs the same
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))


def _deepspeed(model: torch.nn.Module, plan: dict):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=_groups(model, plan["backend_config"]["optimizer"]["params"]["weight_decay"]),
        config=plan["backend_config"],
        lr_scheduler=lambda opt: _schedule(plan, opt),
    )

    def step(micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        for b in micro_batches:
            loss = engine(**b).loss
            engine.backward(loss)
            engine.step()
        return loss

    return step


def _accelerate(model: torch.nn.Module, plan: dict):
    from accelerate import Accelerator

    settings = plan["backend_config"]
    opt = settings["optimizer"]
    acc = Accelerator(cpu=settings["accelerator"]["cpu"])
    optimizer = torch.optim.AdamW(
        _groups(model, opt["weight_decay"]), lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"]
    )
    model, optimizer = acc.prepare(model, optimizer)
    scheduler = _schedule(plan, optimizer)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings["autocast"])
    clip = settings["grad_clip"]

    def step(micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        for i, b in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last else acc.no_sync(model):
                with torch.autocast(plan["device"], dtype=dtype) if dtype else contextlib.nullcontext():
                    loss = model(**b).loss
                (loss.float() / len(micro_batches)).backward()
        acc.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


if __name__ == "__main__":
    main()
