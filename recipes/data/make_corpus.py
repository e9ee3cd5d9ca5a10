"""Write recipes/data/corpus.txt: a small English corpus for the shipped recipes and the tests.

The text comes from a hand-written grammar about a harbour town, so it has
real regularities (agreement, word order, recurring facts) that a masked-LM
can learn in a few hundred steps, and it is reproducible byte for byte:

    python recipes/data/make_corpus.py
"""

from __future__ import annotations

import random
from pathlib import Path

PEOPLE = ["the baker", "the fisherman", "the teacher", "the mayor", "the doctor", "the sailor", "the painter",
          "the farmer", "the librarian", "the engineer", "the old captain", "the young clerk", "my neighbour",
          "the station master", "the carpenter", "the weaver"]
NAMES = ["Ada", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Leo",
         "Mara", "Nils", "Olga", "Pavel", "Rosa", "Sami", "Tilda", "Viktor"]
PLACES = ["the harbour", "the market", "the old bridge", "the lighthouse", "the train station", "the bakery",
          "the library", "the town square", "the north pier", "the hill above the town", "the school",
          "the fish hall", "the river bank", "the chapel", "the boatyard", "the post office"]
THINGS = ["a basket of bread", "a crate of apples", "a heavy net", "a bundle of letters", "a painted boat",
          "a new lantern", "a sack of flour", "a box of nails", "a map of the coast", "a jar of honey",
          "a wooden chair", "a roll of canvas", "a barrel of salt", "a brass bell", "a warm blanket"]
TIMES = ["in the morning", "at noon", "in the evening", "before dawn", "after the storm", "on market day",
         "every sunday", "late at night", "in early spring", "at the end of summer", "during the winter"]
WEATHER = ["the wind came from the sea", "rain fell on the roofs", "the fog covered the harbour",
           "the sun warmed the stones", "snow lay on the hills", "the sky was clear and cold",
           "a storm moved along the coast", "the tide was very low"]
VERBS = [("carried", "to"), ("brought", "to"), ("sold", "at"), ("found", "near"), ("left", "at"),
         ("repaired", "behind"), ("painted", "beside"), ("hid", "under")]
FEELINGS = ["happy", "tired", "worried", "proud", "surprised", "calm", "hungry", "cold"]
BECAUSE = ["the work was finished", "the boats had returned", "the price of fish had fallen",
           "a letter had arrived from the city", "the bridge was closed", "the harvest was good",
           "the lighthouse lamp was broken", "the train was late again"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve"]
GOODS = ["boats", "lanterns", "baskets", "letters", "apples", "nets", "chairs", "bells"]


def sentence(rng: random.Random) -> str:
    who = rng.choice(PEOPLE + NAMES)
    kind = rng.randrange(8)
    if kind == 0:
        verb, prep = rng.choice(VERBS)
        return f"{who} {verb} {rng.choice(THINGS)} {prep} {rng.choice(PLACES)} {rng.choice(TIMES)}."
    if kind == 1:
        return f"{rng.choice(TIMES)} {rng.choice(WEATHER)}, and {who} stayed at {rng.choice(PLACES)}."
    if kind == 2:
        return f"{who} was {rng.choice(FEELINGS)} because {rng.choice(BECAUSE)}."
    if kind == 3:
        n, goods = rng.choice(NUMBERS), rng.choice(GOODS)
        return f"there were {n} {goods} at {rng.choice(PLACES)}, and {who} counted them twice."
    if kind == 4:
        other = rng.choice(PEOPLE + NAMES)
        return f"{who} met {other} at {rng.choice(PLACES)} and they talked about the weather."
    if kind == 5:
        return f"when {rng.choice(WEATHER)}, {who} walked from {rng.choice(PLACES)} to {rng.choice(PLACES)}."
    if kind == 6:
        verb, prep = rng.choice(VERBS)
        return f"nobody knew why {who} {verb} {rng.choice(THINGS)} {prep} {rng.choice(PLACES)}."
    return f"{who} said that {rng.choice(BECAUSE)}, so the town was quiet {rng.choice(TIMES)}."


def paragraph(rng: random.Random) -> str:
    text = " ".join(sentence(rng) for _ in range(rng.randint(3, 7)))
    return ". ".join(s[:1].upper() + s[1:] for s in text.split(". "))


def main() -> None:
    rng = random.Random(20261125)
    lines = [paragraph(rng) for _ in range(1200)]
    out = Path(__file__).with_name("corpus.txt")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} ({out.stat().st_size:,} bytes, {len(lines)} paragraphs)")


if __name__ == "__main__":
    main()
