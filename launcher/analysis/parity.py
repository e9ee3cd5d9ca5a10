"""`mplaunch parity RECIPE [key=value ...] --steps N`: does mixed precision train like fp32?

The recipe runs twice for N steps, each as a real launch (torchrun workers) into
its own fresh run directory, from the same seed and therefore the same weights,
data order and masking:

    OUT/fp32    precision.dtype=fp32 precision.allow_tf32=false: the reference is true fp32
    OUT/mixed   the recipe's own dtype (bf16 or fp16; `auto` resolved on this machine)

Every step's loss is logged (logging.every_steps=1) and compared:

* per step, |mixed - fp32| / |fp32|: its median and maximum;
* the final difference: the relative difference of the two mean losses over the
  last 10 % of the steps (at least one); per-step differences are dominated by
  rounding noise, which partly cancels in the mean, while a real problem (such
  as fp16 gradients underflowing) makes the mixed run train slower, a gap that
  grows with the steps;
* the speed ratio: median samples/s of the mixed run over that of the fp32 run.

The verdict is PASS when both runs complete and the final difference is at most
the tolerance. Beside it, `attribution` says where the runs differ: the gradient
of step 1 (the same weights and batch in both) layer by layer, from the precision
x-ray's sketches (launcher.worker.xray.sketch). Measured on the tiny BERT: healthy bf16
0.2-2.3 % per layer (DeepSpeed ZeRO-2); fp16 at a static scale of 2^-16, 100 % in
every encoder layer with a norm ratio of 0 (flushed).

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

The fp32 run trains a WordPiece tokenizer for a text recipe and the mixed run
reuses it (data.tokenizer): training one twice does not give identical ids. A
tokenizer the recipe brings (data.tokenizer, model.hf's own) is used as it is.

Light side: the workers import torch; this module does not.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from launcher.analysis import plots
from launcher.analysis.report import Metrics, read_metrics
from launcher.errors import UserError
from launcher.plan.hardware import Hardware
from launcher.plan.resolve import Plan, prepare_vocab, resolve
from launcher.recipe import schema as recipe_mod
from launcher.run import launch
from launcher.rundir.layout import RunDir

DEFAULT_TOLERANCE = 0.02
FINAL_FRACTION = 0.10
REPORT_FILE = "parity.json"
PLOT_FILE = "loss.png"
EXIT_PASS, EXIT_FAIL = 0, 1
TOP_LAYERS = 5  # layers printed by the per-layer attribution (parity.json has them all)


@dataclass(frozen=True)
class Comparison:
    """The numbers of one parity check; differences are fractions (0.01 is 1 %)."""

    dtype: str
    steps: int
    compared_steps: int
    skipped_steps: int
    median_rel_diff: float | None
    max_rel_diff: float | None
    max_rel_diff_step: int | None
    final_rel_diff: float | None
    final_window: int
    final_loss_fp32: float | None
    final_loss_mixed: float | None
    samples_per_s_fp32: float | None
    samples_per_s_mixed: float | None
    tolerance: float
    problems: tuple[str, ...] = ()

    @property
    def speed_ratio(self) -> float | None:
        if not self.samples_per_s_fp32 or self.samples_per_s_mixed is None:
            return None
        return self.samples_per_s_mixed / self.samples_per_s_fp32

    @property
    def passed(self) -> bool:
        return not self.problems and self.final_rel_diff is not None and self.final_rel_diff <= self.tolerance

    def lines(self) -> list[str]:
        def pct(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.2%}"

        def rate(x: float | None) -> str:
            return "n/a" if x is None else f"{x:,.1f}"

        ratio = self.speed_ratio
        out = [
            f"steps compared       {self.compared_steps} of {self.steps}"
            + (f" ({self.skipped_steps} skipped fp16 steps left out)" if self.skipped_steps else ""),
            f"per-step difference  median {pct(self.median_rel_diff)}, max {pct(self.max_rel_diff)}"
            + (f" at step {self.max_rel_diff_step}" if self.max_rel_diff_step is not None else ""),
            f"final difference     {pct(self.final_rel_diff)} "
            f"(mean loss over the last {self.final_window} steps: "
            f"fp32 {_num(self.final_loss_fp32)}, {self.dtype} {_num(self.final_loss_mixed)}); "
            f"tolerance {pct(self.tolerance)}",
            f"speed                {self.dtype} {rate(self.samples_per_s_mixed)} samples/s, "
            f"fp32 {rate(self.samples_per_s_fp32)} samples/s: "
            + ("n/a" if ratio is None else f"{ratio:.2f}x"),
        ]
        out += [f"problem              {p}" for p in self.problems]
        verdict = "PASS" if self.passed else "FAIL"
        why = (
            ""
            if self.passed
            else ": " + (self.problems[0] if self.problems else "final difference over tolerance")
        )
        return [*out, f"{verdict}: {self.dtype} vs fp32{why}"]


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def compare(fp32: Metrics, mixed: Metrics, dtype: str, steps: int, tolerance: float) -> Comparison:
    """Compare the per-step losses of the fp32 and mixed runs (pure; see the module docstring)."""
    ref = _losses(fp32)
    got = _losses(mixed)
    logged = {r["step"] for r in mixed.train}
    skipped = sum(1 for s in logged if s in ref and s not in got)
    common = sorted(s for s in ref if s in got)
    problems = []
    if max(logged, default=0) < steps:
        problems.append(f"the {dtype} run logged {max(logged, default=0)} of {steps} steps")
    if max(ref, default=0) < steps:
        problems.append(f"the fp32 run logged {max(ref, default=0)} of {steps} steps")
    diffs = [abs(got[s] - ref[s]) / abs(ref[s]) for s in common if ref[s] != 0]
    window = common[-max(1, math.ceil(FINAL_FRACTION * len(common))) :] if common else []
    final_ref = statistics.fmean(ref[s] for s in window) if window else None
    final_got = statistics.fmean(got[s] for s in window) if window else None
    final = abs(final_got - final_ref) / abs(final_ref) if final_ref and final_got is not None else None
    if final is None:
        problems.append("no step has a loss in both runs")
    worst = max(range(len(diffs)), key=diffs.__getitem__) if diffs else None
    return Comparison(
        dtype=dtype,
        steps=steps,
        compared_steps=len(common),
        skipped_steps=skipped,
        median_rel_diff=statistics.median(diffs) if diffs else None,
        max_rel_diff=diffs[worst] if worst is not None else None,
        max_rel_diff_step=[s for s in common if ref[s] != 0][worst] if worst is not None else None,
        final_rel_diff=final,
        final_window=len(window),
        final_loss_fp32=final_ref,
        final_loss_mixed=final_got,
        samples_per_s_fp32=_median(fp32, "samples_per_s"),
        samples_per_s_mixed=_median(mixed, "samples_per_s"),
        tolerance=tolerance,
        problems=tuple(problems),
    )


@dataclass(frozen=True)
class LayerDiff:
    """How one layer's gradient at step 1 in the mixed run differs from the fp32 run's.

    Attributes:
        layer: the module (launcher.worker.xray.layer_of).
        rel_diff: |g_mixed - g_fp32| / |g_fp32|, estimated from the x-ray's sketches (about +-25 %).
        norm_ratio: |g_mixed| / |g_fp32| (exact): well below 1 where fp16 flushed gradients to zero.
    """

    layer: str
    rel_diff: float
    norm_ratio: float | None


def attribution(fp32: Metrics, mixed: Metrics) -> tuple[list[LayerDiff], str | None]:
    """Layers by how much their gradients differ between the runs at step 1, largest first.

    Step 1 is the one step both runs take from the same weights on the same batch; the x-ray
    sketches every layer's gradient there. Returns the layers and, when there are none, why.
    """
    first = [next((r for r in m.precision if r["step"] == 1), None) for m in (fp32, mixed)]
    if first[0] is None or first[1] is None:
        return [], "no precision x-ray of step 1 in both runs (logging.precision_every was 0?)"
    if first[1].get("skipped"):
        return [], "the mixed run's step 1 overflowed in fp16 and was skipped"
    out = []
    for name, ref in first[0]["layers"].items():
        got = first[1]["layers"].get(name) or {}
        a, b = ref.get("sketch"), got.get("sketch")
        size = math.dist(a, [0.0] * len(a)) if a else 0.0
        if not a or not b or size == 0:
            continue
        norms = ref.get("grad_norm"), got.get("grad_norm")
        ratio = norms[1] / norms[0] if norms[0] and norms[1] is not None else None
        out.append(LayerDiff(name, math.dist(a, b) / size, ratio))
    if not out:
        return (
            [],
            "the x-ray of step 1 has no gradient sketches (FSDP does not expose where its shards start)",
        )
    return sorted(out, key=lambda d: -d.rel_diff), None


def _losses(metrics: Metrics) -> dict[int, float]:
    # A skipped fp16 step logs NaN (its overflowed loss says nothing about training).
    steps, values = metrics.series("loss")
    return {s: v for s, v in zip(steps, values, strict=True) if math.isfinite(v)}


def _median(metrics: Metrics, key: str) -> float | None:
    _, values = metrics.series(key)
    values = [v for v in values if math.isfinite(v)]
    return statistics.median(values) if values else None


# ---------------------------------------------------------------- the two runs


@dataclass(frozen=True)
class Pair:
    """The two plans of a parity check, the directory that holds them, and how the mixed run was loaded."""

    out: Path
    fp32: Plan
    mixed: Plan
    overrides: tuple[str, ...]  # the user's, for both runs
    mixed_values: Mapping[str, Any]  # the parity settings of the mixed run


def plan_pair(
    recipe_path: Path, overrides: Sequence[str], steps: int, out: str | None, hardware: Hardware
) -> Pair:
    """Resolve the fp32 and mixed plans; the parity settings override the recipe's and the user's.

    Raises:
        UserError: the recipe or overrides are invalid, or the recipe's precision is fp32.
    """
    base = recipe_mod.load(recipe_path, overrides)
    prepare_vocab(base)  # both runs train on the tokenizer's exact vocabulary
    out_dir = (Path(out) if out else Path(base.logging.dir) / f"parity-{base.name}").resolve()
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
    # TF32 is a reduced-precision matmul too: the reference must be plain fp32.
    reference = {**common, "name": "fp32", "precision.dtype": "fp32", "precision.allow_tf32": False}
    fp32 = resolve(recipe_mod.load(recipe_path, overrides, reference), hardware)
    return Pair(out_dir, fp32, mixed, tuple(overrides), mixed_values)


def pin_tokenizer(pair: Pair, recipe_path: Path, hardware: Hardware) -> Pair:
    """Give the mixed run the tokenizer the fp32 run trained, so both see exactly the same token ids.

    Only a trained tokenizer is pinned: a run given one (data.tokenizer, or model.hf's own) already
    tokenizes with the same files in both runs, and its plan must keep naming them.
    """
    tokenizer = RunDir.from_plan(pair.fp32).tokenizer
    if (
        pair.mixed.recipe.data.kind == "synthetic"
        or pair.mixed.tokenizer_dir is not None
        or not (tokenizer / "tokenizer.json").is_file()
    ):
        return pair
    values = {**pair.mixed_values, "data.tokenizer": str(tokenizer)}
    mixed = resolve(recipe_mod.load(recipe_path, pair.overrides, values), hardware)
    return Pair(pair.out, pair.fp32, mixed, pair.overrides, values)


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


def check(path: Path, overrides: Sequence[str], steps: int, tolerance: float, out: Path | None) -> int:
    """`mplaunch parity`: run both, compare, plot, write parity.json.

    Args:
        path: the recipe file.
        overrides: the user's dotted overrides, for both runs.
        steps: optimizer steps of each run (>= 1).
        tolerance: the largest final relative loss difference that passes (>= 0).
        out: where the two runs go; default LOGGING_DIR/parity-NAME.

    Returns:
        0 on PASS, 1 on FAIL (or a failed run), 128+N when signal N interrupted a run.

    Raises:
        UserError: bad recipe; nothing is started.
    """
    plots.require_matplotlib("parity")  # before two trainings, not after them
    hardware = Hardware.probe()
    pair = plan_pair(path, overrides, steps, str(out) if out else None, hardware)
    for warning in pair.mixed.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for plan in (pair.fp32, pair.mixed):
        fresh(Path(plan.run_dir))
    code = _run(pair.fp32, "fp32 reference (1/2)")
    if code >= 128:
        return code
    if code != 0:
        print(f"parity: {_failure(pair.fp32, code)}; nothing to compare", file=sys.stderr)
        return EXIT_FAIL
    pair = pin_tokenizer(pair, path, hardware)
    code = _run(pair.mixed, f"{pair.mixed.precision.dtype} (2/2)")
    if code >= 128:
        return code
    result = compare(
        read_metrics(pair.fp32.run_dir),
        _metrics_or_empty(pair.mixed.run_dir),
        pair.mixed.precision.dtype,
        steps,
        tolerance,
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
    dtype, plan = result.dtype, pair.mixed
    context = f"{plan.recipe.backend}, {plan.device}, {result.steps} steps"
    curves = {"fp32": read_metrics(pair.fp32.run_dir), dtype: _metrics_or_empty(plan.run_dir)}
    plot = plots.plot_loss(
        curves, pair.out / PLOT_FILE, title=f"Parity: {dtype} vs fp32 loss", context=context
    )
    body = {
        "verdict": "pass" if result.passed else "fail",
        **asdict(result),
        "speed_ratio": result.speed_ratio,
        "backend": plan.recipe.backend,
        "device": plan.device,
        "runs": {"fp32": pair.fp32.run_dir, "mixed": plan.run_dir},
        "plot": str(plot),
    }
    layers, why = attribution(curves["fp32"], curves[dtype])
    body["layers"] = [asdict(d) for d in layers]
    body["layers_note"] = why
    (pair.out / REPORT_FILE).write_text(json.dumps(body, indent=2) + "\n")
    print(f"\nparity: {plan.recipe.source} ({context})")
    for line in result.lines():
        print(f"  {line}")
    print(
        f"  layers               {why}"
        if why
        else "  gradients at step 1, the layers that differ most from fp32 (|g - g32| / |g32|, norm ratio):"
    )
    for d in layers[:TOP_LAYERS]:
        ratio = "n/a" if d.norm_ratio is None else f"{d.norm_ratio:.2f}"
        print(f"    {d.rel_diff:8.2%}  x{ratio:<5}  {d.layer}")
    print(f"  plot {plot}, numbers {pair.out / REPORT_FILE}")
    return EXIT_PASS if result.passed else EXIT_FAIL
