"""What verified checkpoints cost: a save with and without the checksum pass, and the parameter check.

Builds the model of the shipped recipes/bert.yaml (BERT-base, about 110M
parameters) on the CPU, gives it AdamW state with one optimizer step, and
saves model and optimizer state with torch.save into a fresh directory, each
file fsynced, as a checkpoint's files are. Side by side, alternating, several
times:

- plain: the save alone;
- checksummed: the save, then the checksum pass of launcher.rundir.checkpoint (list the
  files, hash them, merge into the manifest's file list) on one rank; the
  ranks of a real run hash their shares in parallel, so this is the cost of a
  one-rank job and an upper bound for more;
- finite check: launcher.worker.checkpointer.parameter_square_sum over the parameters;
- per step: the Meter's device-side watch for a non-finite loss or gradient norm
  (launcher.worker.metrics.Meter._watch, run every optimizer step), against one BERT-base
  training step (forward, backward, AdamW) of 8 sequences of 128 tokens.

Prints medians per checkpoint, per GB of checkpoint and as a ratio to the plain
save, and the per-step watch as a ratio to the training step. On a shared disk the
plain save's own time swings more than the checksum pass costs; the pass measured
alone is the figure to quote. Not a test: timings depend on the machine (and its page cache: the
checksum pass reads files just written, as it does in a run).

    python bench/checkpoint_cost.py [--repeats 5] [--dir /tmp] [--out bench/results/checkpoint-cost-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher.recipe import schema as recipe_mod  # noqa: E402
from launcher.recipe import shapes  # noqa: E402
from launcher.rundir import checkpoint  # noqa: E402
from launcher.worker import models  # noqa: E402
from launcher.worker.checkpointer import parameter_square_sum  # noqa: E402
from launcher.worker.metrics import Meter  # noqa: E402


def bert_base() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The recipes/bert.yaml model with AdamW moments (one step on small random gradients)."""
    recipe = recipe_mod.load(ROOT / "recipes" / "bert.yaml")
    torch.manual_seed(0)
    model = models.build(recipe.model, shapes.shape_of(recipe.model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def plain_save(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    directory.mkdir(parents=True)
    torch.save(model.state_dict(), directory / "model.pt")
    torch.save(optimizer.state_dict(), directory / "optim.pt")
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def checksum_pass(directory: Path) -> list[dict[str, object]]:
    """The pass every save now runs, for one rank holding all the files."""
    files = checkpoint.list_files(directory)
    checkpoint.write_checksums(directory, 0, checkpoint.share(files, 0, 1))
    return checkpoint.merge_checksums(directory, files)


def per_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, repeats: int) -> dict[str, float]:
    """Median seconds of one training step, and of the Meter's per-step finite watch after it."""
    vocab = shapes.shape_of(recipe_mod.load(ROOT / "recipes" / "bert.yaml").model).vocab_size
    batch = {"input_ids": torch.randint(0, vocab, (8, 128)), "labels": torch.randint(0, vocab, (8, 128))}
    steps, watches = [], []
    meter = SimpleNamespace(step=0, first_bad=None)  # the state _watch keeps
    for _ in range(repeats):
        started = time.perf_counter()
        loss = models.loss_of(model(**batch))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stepped = time.perf_counter()
        stats = SimpleNamespace(loss=loss.detach(), grad_norm=norm)
        for _ in range(100):  # far below timer resolution once; a hundred calls, then per call
            meter.step += 1
            Meter._watch(meter, stats)  # type: ignore[arg-type]
        watches.append((time.perf_counter() - stepped) / 100)
        steps.append(stepped - started)
    return {"step": statistics.median(steps), "watch": statistics.median(watches)}


def measure(repeats: int, where: Path) -> dict[str, object]:
    model, optimizer = bert_base()
    params = sum(p.numel() for p in model.parameters())
    backend = SimpleNamespace(model=model)
    plain, checked, hashing, finite = [], [], [], []
    size_bytes = 0
    for i in range(repeats):
        # Side by side, the order swapped every round: a save right after another waits on the
        # first one's write-back, which would otherwise always land on the same side.
        for label in ("plain", "checked") if i % 2 == 0 else ("checked", "plain"):
            target = where / f"{label}-{i}"
            os.sync()  # the last round's writes and deletions settle outside the timing
            started = time.perf_counter()
            plain_save(target, model, optimizer)
            saved = time.perf_counter()
            if label == "checked":
                checksum_pass(target)
                done = time.perf_counter()
                checked.append(done - started)
                hashing.append(done - saved)
            else:
                plain.append(saved - started)
                size_bytes = sum(p.stat().st_size for p in target.iterdir())
            shutil.rmtree(target)
        for _ in range(5):  # cheap: five samples per round
            started = time.perf_counter()
            parameter_square_sum(backend)  # type: ignore[arg-type]
            finite.append(time.perf_counter() - started)
    step = per_step(model, optimizer, repeats)
    gb = size_bytes / 1e9
    samples = {"plain": plain, "checked": checked, "hash": hashing, "finite": finite}
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "parameters": params,
        "checkpoint_bytes": size_bytes,
        "repeats": repeats,
        "median_s": med,
        "s_per_gb": {k: v / gb for k, v in med.items()},
        "per_step_s": step,
        "watch_ratio_to_step": step["watch"] / step["step"],
        "ratio_to_plain_save": {
            "checked_save": med["checked"] / med["plain"],
            "checksum_pass": med["hash"] / med["plain"],
            "finite_check": med["finite"] / med["plain"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        result = measure(args.repeats, Path(tmp))
    med, per_gb, ratio = result["median_s"], result["s_per_gb"], result["ratio_to_plain_save"]
    assert isinstance(med, dict)
    assert isinstance(per_gb, dict)
    assert isinstance(ratio, dict)
    print(
        f"BERT-base state: {result['parameters'] / 1e6:.1f}M parameters, "
        f"{int(result['checkpoint_bytes']) / 1e9:.2f} GB per checkpoint (model + AdamW), "
        f"median of {result['repeats']}"
    )
    print(f"{'':28}{'s/checkpoint':>14}{'s/GB':>10}{'x plain save':>14}")
    rows = (
        ("plain save", "plain", 1.0),
        ("save + checksums", "checked", ratio["checked_save"]),
        ("  checksum pass alone", "hash", ratio["checksum_pass"]),
        ("parameter finite check", "finite", ratio["finite_check"]),
    )
    for label, key, times in rows:
        print(f"{label:28}{med[key]:14.3f}{per_gb[key]:10.3f}{times:14.3f}")
    step = result["per_step_s"]
    assert isinstance(step, dict)
    print(
        f"per step: training step {step['step']:.3f} s, non-finite watch {step['watch'] * 1e6:.1f} us "
        f"({float(str(result['watch_ratio_to_step'])):.2e} x the step)"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
