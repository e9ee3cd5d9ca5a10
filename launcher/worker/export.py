"""`mplaunch export RUN_DIR [--step N] [--dtype D] [--lora merge|adapter] --out DIR`: a run's trained weights.

The checkpoint is verified first (every listed file's size and CRC-32, launcher.rundir.checkpoint),
then the backend that wrote it consolidates its fp32 master weights (`consolidate_fp32` of
launcher.worker.backends.deepspeed and .accelerate: each knows its own files, for every ZeRO stage).

A built-in transformer (bert-mlm, gpt2-lm) is rebuilt from the plan's shape by launcher.worker.models,
loaded strictly, cast to --dtype and written with save_pretrained (config.json,
model.safetensors) next to the tokenizer the run used, so `from_pretrained(DIR)` loads both.
tiny-mlp and model.target models have no Hugging Face config: only model.safetensors (the
state dict) is written, plus the tokenizer if the run had one.

Worker side (torch, DeepSpeed, transformers): `mplaunch export` runs this module in its own
process (`python -m launcher.worker.export REQUEST_JSON`), so the launcher stays light.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher.errors import UserError, report
from launcher.plan import hf_dir
from launcher.plan.resolve import Plan
from launcher.plan.vocab import END_OF_TEXT, SPECIALS, TOKENIZER_FILE, trained_dir
from launcher.rundir.layout import RunDir
from launcher.worker import backends, model_setup, models
from launcher.worker.checkpointer import first_line, pick
from launcher.worker.precision import DTYPES

HF_FAMILIES = {"bert-mlm": "AutoModelForMaskedLM", "gpt2-lm": "AutoModelForCausalLM"}
WEIGHTS_FILE = hf_dir.SAFETENSORS_FILE
# What each special token of a trained tokenizer (launcher.plan.vocab) is to transformers.
_TOKEN_ROLES = {
    **dict(zip(SPECIALS, ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), strict=True)),
    END_OF_TEXT: "eos_token",  # and bos_token and pad_token, as GPT-2 has it
}


@dataclass(frozen=True)
class Request:
    """What the user asked for (cli.cmd_export parses it; paths absolute)."""

    run_dir: str
    out: str
    step: int | None = None
    dtype: str = "fp32"
    force: bool = False
    lora: str = "merge"  # or "adapter": the LoRA adapters alone, a peft adapter directory


def main(argv: list[str] | None = None) -> int:
    """`python -m launcher.worker.export REQUEST_JSON`: export, or one line per error and exit 2."""
    args = sys.argv[1:] if argv is None else argv
    try:
        return export(Request(**json.loads(args[0])))
    except UserError as err:  # as cli.main reports it: the user sees one process
        return report(err)
    except KeyboardInterrupt:
        return 130


def export(request: Request) -> int:
    """Verify the checkpoint, consolidate its fp32 weights and write them to `request.out`.

    Raises:
        UserError: no such run or step, a checkpoint that fails verification or cannot be
            consolidated, or an --out that holds files (without --force).
    """
    run_path, out = Path(request.run_dir), Path(request.out)
    plan = _read_plan(run_path)
    run = RunDir.of(run_path, plan.recipe.checkpoint.dir)
    path, step = pick(run, request.step)
    _refuse_to_overwrite(out, request.force)
    base = _adapter_base(plan) if request.lora == "adapter" else None
    state = consolidate(plan, path)
    auto_class = _auto_class(plan)
    with _staging(out) as tmp:
        tokenizer, written_from = write_tokenizer(plan, run, tmp)
        if base is not None:
            what = _save_adapter(plan, state, DTYPES[request.dtype], tmp, base)
        elif auto_class is not None:
            what = _save_pretrained(plan, state, DTYPES[request.dtype], tmp, tokenizer)
        else:
            what = _save_state_dict(state, DTYPES[request.dtype], tmp)
        written = sorted(p.name for p in tmp.iterdir())
    source = f"{plan.recipe.backend} ZeRO stage {plan.recipe.zero.stage}, {plan.precision.dtype} training"
    print(f"exported step {step} of {run_path} ({source}) to {out}")
    print(f"  weights: {what}, {request.dtype}")
    print(f"  tokenizer: {written_from}")
    print(f"  files: {', '.join(written)}")
    if base is not None:
        print(f"  base model: {base}")
        base_class = f"transformers.{auto_class}" if auto_class else "your model"
        print(
            f"  load it with: peft.PeftModel.from_pretrained({base_class}.from_pretrained({base!r}), {str(out)!r})"
        )
    elif auto_class is not None:
        print(f"  load it with: transformers.{auto_class}.from_pretrained({str(out)!r})")
    else:
        name = plan.recipe.model.target or plan.recipe.model.name
        print(
            f"  {name} has no Hugging Face config: {WEIGHTS_FILE} holds its state dict "
            "(safetensors.torch.load_file, then model.load_state_dict)"
        )
    return 0


# --------------------------------------------------------------------------- the checkpoint


def _read_plan(run_path: Path) -> Plan:
    plan_file = RunDir.of(run_path).plan_file
    try:
        return Plan.from_json(plan_file.read_text())
    except FileNotFoundError:
        raise UserError(f"{run_path}: not a run directory (no {plan_file.name})") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{plan_file}: cannot be read ({type(exc).__name__}: {first_line(exc)})") from None


def consolidate(plan: Plan, path: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights (and buffers) of checkpoint `path`, under the trained module's names.

    Raises:
        UserError: the checkpoint's files cannot be read or put together.
    """
    try:
        return backends.consolidate_fp32(plan, path)
    except models.ModelError as exc:
        raise UserError(str(exc)) from None
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        # A file that verifies yet does not load (written by another version, say): one line.
        raise UserError(
            f"{path}: cannot consolidate the weights ({type(exc).__name__}: {first_line(exc)})"
        ) from None


# --------------------------------------------------------------------------- writing


def _refuse_to_overwrite(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(
            f"--out {out}: exists and is not empty; nothing was written",
            hint="choose a new directory, or add --force to replace the files an export writes there",
        )


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A directory beside `out` to write into; its files then replace those of `out` (a new `out`
    appears whole, by one rename). Nothing in `out` is touched if writing fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        yield tmp
        _usual_modes(tmp)
        if not out.exists():
            tmp.rename(out)
            return
        for item in tmp.iterdir():
            target = out / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _usual_modes(directory: Path) -> None:
    """The modes a plain mkdir and open would give (mkdtemp makes 0700, some writers 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *directory.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _auto_class(plan: Plan) -> str | None:
    """The transformers Auto class that loads the export; None for a model without a config."""
    if plan.hf_dir is not None:
        return hf_dir.AUTO_CLASSES[plan.model.task]
    return HF_FAMILIES.get(plan.shape.family) if plan.shape is not None else None


def _save_pretrained(
    plan: Plan, state: dict[str, torch.Tensor], dtype: torch.dtype, out: Path, tokenizer: Any
) -> str:
    """The transformers model the run trained, the weights loaded strictly, LoRA adapters merged
    into them, cast and saved; the config's unset special-token ids taken from `tokenizer`
    (so `generate` stops at the end of text of a tokenizer the run trained)."""
    wrapped = _build(plan)  # LMLoss or ClassifierLoss: the HF model is its `lm`
    _load_exactly(wrapped, state)
    from transformers import PreTrainedModel
    from transformers.utils import logging as hf_logging

    if plan.recipe.model.lora.rank:
        from launcher.worker import lora

        wrapped = lora.merge(wrapped)
    lm = wrapped.lm
    assert isinstance(lm, nn.Module)
    lm.to(dtype)
    _check_finite(lm.state_dict(), dtype)
    assert isinstance(lm, PreTrainedModel), "launcher.worker.models wraps a transformers model as `lm`"

    if tokenizer is not None:
        _fill_token_ids(lm, tokenizer)
    hf_logging.disable_progress_bar()  # what was written is printed once, below
    lm.save_pretrained(str(out))
    if not (out / WEIGHTS_FILE).is_file():  # transformers 4 writes safetensors by default, 5 always
        raise UserError(f"transformers did not write {WEIGHTS_FILE}; upgrade transformers")
    count = sum(p.numel() for p in lm.parameters())
    return f"{type(lm).__name__}, {count:,} parameters"


def _adapter_base(plan: Plan) -> str:
    """The weights the adapters were trained on, which loading them needs: model.init_from,
    else a pretrained model.hf.

    Raises:
        UserError: the run trained no adapters, or on weights nothing else holds (random ones).
    """
    m = plan.recipe.model
    if not m.lora.rank:
        raise UserError(
            "--lora adapter: the run trained no LoRA adapters (model.lora.rank is 0); export without it"
        )
    if plan.init_from is not None:
        return plan.init_from
    if plan.hf_dir is not None and m.weights == "pretrained":
        return plan.hf_dir
    raise UserError(
        "--lora adapter: the adapters were trained on randomly initialised weights that no directory holds "
        "(set model.init_from or a pretrained model.hf); export with --lora merge"
    )


def _save_adapter(
    plan: Plan, state: dict[str, torch.Tensor], dtype: torch.dtype, out: Path, base: str
) -> str:
    """The run's LoRA adapters alone, a peft adapter directory naming `base`."""
    from launcher.worker import lora

    wrapped = _build(plan)
    _load_exactly(wrapped, state)
    adapters = lora.adapter_state(wrapped)
    _check_finite(adapters, dtype)
    lora.save_adapter(wrapped, out, base=base, dtype=dtype)
    count = sum(t.numel() for t in adapters.values())
    return f"LoRA adapters (rank {plan.recipe.model.lora.rank}), {count:,} parameters"


def _fill_token_ids(lm: Any, tokenizer: Any) -> None:  # a PreTrainedModel, a PreTrainedTokenizerBase
    for role in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, role, None)
        if token_id is None or getattr(lm.config, role, None) is not None:
            continue
        setattr(lm.config, role, token_id)
        if getattr(lm, "generation_config", None) is not None:
            setattr(lm.generation_config, role, token_id)


def _load_exactly(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """load_state_dict(strict) as one line on failure, then the check that every tensor (tied ones
    included: a tie loads one of its names last) holds exactly the consolidated value."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        parts = [f"missing {', '.join(missing[:3])}"] if missing else []
        parts += [f"unexpected {', '.join(unexpected[:3])}"] if unexpected else []
        raise UserError(f"the checkpoint does not fit the plan's model: {'; '.join(parts)}")
    for name, value in model.state_dict().items():
        if not torch.equal(value, state[name].to(value.dtype)):
            raise UserError(f"{name}: tied weights disagree in the checkpoint")


def _save_state_dict(state: dict[str, torch.Tensor], dtype: torch.dtype, out: Path) -> str:
    from safetensors.torch import save_file

    # safetensors refuses tensors that share memory (ties, ZeRO's flat views): each gets its own copy.
    cast = {k: (v.to(dtype) if v.is_floating_point() else v).clone().contiguous() for k, v in state.items()}
    _check_finite(cast, dtype)
    save_file(cast, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    count = sum(v.numel() for v in _distinct(state))
    return f"a state dict of {len(state)} tensors, {count:,} elements"


def _distinct(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    seen: dict[tuple[int, int], torch.Tensor] = {}
    for v in state.values():
        seen.setdefault((v.data_ptr(), v.numel()), v)
    return list(seen.values())


def _check_finite(state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    for name, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UserError(
                f"{name} is not finite in {str(dtype).removeprefix('torch.')} (beyond its range?); "
                "nothing was written",
                hint="export in fp32 or bf16",
            )


def tokenizer_source(plan: Plan, run: RunDir) -> Path | None:
    """The tokenizer the run used, as launcher.worker.data loads it: data.tokenizer, else the copy the
    run trained into RUN_DIR/tokenizer, else the cached training on the same files; None for
    synthetic data."""
    if plan.recipe.data.kind == "synthetic":
        return None
    if plan.tokenizer_dir is not None:
        return Path(plan.tokenizer_dir)
    if (run.tokenizer / TOKENIZER_FILE).is_file():
        return run.tokenizer
    try:
        cached = trained_dir(plan.recipe, plan.data_paths)
    except OSError:
        return None
    return cached if (cached / TOKENIZER_FILE).is_file() else None


def write_tokenizer(plan: Plan, run: RunDir, out: Path) -> tuple[Any, str]:
    """Write the run's tokenizer for AutoTokenizer.from_pretrained(out): it (None without one),
    and where it came from."""
    src = tokenizer_source(plan, run)
    if src is None:
        return (
            None,
            "none (synthetic data)" if plan.recipe.data.kind == "synthetic" else "none found; not written",
        )
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (src / "tokenizer_config.json").is_file() or not (src / TOKENIZER_FILE).is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(src))  # a transformers tokenizer: keep its settings
    else:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(src / TOKENIZER_FILE))
        roles = {
            role: token for token, role in _TOKEN_ROLES.items() if backend.token_to_id(token) is not None
        }
        if "eos_token" in roles:
            roles |= {"bos_token": END_OF_TEXT, "pad_token": END_OF_TEXT}
        limit = {"model_max_length": plan.shape.max_position_embeddings} if plan.shape else {}
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **roles, **limit)
    tokenizer.save_pretrained(str(out))
    return tokenizer, f"from {src}"


def _build(plan: Plan) -> nn.Module:
    """The module the run trained, freshly initialised (launcher.worker.models, as train.setup builds it)."""
    try:
        return model_setup.model_for(plan, load_init=False, fp8=False)[0]
    except models.ModelError as exc:
        raise UserError(str(exc)) from None


if __name__ == "__main__":
    raise SystemExit(main())
