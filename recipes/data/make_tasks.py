"""Write the labelled and the prompt/response data of the fine-tuning recipes, from make_corpus's grammar.

    python recipes/data/make_tasks.py

- topics.jsonl: {"text", "label"}, one sentence each; the label is what it is about
  (0 weather, 1 trade and goods, 2 how someone felt, 3 meeting and talk). bert_finetune.yaml
  trains a sequence classifier on it.
- questions.jsonl: {"prompt", "response"}: "Where did Ada carry the jar of honey?" ->
  "to the market, in the morning.": llama_sft.yaml learns to answer from the prompt.

Both are reproducible byte for byte (a fixed seed).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from make_corpus import (  # noqa: E402  (the grammar beside this file)
    BECAUSE, FEELINGS, GOODS, NAMES, NUMBERS, PEOPLE, PLACES, THINGS, TIMES, VERBS, WEATHER,
)  # fmt: skip

TOPICS = ("weather", "trade", "feeling", "meeting")


def labelled(rng: random.Random) -> dict[str, object]:
    who, label = rng.choice(PEOPLE + NAMES), rng.randrange(len(TOPICS))
    if label == 0:
        text = f"{rng.choice(TIMES)} {rng.choice(WEATHER)}, and {who} stayed at {rng.choice(PLACES)}."
    elif label == 1:
        verb, prep = rng.choice(VERBS[:3])
        goods = rng.choice([f"{rng.choice(NUMBERS)} {rng.choice(GOODS)}", rng.choice(THINGS)])
        text = f"{who} {verb} {goods} {prep} {rng.choice(PLACES)}."
    elif label == 2:
        text = f"{who} was {rng.choice(FEELINGS)} because {rng.choice(BECAUSE)}."
    else:
        text = f"{who} met {rng.choice(PEOPLE + NAMES)} at {rng.choice(PLACES)} and they talked for a while."
    return {"text": text[:1].upper() + text[1:], "label": label}


def question(rng: random.Random) -> dict[str, str]:
    who, (verb, prep) = rng.choice(NAMES), rng.choice(VERBS)
    thing, place, time = rng.choice(THINGS), rng.choice(PLACES), rng.choice(TIMES)
    base = {"carried": "carry", "brought": "bring", "sold": "sell", "found": "find", "left": "leave",
            "repaired": "repair", "painted": "paint", "hid": "hide"}[verb]  # fmt: skip
    story = f"{who} {verb} {thing} {prep} {place} {time}."
    return {
        "prompt": f"{story[:1].upper() + story[1:]}\nQuestion: where did {who} {base} {thing}?\nAnswer:",
        "response": f" {prep} {place}.",
    }


def main() -> None:
    here = Path(__file__).parent
    rng = random.Random(20261202)
    for name, make, count in (("topics.jsonl", labelled, 2000), ("questions.jsonl", question, 2000)):
        out = here / name
        out.write_text("".join(json.dumps(make(rng)) + "\n" for _ in range(count)))
        print(f"wrote {out} ({out.stat().st_size:,} bytes, {count} records)")


if __name__ == "__main__":
    main()
