"""What a rank's memory and start-up cost as the corpus grows: the token cache against the old in-memory rows.

Builds a text corpus of N documents and one of 10 x N (each document one to three
lines of recipes/data/corpus.txt, drawn with a fixed seed), prepares both with
`mplaunch prepare` (timed, then timed again when cached), and then, in a fresh
process per corpus as a rank is, opens the tokens with launcher.worker.data.load_tokens
and draws micro-batches through the real data.Batches (rank 0 of the tiny BERT
recipe's 2). Each process reports its peak resident memory (VmHWM) less its peak
after the imports, its private (RssAnon) and file-backed (RssFile: pages of the
mapped cache, shared by every rank of the machine and dropped under pressure)
memory at the end, and the seconds from load_tokens to the first batch (and from
the process's start). Side by side, the same processes with the rows built the
way load_tokens built them before the cache: every document read and tokenized
into memory.

Prints the medians and the ratios 10x / 1x: for the cache the private memory should
stay within a few percent. What still grows with the corpus in a cache rank: the
seeded sample order (8 bytes a row, a few copies: launcher.worker.data.split and Batches),
the mapped pages of the stream (RssFile, page cache shared with the other ranks), and
while load_tokens hashes the data files for the cache key, launcher.plan.records.hash_paths
holding each file whole (a transient of up to one file's size). The "cached s" column
is `mplaunch prepare` as a process (interpreter start included); its printed line,
kept in the JSON, gives the seconds of the work itself. Not a test: numbers depend
on the machine.

    python bench/token_rss.py [--docs 10000] [--scale 10] [--batches 200] [--repeats 3]
                              [--out bench/results/token-rss-cpu.json]  (also writes the .txt beside it)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("cache", "memory")


def _status(*keys: str) -> dict[str, int]:
    """kB values of /proc/self/status (Linux)."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            found[key] = int(value.split()[0])
    return found


def _in_memory_tokens(plan):  # the rows as load_tokens made them before the cache (data._chunk)
    import numpy as np

    from launcher.plan import vocab
    from launcher.run import token_cache
    from launcher.worker import data

    tokenizer = token_cache.load_tokenizer(Path(plan.tokenizer_dir))
    sep, cls = token_cache.separator_id(tokenizer), tokenizer.token_to_id("[CLS]")
    stream: list[int] = []
    for enc in tokenizer.encode_batch(
        vocab.read_texts(plan.recipe, plan.data_paths), add_special_tokens=False
    ):
        stream.extend([*enc.ids, sep])
    body = plan.recipe.data.seq_len - 2
    rows = len(stream) // body
    arr = np.asarray(stream[: rows * body], dtype=np.int64).reshape(rows, body)
    ids = np.concatenate([np.full((rows, 1), cls), arr, np.full((rows, 1), sep)], axis=1)
    specials = tuple(i for i in map(tokenizer.token_to_id, data.SPECIALS) if i is not None)
    return data.Tokens(
        data.ArrayRows(ids), tokenizer.get_vocab_size(), tokenizer.token_to_id("[MASK]"), specials
    )


def child(recipe_path: str, mode: str, num_batches: int) -> None:
    """One rank's start: the imports, then the tokens, then `num_batches` micro-batches."""
    import numpy as np  # noqa: F401
    import tokenizers  # noqa: F401
    import torch  # noqa: F401

    from launcher.plan.hardware import Hardware
    from launcher.plan.resolve import resolve
    from launcher.recipe.schema import load
    from launcher.run import token_cache
    from launcher.worker import data

    plan = resolve(load(Path(recipe_path)), Hardware(cpu_count=os.cpu_count() or 1))
    token_cache.place_tokenizer(plan)  # the launcher's step before any worker, not measured
    baseline = _status("VmHWM")["VmHWM"]
    imported_at = time.time()
    started = time.perf_counter()
    tokens = data.load_tokens(plan, 0, lambda: None) if mode == "cache" else _in_memory_tokens(plan)
    rows = data.split(len(tokens.ids), plan.recipe.data.eval_fraction, plan.recipe.train.seed)
    batches = data.Batches(tokens, rows.train, plan, 0)
    drawn = batches.for_step(0)
    first_s, first_at = time.perf_counter() - started, time.time()
    step, count = 1, len(drawn)
    while count < num_batches:
        count += len(batches.for_step(step))
        step += 1
    mem = _status("VmHWM", "RssAnon", "RssFile")
    result = {
        "baseline_kb": baseline,
        "peak_kb": mem["VmHWM"],
        "anon_kb": mem["RssAnon"],
        "file_kb": mem["RssFile"],
        "first_batch_s": first_s,
        "first_batch_at": first_at,
        "imported_at": imported_at,
        "rows": len(tokens.ids),
        "micro_batches": count,
    }
    print(json.dumps(result), flush=True)


def make_corpus(path: Path, num_docs: int, seed: int) -> None:
    lines = (ROOT / "recipes" / "data" / "corpus.txt").read_text().splitlines()
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(num_docs):
            f.write(" ".join(rng.choice(lines) for _ in range(rng.randint(1, 3))) + "\n")


def write_recipe(tmp: Path, name: str, corpus: Path, tokenizer: Path) -> Path:
    import yaml

    body = {
        "extends": str(ROOT / "recipes" / "bert_tiny.yaml"),
        "name": f"token-rss-{name}",
        "data": {"paths": [str(corpus)], "tokenizer": str(tokenizer)},
        "logging": {"dir": str(tmp / "runs")},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def prepare(recipe: Path, env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "launcher", "prepare", str(recipe)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return time.perf_counter() - started, out.stdout.strip()


def rank(recipe: Path, mode: str, num_batches: int, env: dict[str, str]) -> dict[str, float]:
    spawned = time.time()
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(recipe), mode, str(num_batches)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    result["start_to_first_batch_s"] = result.pop("first_batch_at") - spawned
    result["imports_s"] = result.pop("imported_at") - spawned  # interpreter, torch, the recipe and plan
    result["growth_kb"] = result["peak_kb"] - result["baseline_kb"]
    return result


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def measure(
    tmp: Path, num_docs: int, scale: int, num_batches: int, repeats: int, modes: tuple[str, ...]
) -> dict:
    env = {**os.environ, "MPLAUNCH_CACHE": str(tmp / "cache")}
    rank_env = {**env, "TOKENIZERS_PARALLELISM": "false"}  # as the launcher starts its workers (plan.env)
    os.environ["MPLAUNCH_CACHE"] = env["MPLAUNCH_CACHE"]
    sys.path.insert(0, str(ROOT))
    from launcher.plan import vocab
    from launcher.recipe.schema import load

    tokenizer = vocab.prepare(
        load(ROOT / "recipes" / "bert_tiny.yaml"), (str(ROOT / "recipes" / "data" / "corpus.txt"),)
    )
    sizes = {"1x": num_docs, f"{scale}x": num_docs * scale}
    recipes, prepared = {}, {}
    for name, docs in sizes.items():
        make_corpus(tmp / f"{name}.txt", docs, seed=docs)
        recipes[name] = write_recipe(tmp, name, tmp / f"{name}.txt", tokenizer)
        first_s, first_line = prepare(recipes[name], env)
        again_s, again_line = prepare(recipes[name], env)
        meta = json.loads((Path(first_line.split()[1].rstrip(":")) / "meta.json").read_text())
        prepared[name] = {
            "documents": docs,
            "tokens": meta["num_tokens"],
            "corpus_bytes": (tmp / f"{name}.txt").stat().st_size,
            "cache_bytes": sum(p.stat().st_size for p in Path(first_line.split()[1].rstrip(":")).iterdir()),
            "prepare_s": first_s,
            "cached_prepare_s": again_s,
            "prepare_line": first_line,
            "cached_line": again_line,
        }
    runs: dict[str, list[dict[str, float]]] = {f"{m} {n}": [] for m in modes for n in sizes}
    for i in range(repeats):
        # Side by side, the order reversed every round, so neither corpus always runs on a warmer machine.
        order = [(m, n) for m in modes for n in sizes]
        for mode, name in order if i % 2 == 0 else order[::-1]:
            runs[f"{mode} {name}"].append(rank(recipes[name], mode, num_batches, rank_env))
    medians = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in runs.items()}
    big = f"{scale}x"
    ratios = {
        mode: {
            f: medians[f"{mode} {big}"][f] / medians[f"{mode} 1x"][f]
            for f in ("peak_kb", "growth_kb", "anon_kb", "first_batch_s", "start_to_first_batch_s")
        }
        for mode in modes
    }
    return {
        "machine": cpu_name(),
        "python": platform.python_version(),
        "recipe": "recipes/bert_tiny.yaml (seq_len 64, micro_batch_size 8, rank 0 of 2)",
        "micro_batches": num_batches,
        "repeats": repeats,
        "prepared": prepared,
        "median": medians,
        "ratio_10x_to_1x" if scale == 10 else f"ratio_{scale}x_to_1x": ratios,
        "runs": runs,
    }


def report(result: dict) -> str:
    prepared, med = result["prepared"], result["median"]
    (ratio_key,) = [k for k in result if k.startswith("ratio_")]
    names = list(prepared)
    lines = [
        f"{result['machine']}; {result['recipe']}; {result['micro_batches']} micro-batches; "
        f"median of {result['repeats']}",
        f"{'corpus':8}{'documents':>11}{'tokens':>12}{'text MB':>9}{'cache MB':>10}{'prepare s':>11}{'cached s':>10}",
    ]
    for name in names:
        p = prepared[name]
        lines.append(
            f"{name:8}{p['documents']:>11}{p['tokens']:>12}{p['corpus_bytes'] / 1e6:>9.1f}"
            f"{p['cache_bytes'] / 1e6:>10.1f}{p['prepare_s']:>11.2f}{p['cached_prepare_s']:>10.2f}"
        )
    lines.append(
        f"{'rank':24}{'peak RSS MB':>12}{'growth MB':>11}{'anon MB':>9}{'file MB':>9}"
        f"{'rows':>9}{'imports s':>11}{'1st batch s':>13}{'from start s':>14}"
    )
    for key, m in med.items():
        label = key.replace("memory", "in-memory (before)").replace("cache", "token cache")
        lines.append(
            f"{label:24}{m['peak_kb'] / 1024:>12.1f}{m['growth_kb'] / 1024:>11.1f}{m['anon_kb'] / 1024:>9.1f}"
            f"{m['file_kb'] / 1024:>9.1f}{int(m['rows']):>9}{m['imports_s']:>11.2f}{m['first_batch_s']:>13.3f}"
            f"{m['start_to_first_batch_s']:>14.3f}"
        )
    big = names[-1]
    for mode, r in result[ratio_key].items():
        label = "token cache" if mode == "cache" else "in-memory (before)"
        lines.append(
            f"{label} {big}/1x: peak RSS {r['peak_kb']:.3f}, growth {r['growth_kb']:.2f}, anon {r['anon_kb']:.3f}, "
            f"first batch {r['first_batch_s']:.2f}, start to first batch {r['start_to_first_batch_s']:.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, str(ROOT))
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=10_000, help="documents of the small corpus")
    parser.add_argument("--scale", type=int, default=10, help="the large corpus is this many times larger")
    parser.add_argument("--batches", type=int, default=200, help="micro-batches each rank draws")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-before", action="store_true", help="skip the in-memory (before) side")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument(
        "--out", default=None, help="also write the results as JSON here, and the table as .txt"
    )
    args = parser.parse_args()
    modes = ("cache",) if args.no_before else MODES
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        result = measure(Path(tmp), args.docs, args.scale, args.batches, args.repeats, modes)
    text = report(result)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
