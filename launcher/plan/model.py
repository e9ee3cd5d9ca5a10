"""The model, resolved once: what the plan, the dry run, the memory planner and the workers read about it.

The plan reads model.hf's directory here, once (launcher.plan.hf_dir), decides the task
(launcher.recipe.tasks, with the config's architecture for data.task auto), the classes of a
sequence classifier, whether the model predicts the next token and which loss mplaunch takes of
it. `Plan.model` carries the result to plan.json; nobody after the plan decides these again.

Where model.hf comes from is settled here too, so that no worker waits on the Hub to learn it:
- a tiny model the shipped recipes name (recipes/models/tiny-*) is saved on first use by the
  make_tiny.py beside it, in a subprocess (seeded, about 10 s, no download);
- a Hub id is checked against the Hugging Face cache and the Hub: with HF_HUB_OFFLINE (or
  TRANSFORMERS_OFFLINE) set, or the Hub not answering one short request (HUB_TIMEOUT_S), an id
  the cache lacks is one line; one the cache has is read from it (the workers get HF_HUB_OFFLINE=1
  instead of retrying the Hub); an id the Hub says it has no model of is one line.
- model.lora.target_modules are matched against the layer names in the safetensors headers, or,
  for a directory without weights, a build of its config on the meta device (a subprocess that
  imports torch and transformers: 5 to 15 s, once per plan, only then).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from launcher.errors import UserError
from launcher.plan import data_check, hf_dir, targets, vocab
from launcher.plan.extras import machine_problems
from launcher.recipe import tasks
from launcher.recipe.families import FAMILIES
from launcher.recipe.sections import Recipe, Train
from launcher.rundir.layout import RunDir

# train.loss as the dry run says it (launcher.worker.models.LMLoss does it): the loss names' one table.
LOSSES = {
    "labelled": "train.loss labelled: the output head and an fp32 cross-entropy on labelled positions only",
    "full": "train.loss full: the output head on every position, an fp32 cross-entropy",
    "model": "train.loss model: the model's own loss, in the compute dtype",
}
assert tuple(LOSSES) == get_args(Train.model_fields["loss"].annotation), "train.loss's names are LOSSES'"
# train.loss_normalization as the dry run says it (launcher.worker.backends.TokenWeights does it).
NORMALIZATIONS = {
    "tokens": "averaged over the step's label tokens on every rank (train.loss_normalization tokens)",
    "batch": "the mean of the micro-batches' means (train.loss_normalization batch)",
}
assert tuple(NORMALIZATIONS) == get_args(Train.model_fields["loss_normalization"].annotation)


@dataclass(frozen=True)
class ModelFacts:
    """What the plan decided about the model (`Plan.model`, in plan.json)."""

    task: str  # data.task, auto resolved (launcher.recipe.tasks)
    num_labels: int | None  # sequence-classification: model.num_labels, else model.hf's config's, else 2
    causal: bool  # the model predicts the next token (causal-lm, sft): a language model shifts the labels
    # train.loss for a language model mplaunch takes the loss of (launcher.worker.models.LMLoss: a built-in
    # LM, model.hf with an LM task); None: the model computes its own (tiny-mlp, model.target) or is a
    # classifier (launcher.worker.model_setup.ClassifierLoss).
    loss: str | None

    @property
    def language_model(self) -> bool:
        return self.loss is not None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelFacts:
        return cls(**data)


@dataclass(frozen=True)
class ResolvedModel:
    """The model as the plan read it: model.hf's directory (None without one, or when unreadable), the
    facts, and what stops the plan (one line each)."""

    hf: hf_dir.HfModel | None
    facts: ModelFacts
    problems: tuple[str, ...]
    hub: Hub  # a Hub id's: what keeps this machine from loading it, the workers' environment, notes


def resolve_model(recipe: Recipe) -> ResolvedModel:
    """Read model.hf's directory once and decide the model's facts; the problems the files show."""
    hf, problems = _read_hf(recipe)
    hf_task = hf_dir.task_of(hf) if hf is not None and hf.local else None
    if hf is not None:
        problems += tasks.hf_problems(recipe, hf_task)
    task = tasks.resolve(recipe, hf_task)
    if not tasks.known(recipe):  # launcher.recipe.rules checked the tasks the recipe decides alone
        problems += tasks.record_problems(recipe.data.kind, task)
    problems += _init_from(recipe)
    if hf is not None and hf.local:
        problems += _lora(recipe, hf, task)
    found = hub(hf.source) if hf is not None and not hf.local else Hub()
    problems += found.problems
    return ResolvedModel(hf, facts_of(recipe, task, hf), tuple(problems), found)


def facts_of(recipe: Recipe, task: str, hf: hf_dir.HfModel | None) -> ModelFacts:
    """The facts of the recipe's model given its resolved task (and model.hf's directory, if read)."""
    m = recipe.model
    if m.hf is not None:
        language_model = task != tasks.SEQUENCE_CLASSIFICATION
    else:
        language_model = m.target is None and m.name is not None and FAMILIES[m.name].language_model
    classes = (m.num_labels or hf_dir.num_labels(hf)) if task == tasks.SEQUENCE_CLASSIFICATION else None
    return ModelFacts(
        task=task,
        num_labels=classes,
        causal=task in tasks.CAUSAL,
        loss=recipe.train.loss if language_model else None,
    )


def _read_hf(recipe: Recipe) -> tuple[hf_dir.HfModel | None, list[str]]:
    m = recipe.model
    if m.hf is None:
        return None, []
    built = _shipped(m.hf, recipe.source)
    if built is not None:
        return None, [built]
    hf, problems = hf_dir.read(m.hf, recipe.source, dict(m.config))
    if hf is None:
        return None, problems
    problems += hf_dir.problems(hf, m.weights, dict(m.config), recipe.data.tokenizer is not None)
    if hf.max_positions is not None and recipe.data.seq_len > hf.max_positions:
        problems.append(
            f"data.seq_len: {recipe.data.seq_len} is longer than {hf.source}'s {hf.max_positions} positions"
        )
    return hf, problems


def _init_from(recipe: Recipe) -> list[str]:
    """model.init_from must be a directory of weights the workers can load."""
    if recipe.model.init_from is None:
        return []
    base = Path(recipe.source).parent if recipe.source else Path()
    where = base / recipe.model.init_from
    if not where.is_dir():
        return [f"model.init_from: directory not found: {where}"]
    names = hf_dir.INIT_WEIGHT_FILES
    if not any((where / n).is_file() for n in names):
        return [
            f"model.init_from: {where} holds none of {', '.join(names)}; expected what mplaunch export wrote"
        ]
    return []


def user_code(recipe: Recipe) -> tuple[Recipe, str | None, list[str]]:
    """The recipe without the keys model.target, model.hf and data.target ignore; where the targets
    are imported from first; the targets' modules and the packages this machine cannot find."""
    target, dataset = recipe.model.target, recipe.data.target
    if target is not None or recipe.model.hf is not None:
        recipe = targets.only_target_keys(recipe)
    if dataset is not None:
        recipe = targets.only_dataset_keys(recipe)
    import_dir = targets.import_dir(recipe.source) if target is not None or dataset is not None else None
    machine = []
    for key, name in (("model.target", target), ("data.target", dataset)):
        missing = targets.find(name, import_dir, key) if name is not None else None
        machine += [missing] if missing else []
    return recipe, import_dir, machine + machine_problems(recipe)


def data_files(recipe: Recipe, hf: hf_dir.HfModel | None = None) -> tuple[tuple[str, ...], str | None]:
    """The recipe's data files and tokenizer directory, absolute (they are relative to the recipe);
    without data.tokenizer, model.hf's own tokenizer when it has one and the data is not synthetic."""
    base = Path(recipe.source).parent if recipe.source else Path()
    tokenizer = str((base / recipe.data.tokenizer).resolve()) if recipe.data.tokenizer else None
    if hf is not None and tokenizer is None and hf.has_tokenizer and recipe.data.kind != "synthetic":
        tokenizer = hf.source
    return tuple(str((base / p).resolve()) for p in recipe.data.paths), tokenizer


def saved_facts(recipe: Recipe, body: dict[str, Any]) -> ModelFacts:
    """Plan.model as plan.json holds it; a plan.json written before the plan carried it (an older
    run directory) gets the facts decided again from its recipe and model.hf directory."""
    saved = body.get("model")
    if saved is not None:
        return ModelFacts.from_dict(saved)
    hf = hf_dir.read(body["hf_dir"], "", dict(recipe.model.config))[0] if body.get("hf_dir") else None
    hf_task = hf_dir.task_of(hf) if hf is not None and hf.local else None
    return facts_of(recipe, tasks.resolve(recipe, hf_task), hf)


def vocab_of(
    recipe: Recipe, model: ResolvedModel, data_paths: tuple[str, ...], tokenizer: str | None, run_dir: Path
) -> tuple[vocab.Vocab | None, list[str]]:
    """The run's vocabulary once the data files passed their checks (launcher.plan.data_check), or the
    lines that say why the model cannot hold it or the tokenizer lacks a token the task needs."""
    problems: list[str] = []
    found: vocab.Vocab | None = vocab.resolve(recipe, data_paths, tokenizer, RunDir.of(run_dir).tokenizer)
    try:
        if recipe.model.target is not None and found is not None:
            found = vocab.of_target(recipe, found)
    except UserError as exc:
        found, problems = None, exc.lines
    if model.hf is not None and found is not None:
        found, problems = hf_dir.vocab_of(model.hf, found, tokenizer)
    if model.facts.task == tasks.MASKED_LM and tokenizer is not None:
        key = "data.tokenizer" if recipe.data.tokenizer else "model.hf"
        problems += [line for line in [data_check.mask_problem(Path(tokenizer), key)] if line]
    return (None if problems else found), problems


def relative_to_recipe(recipe: Recipe, path: str | None) -> str | None:
    base = Path(recipe.source).parent if recipe.source else Path()
    return str((base / path).resolve()) if path is not None else None


def _shipped(name: str, recipe_source: str) -> str | None:
    """A tiny model that is not there yet beside the make_tiny.py that saves it (a fresh clone's
    recipes/models), saved now: all three, in a subprocess, so this process stays free of torch. The
    line that says why not, if that failed."""
    source, local = hf_dir.locate(name, recipe_source)
    path = Path(source)
    script = hf_dir.tiny_maker(path) if local and not path.exists() else None
    if script is None:
        return None
    print(
        f"mplaunch: saving the tiny models of {path.parent} (first use: make_tiny.py, no download)",
        flush=True,
    )
    started = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(script), "--missing"], capture_output=True, text=True, env=env)
    if done.returncode != 0 or not path.is_dir():
        said = (done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}").splitlines()[-1]
        return f"{hf_dir.missing_dir(path)}; saving it failed: {said}"
    print(f"mplaunch: saved {', '.join(hf_dir.TINY_MODELS)} in {time.perf_counter() - started:.1f} s")
    return None


def _lora(recipe: Recipe, hf: hf_dir.HfModel, task: str) -> list[str]:
    """model.lora.target_modules that `lora.apply` would refuse, one line each."""
    lora = recipe.model.lora
    if not lora.rank or not lora.target_modules:
        return []
    names = None
    if hf_dir.weight_shapes(Path(hf.source)) is None:  # no safetensors headers: build the config
        names = _built_linear_names(hf.source, task, dict(recipe.model.config))
        if names is None:
            return []  # it did not build: the workers say why
    return hf_dir.lora_problems(hf, lora.target_modules, names)


# Builds model.hf's config on the meta device (no memory, no weights) and prints its linear layers:
# nn.Linear, and transformers' Conv1D in GPT-2, as launcher.worker.lora counts them.
_LINEAR_NAMES = """
import json, sys, torch, transformers
config = transformers.AutoConfig.from_pretrained(sys.argv[1], **json.loads(sys.argv[3]))
with torch.device("meta"):
    model = getattr(transformers, sys.argv[2]).from_config(config)
kinds = (torch.nn.Linear, transformers.pytorch_utils.Conv1D)
print(json.dumps([n for n, m in model.named_modules() if isinstance(m, kinds)]))
"""


def _built_linear_names(source: str, task: str, overrides: dict[str, Any]) -> list[str] | None:
    auto = hf_dir.AUTO_CLASSES[task]
    print(
        f"mplaunch: model.lora: reading the layer names of {source} (a build on the meta device)", flush=True
    )
    argv = [sys.executable, "-c", _LINEAR_NAMES, source, auto, json.dumps(overrides)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
        names = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


# --------------------------------------------------------------------------- the Hub

HUB_TIMEOUT_S = 3.0  # one request to the Hub; huggingface_hub itself retries for about 40 s per rank
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's reading of HF_HUB_OFFLINE


@dataclass(frozen=True)
class Hub:
    """What the plan found of a Hub id (model.hf), one line each."""

    problems: tuple[str, ...] = ()  # the id is wrong
    machine: tuple[str, ...] = ()  # this machine cannot load it
    env: dict[str, str] = field(default_factory=dict)  # for the workers
    notes: tuple[str, ...] = ()


def hub(name: str) -> Hub:
    """model.hf naming a Hub id: the cache, then the Hub (one request), unless offline mode is set."""
    cache = hub_cache()
    cached = any((cache / f"models--{name.replace('/', '--')}" / "snapshots").glob("*/config.json"))
    where = f"model.hf: {name} is a Hub id (no folder of that name beside the recipe)"
    fix = f"download it where the Hub answers (hf download {name}) or set model.hf to a local folder"
    offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if offline is not None and offline.upper() in _TRUE:
        var = "HF_HUB_OFFLINE" if os.environ.get("HF_HUB_OFFLINE") else "TRANSFORMERS_OFFLINE"
        lacking = f"{where}, {var} is set and the Hugging Face cache ({cache}) has no copy; {fix}"
        return Hub() if cached else Hub(machine=(lacking,))
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    status, reason = hub_answer(endpoint, name)
    if status is None and cached:
        note = f"model.hf: the Hub ({endpoint}) does not answer ({reason}); the workers read {name} from the cache"
        return Hub(env={"HF_HUB_OFFLINE": "1"}, notes=(note,))
    if status is None:
        silent = f"the Hub ({endpoint}) does not answer ({reason})"
        return Hub(machine=(f"{where}, {silent} and the Hugging Face cache ({cache}) has no copy; {fix}",))
    token = os.environ.get("HF_TOKEN") or Path(os.environ.get("HF_TOKEN_PATH", hf_home() / "token")).is_file()
    if status == 404 or (status == 401 and not token):  # the Hub answers 401 for an id it lacks, to strangers
        return Hub(
            problems=(
                f"model.hf: the Hub has no model {name} ({endpoint}/{name}: HTTP {status}); check the id",
            )
        )
    return Hub()


def hf_home() -> Path:
    """HF_HOME as huggingface_hub reads it."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(os.path.expandvars(os.environ.get("HF_HOME", str(default)))).expanduser()


def hub_cache() -> Path:
    """The Hugging Face cache of Hub models, where huggingface_hub keeps it."""
    default = os.environ.get("HUGGINGFACE_HUB_CACHE", str(hf_home() / "hub"))
    return Path(os.path.expandvars(os.environ.get("HF_HUB_CACHE", default))).expanduser()


def hub_answer(endpoint: str, name: str) -> tuple[int | None, str]:
    """The Hub's HTTP status for the model `name` (one request), or None and why there was none."""
    request = urllib.request.Request(f"{endpoint}/api/models/{name}")
    if os.environ.get("HF_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['HF_TOKEN']}")
    try:
        with urllib.request.urlopen(request, timeout=HUB_TIMEOUT_S) as answer:
            return int(answer.status), ""
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return None, str(reason) or type(exc).__name__
