"""`mplaunch parity RECIPE [key=value ...] --steps N`: does mixed precision train like fp32 (fp8 like bf16)?

The recipe runs twice for N steps, each as a real launch (torchrun workers) into
its own fresh run directory, from the same seed and therefore the same weights,
data order and masking:

    OUT/fp32    precision.dtype=fp32 precision.allow_tf32=false: the reference is true fp32
    OUT/bf16    instead, for fp8: precision.dtype=bf16, the precision fp8 claims to match (everything
                but the converted layers' matrix products computes in bf16 in both)
    OUT/mixed   the recipe's own dtype (bf16, fp16 or fp8; `auto` resolved on this machine)

Every step's loss is logged (logging.every_steps=1) and compared by launcher.analysis.compare
(per-step and final differences, speed, the per-layer attribution at step 1). Either run's optimizer
audit event (launcher.worker.audit: step counters, Adam's first update) fails the check whatever the
losses: an optimizer one step ahead moved the losses by only 0.05-0.2 %, well inside the tolerance. Measured on
the tiny BERT, the attribution gives healthy bf16 0.2-2.3 % per layer (DeepSpeed ZeRO-2);
fp16 at a static scale of 2^-16, 100 % in every encoder layer with a norm ratio of 0 (flushed).

Default tolerance, 2 %, from the shipped tiny BERT (recipes/bert_tiny.yaml, 2 CPU
ranks) with healthy mixed precision, final difference (per-step median, max):

    DeepSpeed bf16, seed 1234, 20 / 30 / 50 steps   0.03 / 0.32 / 0.31 %  (0.24-0.27 %, 0.99-1.06 %)
    DeepSpeed bf16, train.seed=7, 30 steps          0.17 %  (0.35 %, 1.37 %)
    accelerate fp16, dynamic loss scale, 30 steps   0.00 %  (fp32 weights under autocast; fp16 has 3 more
                                                              mantissa bits than bf16)

and with fp16 gradients underflowing (accelerate, loss scale pinned at 2^-16,
global batch 16, 20 steps): 3.90 % (1.56 %, 4.09 %). Pinned at 1 (30 steps) or
2^-8 (20 steps) it still gave 0.00 % and 0.04 %: this small model's gradients are large. 2 % is six times
the worst healthy run and half the broken one; per-step differences reach
1.4 % in healthy runs (bf16 rounds the logged loss itself to 1/32 near 6), which
is why the verdict uses the final mean. Bigger models and longer runs drift
further apart by chance: pass --tolerance for them. Skipped fp16 steps log no
loss; they are left out of the comparison and counted.

Fine-tunes of a model.hf directory (2 CPU ranks, recipes/models/tiny-* from
make_tiny.py, precision.dtype=bf16), final difference (per-step median, max):

    LoRA, llama_sft_tiny (rank 8 on q/k/v/o_proj, activation checkpointing)
      DeepSpeed ZeRO-2, 10 / 20 / 30 steps          0.001 / 0.001 / 0.001 %  (0.002 %, 0.006-0.007 %)
      DeepSpeed, train.seed=7, 20 steps             0.001 %  (0.003 %, 0.007 %)
      accelerate, 20 steps                          0.000 %  (0.001 %, 0.004 %)
    full fine-tune, llama_sft_tiny model.lora.rank=0
      DeepSpeed, 10 / 20 steps                      0.05 / 0.04 %  (0.03 %, 0.05-0.08 %)
    full fine-tune, bert_finetune_tiny (sequence classification, 4 labels)
      accelerate, 20 / 40 steps                     0.002 / 0.002 %  (0.002-0.003 %, 0.007-0.013 %)
      accelerate, train.seed=7, 40 steps            0.13 %  (0.02 %, 0.14 %)
      DeepSpeed, 10 / 40 steps                      0.02 / 0.002 %  (0.03 %, 0.08-0.10 %)
      accelerate fp16, dynamic loss scale, 40 steps 0.005 %

and with fp16 gradients underflowing (accelerate, loss scale pinned at 2^-16):
LoRA 4.49 % at 10 steps and 6.12 % at 20, the full Llama fine-tune 36.2 % at 20,
the BERT classifier 7.62 % at 40 (fewer steps leave it near chance, ln 4, where
every run agrees). So 2 % stands for these too: healthy fine-tunes stay at least
15 times below it, broken ones at least twice above. The LoRA runs agree most
closely because the tiny Llama is random and stays near uniform (loss near
ln 858 = 6.75), so rounding moves its small logits little; a trained base model
will differ more.

fp8 against bf16 (FP8_TOLERANCE, 1 %, when --tolerance is not given): emulated fp8 on 2 CPU ranks,
tensorwise, the recipes' own backends, 20 steps, final difference (per-step median, max):

    gpt2_tiny, DeepSpeed ZeRO-1     0.03 % twice  (0.02 %, 0.05 %)
    bert_tiny, DeepSpeed ZeRO-2     0.00 % twice  (0.02 %, 0.04 %)
    tests/fp8_outlier_model.py, precision.fp8.keep=[mid],
      accelerate FSDP2              0.004 %  (0.005 %, 0.016 %)

fp8 differs from bf16 only in the converted layers' matrix products, and dynamic scaling keeps their
error near e4m3's 2^-4 relative step, averaged over each product. With a layer fed one outlier 1e6
times its other inputs (tests/fp8_outlier_model.py, a bigram LM on gpt2_tiny's text, accelerate, 20
steps), 97 % of its input flushed to zero: 1.83-1.96 % (0.85-1.35 %, 1.90-2.02 %), and the run
records the fp8_range event, which fails parity by itself (launcher.analysis.compare) as it does for
any fp8 run whose x-ray names a layer; kept in bf16 (precision.fp8.keep=[mid]) it passes. 1 % is 30
times the worst healthy fp8 run and half the broken one.

The reference run trains a WordPiece tokenizer for a text recipe and the mixed run
reuses it (data.tokenizer): training one twice does not give identical ids. A
tokenizer the recipe brings (data.tokenizer, model.hf's own) is used as it is.

Light side: the workers import torch; this module does not.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from launcher.analysis import figure, plots
from launcher.analysis.compare import Comparison, attribution, compare
from launcher.errors import UserError
from launcher.plan.hardware import Hardware
from launcher.plan.resolve import Plan, prepare_vocab, resolve
from launcher.plan.vocab import TOKENIZER_FILE
from launcher.recipe import schema as recipe_mod
from launcher.recipe.rules import logging_dir
from launcher.run import launch
from launcher.run.preflight import print_warnings
from launcher.rundir.layout import RunDir
from launcher.rundir.metrics_log import Metrics, read_metrics

DEFAULT_TOLERANCE = 0.02
FP8_TOLERANCE = 0.01  # fp8 against bf16 (see above)
REPORT_FILE = "parity.json"
PLOT_FILE = "loss.png"
EXIT_PASS, EXIT_FAIL = 0, 1
TOP_LAYERS = 5  # layers printed by the per-layer attribution (parity.json has them all)


# ---------------------------------------------------------------- the two runs


@dataclass(frozen=True)
class Pair:
    """The two plans of a parity check, the directory that holds them, and how the mixed run was loaded."""

    out: Path
    reference: Plan  # fp32; bf16 for an fp8 run
    mixed: Plan
    overrides: tuple[str, ...]  # the user's, for both runs
    mixed_values: Mapping[str, Any]  # the parity settings of the mixed run


def plan_pair(
    recipe_path: Path, overrides: Sequence[str], steps: int, out: str | None, hardware: Hardware
) -> Pair:
    """Resolve the reference (fp32; bf16 for fp8) and mixed plans; the parity settings override the
    recipe's and the user's.

    Raises:
        UserError: the recipe or overrides are invalid, or the recipe's precision is fp32.
    """
    base = recipe_mod.load(recipe_path, overrides)
    prepare_vocab(base)  # both runs train on the tokenizer's exact vocabulary
    out_dir = (Path(out) if out else logging_dir(base)[0] / f"parity-{base.name}").resolve()
    common: dict[str, Any] = {
        "train.max_steps": steps,
        "logging.every_steps": 1,
        "logging.dir": str(out_dir),
        # Fresh runs: no resume, and only the final checkpoint, in each run's own directory.
        "checkpoint.resume": "never",
        "checkpoint.every_steps": 0,
        "checkpoint.dir": None,
        # Step 1 is x-rayed whenever the x-ray is on: its gradient sketches give the per-layer attribution.
        "logging.precision_every": base.logging.precision_every or steps + 1,
    }
    if base.train.eval_every > steps:
        common["train.eval_every"] = 0
    mixed_values = {**common, "name": "mixed"}
    mixed = resolve(recipe_mod.load(recipe_path, overrides, mixed_values), hardware)
    if mixed.precision.dtype == "fp32":
        raise UserError(
            f"{recipe_path}: precision resolves to fp32 ({mixed.precision.reason}); "
            "there is no mixed precision to compare with fp32",
            hint="pass precision.dtype=bf16 or precision.dtype=fp16",
        )
    # TF32 is a reduced-precision matmul too: the reference must be plain fp32 (bf16 for fp8).
    dtype = reference_dtype(mixed.precision.dtype)
    values = {**common, "name": dtype, "precision.dtype": dtype, "precision.allow_tf32": False}
    reference = resolve(recipe_mod.load(recipe_path, overrides, values), hardware)
    return Pair(out_dir, reference, mixed, tuple(overrides), mixed_values)


def reference_dtype(dtype: str) -> str:
    """What a mixed dtype is compared with: fp8 with bf16 (its own non-fp8 precision), the rest with fp32."""
    return "bf16" if dtype == "fp8" else "fp32"


def pin_tokenizer(pair: Pair, recipe_path: Path, hardware: Hardware) -> Pair:
    """Give the mixed run the tokenizer the reference run trained, so both see exactly the same token ids.

    Only a trained tokenizer is pinned: a run given one (data.tokenizer, or model.hf's own) already
    tokenizes with the same files in both runs, and its plan must keep naming them.
    """
    tokenizer = RunDir.from_plan(pair.reference).tokenizer
    if (
        pair.mixed.recipe.data.kind == "synthetic"
        or pair.mixed.tokenizer_dir is not None
        or not (tokenizer / TOKENIZER_FILE).is_file()
    ):
        return pair
    values = {**pair.mixed_values, "data.tokenizer": str(tokenizer)}
    mixed = resolve(recipe_mod.load(recipe_path, pair.overrides, values), hardware)
    return Pair(pair.out, pair.reference, mixed, pair.overrides, values)


def fresh(run_dir: Path) -> None:
    """Remove an earlier parity run in `run_dir`; refuse to delete anything that is not a run directory."""
    if not run_dir.exists():
        return
    if run_dir.is_dir() and (not any(run_dir.iterdir()) or RunDir.of(run_dir).is_run_dir()):
        shutil.rmtree(run_dir)
        return
    raise UserError(
        f"{run_dir}: exists and is not a run directory; nothing was deleted", hint="use --out DIR"
    )


def _run(plan: Plan, label: str) -> int:
    print(f"parity: {label} run -> {plan.run_dir}", flush=True)
    return launch.run(plan)


def _failure(plan: Plan, code: int) -> str:
    first = RunDir.from_plan(plan).first_rank_error()
    message = first.message if first is not None else ""
    return f"the {plan.precision.dtype} run failed (exit {code})" + (f": {message}" if message else "")


def default_tolerance(dtype: str) -> float:
    """The measured tolerance of a mixed dtype against its reference (see the module docstring)."""
    return FP8_TOLERANCE if dtype == "fp8" else DEFAULT_TOLERANCE


def check(path: Path, overrides: Sequence[str], steps: int, tolerance: float | None, out: Path | None) -> int:
    """`mplaunch parity`: run both, compare, plot, write parity.json.

    Args:
        path: the recipe file.
        overrides: the user's dotted overrides, for both runs.
        steps: optimizer steps of each run (>= 1).
        tolerance: the largest final relative loss difference that passes (>= 0); None: the
            dtype's default (`default_tolerance`).
        out: where the two runs go; default LOGGING_DIR/parity-NAME.

    Returns:
        0 on PASS, 1 on FAIL (or a failed run), 128+N when signal N interrupted a run.

    Raises:
        UserError: bad recipe; nothing is started.
    """
    figure.require_matplotlib("parity")  # before two trainings, not after them
    hardware = Hardware.probe()
    pair = plan_pair(path, overrides, steps, str(out) if out else None, hardware)
    print_warnings(pair.mixed.warnings)
    if tolerance is None:
        tolerance = default_tolerance(pair.mixed.precision.dtype)
    for plan in (pair.reference, pair.mixed):
        fresh(Path(plan.run_dir))
    reference = pair.reference.precision.dtype
    code = _run(pair.reference, f"{reference} reference (1/2)")
    if code >= 128:
        return code
    if code != 0:
        print(f"parity: {_failure(pair.reference, code)}; nothing to compare", file=sys.stderr)
        return EXIT_FAIL
    pair = pin_tokenizer(pair, path, hardware)
    code = _run(pair.mixed, f"{pair.mixed.precision.dtype} (2/2)")
    if code >= 128:
        return code
    result = compare(
        read_metrics(pair.reference.run_dir),
        _metrics_or_empty(pair.mixed.run_dir),
        pair.mixed.precision.dtype,
        steps,
        tolerance,
        reference,
    )
    if code != 0:
        result = Comparison(**{**asdict(result), "problems": (_failure(pair.mixed, code), *result.problems)})
    return report(pair, result)


def _metrics_or_empty(run_dir: str) -> Metrics:
    try:
        return read_metrics(run_dir)
    except UserError:  # the mixed run failed before its first record
        return Metrics((), (), (), ())


def report(pair: Pair, result: Comparison) -> int:
    """Plot both loss curves, write parity.json, print the table; return the exit code."""
    dtype, plan, ref = result.dtype, pair.mixed, result.reference
    context = f"{plan.recipe.backend}, {plan.device}, {result.steps} steps"
    curves = {ref: read_metrics(pair.reference.run_dir), dtype: _metrics_or_empty(plan.run_dir)}
    plot = plots.plot_loss(
        curves, pair.out / PLOT_FILE, title=f"Parity: {dtype} vs {ref} loss", context=context
    )
    body = {
        "verdict": "pass" if result.passed else "fail",
        **asdict(result),
        "speed_ratio": result.speed_ratio,
        "backend": plan.recipe.backend,
        "device": plan.device,
        "runs": {ref: pair.reference.run_dir, "mixed": plan.run_dir},
        "plot": str(plot),
    }
    layers, why = attribution(curves[ref], curves[dtype])
    body["layers"] = [asdict(d) for d in layers]
    body["layers_note"] = why
    (pair.out / REPORT_FILE).write_text(json.dumps(body, indent=2) + "\n")
    print(f"\nparity: {plan.recipe.source} ({context})")
    for line in result.lines():
        print(f"  {line}")
    print(
        f"  layers               {why}"
        if why
        else f"  gradients at step 1, the layers that differ most from {ref} (|g - g_ref| / |g_ref|, norm ratio):"
    )
    for d in layers[:TOP_LAYERS]:
        ratio = "n/a" if d.norm_ratio is None else f"{d.norm_ratio:.2f}"
        print(f"    {d.rel_diff:8.2%}  x{ratio:<5}  {d.layer}")
    print(f"  plot {plot}, numbers {pair.out / REPORT_FILE}")
    return EXIT_PASS if result.passed else EXIT_FAIL
