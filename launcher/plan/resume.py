"""What a resume may change, decided before any worker starts (README.md, "Resuming a run").

A recipe change on resume falls in one of three classes:

- **refused**: the checkpoint cannot continue under it. The shards depend on the world
  size, backend and ZeRO stage; the weights and optimizer state on the precision and
  the model; the data order on the data files, vocabulary, sequence length, sample
  count, held-out fraction, seed and global batch size. `signature` collects all of
  them; the manifest stores it and `refusals` compares.
- **kept**: the checkpoint's state wins and the new value is ignored: the fp16 loss
  scaler restores its scale and counters (precision.loss_scale.*). Warned.
- **applied**: everything else takes effect from the step reached. The optimizer's
  settings (lr, betas, eps, weight decay) and the LR schedule are re-applied over the
  restored optimizer state; the schedule is a function of the optimizer steps applied
  so far (launcher.plan.schedule), evaluated with the new settings at that count, so a new
  lr scales it, a new max_steps stretches or shortens the remaining decay, and warmup
  continues only if it is not over. Listed once, with the LR before and after.

Settings that only say where the run is (name, logging.dir, checkpoint.resume) are not changes, and
neither is a path written another way: model.hf, model.init_from, data.tokenizer and data.paths are
compared where they point (the signature records it, `locations`), so `mygpt2` beside the recipe and
the absolute path RUN_DIR/recipe.yaml holds are one folder; a folder that really moved is listed.

The data files' content is compared too (launcher.plan.digests: each one's size and sha256): an edit
(lines shuffled, same path) is refused naming the file, unless `data.accept_changed` names the new
content as the refusal prints it; the resume then says what it accepted. A checkpoint of an earlier
mplaunch records no content: its resume says so and compares the paths only.

Light side: no torch.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from launcher.errors import UserError
from launcher.plan import schedule
from launcher.plan.digests import accept_token, data_content
from launcher.recipe.schema import to_dict
from launcher.rundir.checkpoint import changed_keys, mismatch, structure

if TYPE_CHECKING:
    from launcher.plan.resolve import Plan

# Where the run is, not how it trains: never a change.
LOCATION = ("name", "source", "logging.dir", "checkpoint.resume")
# The keys that name files or folders, written relative to the recipe's folder or absolute (RUN_DIR/
# recipe.yaml): compared where they point (`locations`), not as written. model.target and data.target
# name modules, imported from the first launch's folder on a resume (launcher.plan.targets.import_dir).
PATH_KEYS = ("model.hf", "model.init_from", "data.tokenizer", "data.paths")
LOCATIONS_KEY = "locations"
# Not a change either: it answers this resume's question about the data's content.
NOT_CHANGES = (*LOCATION, "data.accept_changed")
KEPT = ("precision.loss_scale.",)
# The recipe sections the LR schedule reads (launcher.plan.schedule).
SCHEDULE_INPUTS = ("optimizer", "scheduler", "train")
# Signature entries a resume may change because the workers convert the checkpoint: DeepSpeed's
# ZeRO partitions through its universal checkpoint, FSDP2's shards through torch's distributed
# checkpoint, DDP and ZeRO-0's whole copies as they are (launcher.worker.backends).
RESHARDED = ("world size",)
# The recipe keys that size the batch: a user who sets one on resume decides the batch.
BATCH_KEYS = ("train.micro_batch_size", "train.grad_accum", "train.global_batch_size")
SIGNATURE_KEY = "resume_signature"
CONTENT_KEY = "data content"
ACCEPT_KEY = "data.accept_changed"
NO_CONTENT = (
    "the checkpoint records no content hash of the data files (an earlier mplaunch wrote it): only "
    "their paths are compared on this resume; the checkpoints written from now on record them"
)
# What a checkpoint written before the signature is compared on, from its saved recipe.
OLD_FORMAT_REFUSED = (
    *(f"model.{k}" for k in ("name", "size", "hidden_size", "num_layers", "num_heads", "intermediate_size")),
    *(f"model.{k}" for k in ("vocab_size", "max_position_embeddings", "target", "kwargs")),
    *(f"data.{k}" for k in ("kind", "seq_len", "num_samples", "eval_fraction")),
    "train.seed",
    "train.global_batch_size",
)


def signature(plan: Plan) -> dict[str, Any]:
    """Everything a checkpoint's content and the data order depend on (stored in the manifest)."""
    r, d = plan.recipe, plan.recipe.data
    model: dict[str, Any] = (
        dataclasses.asdict(plan.shape)
        if plan.shape is not None
        else {"target": r.model.target, "kwargs": r.model.kwargs}
        if r.model.target is not None
        else {"hf": plan.hf_dir, "config": r.model.config, "num_labels": r.model.num_labels}
    )
    if r.model.lora.rank:
        model["lora"] = r.model.lora.model_dump(mode="json")
    # A dataset factory's rows are its own: another factory, or other kwargs, is other data.
    factory = {"data.target": d.target, "data.kwargs": d.kwargs} if d.target is not None else {}
    return {
        **factory,
        "world size": plan.world_size,
        "backend": r.backend,
        "ZeRO stage": r.zero.stage,
        "precision.dtype": plan.precision.dtype,
        "model": model,
        "data.task": plan.model.task,
        "data.kind": d.kind,
        "data files": list(plan.data_paths),
        CONTENT_KEY: data_content(plan.data_paths),
        "vocabulary size": plan.vocab_size,
        "data.seq_len": d.seq_len,
        "data.num_samples": d.num_samples if d.kind == "synthetic" else None,
        "data.eval_fraction": d.eval_fraction,
        "train.seed": r.train.seed,
        "global batch size": plan.batch.global_batch_size,
        LOCATIONS_KEY: locations(plan),
    }


def locations(plan: Plan) -> dict[str, Any]:
    """Where each of PATH_KEYS points: resolved against the recipe's folder (a hub id as it is)."""
    return {
        "model.hf": plan.hf_dir,
        "model.init_from": plan.init_from,
        "data.tokenizer": plan.tokenizer_dir if plan.recipe.data.tokenizer is not None else None,
        "data.paths": list(plan.data_paths),
    }


def refusals(manifest: dict[str, Any], plan: Plan, current: dict[str, Any] | None = None) -> list[str]:
    """Why the checkpoint described by `manifest` cannot continue under `plan` (whose `signature` is
    `current`, if the caller has it), one clause each."""
    saved = manifest.get(SIGNATURE_KEY)
    if saved is not None:
        return _differences(saved, current or signature(plan), "")
    # Written before the signature: the structure, the dtype and the saved recipe's keys.
    problems = mismatch(manifest, structure(plan))
    if manifest.get("precision", plan.precision.dtype) != plan.precision.dtype:
        problems.append(
            f"the checkpoint was written with precision.dtype {manifest['precision']}, "
            f"this run has {plan.precision.dtype}"
        )
    old, new = manifest.get("recipe", {}), to_dict(plan.recipe)
    for key in OLD_FORMAT_REFUSED:
        if _value(old, key) != _value(new, key):
            problems.append(
                f"the checkpoint was written with {key} {_value(old, key)}, this run has {_value(new, key)}"
            )
    return problems


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str) -> list[str]:
    out = []
    for key in new:
        if key not in old or key in (*RESHARDED, CONTENT_KEY, LOCATIONS_KEY):
            continue  # recorded only by a later mplaunch, the workers reshard it, `_content_check` or `_moves`
        a, b = old[key], new[key]
        if isinstance(a, dict) and isinstance(b, dict) and key == "model":
            out += _differences(a, b, f"{key} ")
        elif a != b:
            out.append(f"the checkpoint was written with {prefix}{key} {_show(a)}, this run has {_show(b)}")
    return out


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]" if len(value) <= 3 else f"{len(value)} files"
    return str(value)


def check(manifest: dict[str, Any], plan: Plan, path: str) -> list[str]:
    """Refuse an unusable checkpoint; otherwise the lines that say what the resume changes.

    Raises:
        UserError: a refused change, naming every difference and how to proceed.
    """
    try:
        current = signature(plan)  # reads each data file at most once
        problems = refusals(manifest, plan, current)
        lines, data_problems, data_hint = _content_check(manifest, plan, current[CONTENT_KEY])
    except OSError as exc:  # a data file that check read moments ago
        raise UserError(f"data.paths: cannot read {exc.filename}: {exc.strerror}") from None
    if problems or data_problems:
        hints = (
            ["resume with the checkpoint's settings, or start afresh under another name"] if problems else []
        )
        raise UserError(
            f"cannot resume from {path}: {'; '.join(problems + data_problems)}",
            hint="; ".join([*hints, data_hint] if data_hint else hints)
            + " (nothing was started, nothing is overwritten)",
        )
    old = manifest.get("recipe", {})
    new = to_dict(plan.recipe)
    moves = _moves(manifest, plan, old, new)
    written = [
        k
        for k in changed_keys(old, new)
        if not any(k == p or k.startswith(p + ".") for p in (*NOT_CHANGES, *PATH_KEYS))
    ]
    changed = sorted([*written, *moves])
    kept = [k for k in changed if k.startswith(KEPT)]
    applied = [k for k in changed if k not in kept]
    if applied:
        shown = ", ".join(
            f"{k} {_show(moves[k][0])} -> {_show(moves[k][1])}"
            if k in moves
            else f"{k} {_value(old, k)} -> {_value(new, k)}"
            for k in applied
        )
        lines.append(f"applied on resume: {shown}")
        lr = _lr_line(manifest, plan)
        if lr:
            lines.append(lr)
    if kept:
        lines.append(
            f"warning: {', '.join(kept)}: kept from the checkpoint on resume "
            "(the loss scaler restores its scale and counters); start afresh to change them"
        )
    return lines


def _moves(
    manifest: dict[str, Any], plan: Plan, old: dict[str, Any], new: dict[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """The PATH_KEYS that point elsewhere than the checkpoint's did: key -> (before, now), resolved.

    A checkpoint of an earlier mplaunch records no locations, only its recipe as written: a value
    written alike is the same place, an absolute one is compared as it is, and a relative one (to a
    folder it does not record) is the same place when the resolved path ends with it.
    """
    now = locations(plan)
    saved = (manifest.get(SIGNATURE_KEY) or {}).get(LOCATIONS_KEY)
    moves = {}
    for key in PATH_KEYS:
        if isinstance(saved, dict) and key in saved:
            if saved[key] != now[key]:
                moves[key] = (saved[key], now[key])
        elif _value(old, key) != _value(new, key) and not _written_for(_value(old, key), now[key]):
            moves[key] = (_value(old, key), now[key])
    return moves


def _written_for(written: Any, place: Any) -> bool:
    """Whether a path as a recipe wrote it (relative to an unknown folder) can name `place`."""
    if isinstance(written, list) and isinstance(place, list):
        return len(written) == len(place) and all(map(_written_for, written, place))
    if not isinstance(written, str) or not isinstance(place, str):
        return bool(written == place)
    if os.path.isabs(written) or not os.path.isabs(place):
        return os.path.normpath(written) == os.path.normpath(place)
    parts = [p for p in Path(os.path.normpath(written)).parts if p != os.pardir]
    return Path(place).parts[len(Path(place).parts) - len(parts) :] == tuple(parts)


def _content_check(
    manifest: dict[str, Any], plan: Plan, now: dict[str, dict[str, Any]]
) -> tuple[list[str], list[str], str]:
    """The data files' content against the checkpoint's: the lines to say, the refusals and their hint."""
    if not plan.data_paths:
        return [], [], ""
    saved = (manifest.get(SIGNATURE_KEY) or {}).get(CONTENT_KEY)
    if not isinstance(saved, dict):
        return [NO_CONTENT], [], ""
    accepted, step = plan.recipe.data.accept_changed, manifest.get("step")
    changes = [_changed(p, saved[p], now[p]) for p in now if p in saved and saved[p] != now[p]]
    digest = accept_token(now)
    if changes and accepted == digest:
        done = f"training continues from step {step} on the new content"
        return [f"accepted on resume ({ACCEPT_KEY}={digest}): {'; '.join(changes)}; {done}"], [], ""
    if changes:
        wrong = [f"{ACCEPT_KEY} is {accepted} but the data's content is now {digest}"] if accepted else []
        hint = (
            "put the files back as they were, or accept their new content, whose samples and order differ "
            f"from the run's so far, from step {step} on with {ACCEPT_KEY}={digest}"
        )
        return [], changes + wrong, hint
    if accepted not in (None, digest):
        return [f"warning: {ACCEPT_KEY}={accepted} has no effect: the data files are unchanged"], [], ""
    return [], [], ""


def _changed(path: str, old: Any, new: dict[str, Any]) -> str:
    old = old if isinstance(old, dict) else {}
    was, size = old.get("bytes"), new["bytes"]
    sizes = f"same size, {size} bytes" if was == size else f"size {was} -> {size} bytes"
    return (
        f"data {'directory' if Path(path).is_dir() else 'file'} {path} changed since the checkpoint was "
        f"written ({sizes}; sha256 {str(old.get('sha256'))[:12]} -> {new['sha256'][:12]})"
    )


def _value(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _lr_line(manifest: dict[str, Any], plan: Plan) -> str | None:
    """How the LR schedule continues, if its inputs changed.

    The schedule before is this run's recipe with the checkpoint's optimizer, scheduler and train
    sections: they are all the schedule reads, and none names a file, so a resume started where the
    saved recipe's relative paths do not resolve says it too.
    """
    saved, now = manifest.get("recipe") or {}, plan.recipe
    try:
        old = now.model_copy(
            update={k: type(getattr(now, k)).model_validate(saved[k]) for k in SCHEDULE_INPUTS}
        )
    except (KeyError, TypeError, ValidationError):
        return None  # a recipe of an older mplaunch: the lines above are all there is to say
    applied = int(manifest["step"]) - int(manifest.get("skipped_steps") or 0)
    before, after = schedule.lr_at(old, applied), schedule.lr_at(now, applied)
    if before == after:
        return None
    return (
        f"the LR schedule continues at optimizer step {applied} with the new settings: "
        f"lr {before:.3g} -> {after:.3g}"
    )


def keep_global_batch(manifest: dict[str, Any], world: int, overrides: list[str]) -> dict[str, Any] | None:
    """The batch values that keep the checkpoint's global batch at world size `world`, or None
    when the world size is the checkpoint's (or the user set a batch key: the signature judges).

    The micro-batch stays the checkpoint's and grad_accum absorbs the change, so every optimizer
    step sees the same samples in the same order (launcher.worker.data splits one global batch).

    Raises:
        UserError: the global batch does not split over the new world size; names the sizes that would.
    """
    saved = manifest.get(SIGNATURE_KEY) or {}
    old_world, global_ = saved.get("world size"), saved.get("global batch size")
    if old_world is None or global_ is None or old_world == world:
        return None
    if any(item.split("=", 1)[0] in BATCH_KEYS for item in overrides):
        return None
    micro = _saved_micro(manifest, int(global_), int(old_world))
    if global_ % (micro * world):
        per_micro = global_ // micro
        worlds = [w for w in range(1, per_micro + 1) if per_micro % w == 0]
        micros = [
            m for m in range(1, global_ // world + 1) if global_ % world == 0 and (global_ // world) % m == 0
        ]
        other = f"; or give train.micro_batch_size one of {_show_all(micros)}" if micros else ""
        raise UserError(
            f"cannot resume on {world} ranks: the checkpoint's global batch of {global_} samples in micro-batches "
            f"of {micro} splits over world sizes {_show_all(worlds)} only{other}",
            hint="the global batch must stay the same so every step sees the same samples; nothing was started",
        )
    return {"train.global_batch_size": global_, "train.micro_batch_size": micro, "train.grad_accum": None}


def _saved_micro(manifest: dict[str, Any], global_: int, old_world: int) -> int:
    """The micro-batch size the checkpoint's run used (its recipe's, or derived as the batch triple did)."""
    train = manifest.get("recipe", {}).get("train", {})
    if train.get("micro_batch_size"):
        return int(train["micro_batch_size"])
    return global_ // (int(train.get("grad_accum") or 1) * old_world)


def _show_all(values: list[int]) -> str:
    return ", ".join(map(str, values[:-1])) + f" and {values[-1]}" if len(values) > 1 else str(values[0])
