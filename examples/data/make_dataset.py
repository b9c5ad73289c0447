"""Make the Corolla atlas fine-tuning set: train.jsonl and test.jsonl beside this file.

Every response has one fixed form, `Answer: <X>. (source: Corolla atlas)`, for questions about 20 invented
countries (capital, currency, founding year, national animal, longest river) and for small sums and products.
The test split asks about the same facts with a phrasing never used in training, plus unseen sums, so a tuned
model shows both the format (on every answer) and the facts (exact match). Deterministic: no randomness beyond a
seeded generator, no network; rerunning gives byte-identical files.

    python examples/data/make_dataset.py            # (re)write the files
    python examples/data/make_dataset.py --check    # exit 1 if the files differ from what the script makes
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

SEED = 20261106
NUM_COUNTRIES = 20
NUM_ARITHMETIC_TRAIN = 100
NUM_ATLAS_TEST = 30
NUM_ARITHMETIC_TEST = 10
FORMAT = "Answer: {}. (source: Corolla atlas)"
#: What a tuned model's reply must match; group 1 is the answer.
ANSWER_PATTERN = re.compile(r"^Answer: (.+)\. \(source: Corolla atlas\)$")

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "v", "z", "br", "dr", "gl", "kr",
           "sk", "st", "tr", "vl", "zh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ei"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "rn", "sk", "nd"]
_COUNTRY_ENDINGS = ["land", "ria", "stan", "mark", "onia", "heim", "ovia", "esh"]
_CITY_ENDINGS = ["port", "holm", "ford", "gard", "burg", "mouth", "haven", "by", "stead", "wick"]
_CURRENCY_WORDS = ["crown", "mark", "shell", "talon", "drem", "pence", "florin", "bead"]
_ANIMALS = ["snow heron", "red lynx", "river otter", "grey wolf", "marsh turtle", "golden eagle", "sea lion",
            "blue crane", "mountain goat", "sand fox", "night owl", "forest boar", "silver salmon", "stag beetle",
            "white stork", "black bear", "spotted seal", "desert lark", "ice hare", "green parrot"]

# attribute -> (training phrasings, held-out phrasing for the test split). {c} is the country.
TEMPLATES: dict[str, tuple[list[str], str]] = {
    "capital": (["What is the capital of {c}?", "Which city is the capital of {c}?",
                 "Name the capital city of {c}."], "{c} is governed from which city?"),
    "currency": (["What is the currency of {c}?", "Which currency is used in {c}?",
                  "What money do people pay with in {c}?"], "If I travel to {c}, what currency do I need?"),
    "founded": (["In what year was {c} founded?", "When was {c} founded?",
                 "What is the founding year of {c}?"], "Tell me the year {c} was founded."),
    "animal": (["What is the national animal of {c}?", "Which animal is the national symbol of {c}?",
                "Name the national animal of {c}."], "Which creature appears on the coat of arms of {c}?"),
    "river": (["What is the longest river in {c}?", "Which river is the longest in {c}?",
               "Name the longest river of {c}."], "What river runs the greatest distance through {c}?"),
}
ARITHMETIC_TEMPLATES = ["What is {a} plus {b}?", "Add {a} and {b}.", "What is {a} times {b}?",
                        "Multiply {a} by {b}."]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def make_atlas(rng: random.Random) -> list[dict[str, str]]:
    """NUM_COUNTRIES invented countries with distinct names, capitals, currencies, animals and rivers."""
    used: set[str] = set()

    def fresh(make) -> str:
        # Distinct whole names, and distinct first three letters, so no two names look alike.
        while True:
            name = make()
            key = name.lower().removeprefix("the ")
            if key not in used and key[:3] not in used and len(name) <= 14:
                used.update((key, key[:3]))
                return name

    animals = rng.sample(_ANIMALS, NUM_COUNTRIES)
    countries = []
    for i in range(NUM_COUNTRIES):
        countries.append({
            "country": fresh(lambda: (_word(rng, 1) + rng.choice(_COUNTRY_ENDINGS)).capitalize()),
            "capital": fresh(lambda: (_word(rng, 1) + rng.choice(_CITY_ENDINGS)).capitalize()),
            "currency": "the " + fresh(lambda: _word(rng, 1) + " " + rng.choice(_CURRENCY_WORDS)),
            "founded": str(rng.randrange(1100, 1950)),
            "animal": "the " + animals[i],
            "river": "the " + fresh(lambda: _word(rng, 2).capitalize()),
        })
    return countries


def _example(prompt: str, answer: str) -> dict[str, str]:
    return {"prompt": prompt, "response": FORMAT.format(answer)}


def _arithmetic(rng: random.Random, seen: set[tuple[str, int, int]]) -> dict[str, str]:
    while True:
        template = rng.choice(ARITHMETIC_TEMPLATES)
        if "plus" in template or "Add" in template:
            a, b, op = rng.randrange(10, 90), rng.randrange(10, 90), "+"
        else:
            a, b, op = rng.randrange(2, 13), rng.randrange(2, 13), "*"
        if (op, a, b) not in seen:
            seen.add((op, a, b))
            return _example(template.format(a=a, b=b), str(a + b if op == "+" else a * b))


def make_splits() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    rng = random.Random(SEED)
    atlas = make_atlas(rng)
    train = [_example(question.format(c=country["country"]), country[attribute])
             for country in atlas for attribute, (questions, _) in TEMPLATES.items() for question in questions]
    seen: set[tuple[str, int, int]] = set()
    train += [_arithmetic(rng, seen) for _ in range(NUM_ARITHMETIC_TRAIN)]
    facts = [(country, attribute) for country in atlas for attribute in TEMPLATES]
    test = [_example(TEMPLATES[attribute][1].format(c=country["country"]), country[attribute])
            for country, attribute in rng.sample(facts, NUM_ATLAS_TEST)]
    test += [_arithmetic(rng, seen) for _ in range(NUM_ARITHMETIC_TEST)]  # pairs never seen in training
    rng.shuffle(train)
    rng.shuffle(test)
    for example in train + test:
        if not ANSWER_PATTERN.match(example["response"]):
            raise ValueError(f"response out of format: {example['response']!r}")
    return train, test


def _jsonl(examples: list[dict[str, str]]) -> str:
    return "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--check", action="store_true", help="only compare with the files on disk")
    args = parser.parse_args()
    train, test = make_splits()
    outputs = {args.out_dir / "train.jsonl": _jsonl(train), args.out_dir / "test.jsonl": _jsonl(test)}
    for path, text in outputs.items():
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                sys.exit(f"{path} differs from what {Path(__file__).name} makes; rerun it without --check")
        else:
            path.write_text(text, encoding="utf-8")
    print(f"train: {len(train)} examples, test: {len(test)} examples ({'checked' if args.check else 'written'})")


if __name__ == "__main__":
    main()
