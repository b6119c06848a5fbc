"""Writes demo.json beside this file: the small instruction set `make demo` fine-tunes on.

    python train/demo_data/make_demo.py     # rewrites train/demo_data/demo.json (seeded: the same file each time)

Short, regular tasks with checkable answers, each in a form without input (the question names the
word) and a form with input (the word is the input); train/demo_data/README.md lists them.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

WORDS = ("cat dog sun red box cup hat pen map bus egg fox jam key leg net owl pig toy van "
         "bird fish moon star tree book lamp frog cake ring milk rain door ship coat drum kite lion rose wolf").split()
ANTONYMS = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("old", "new"),
            ("light", "dark"), ("open", "closed"), ("full", "empty"), ("early", "late"), ("high", "low"),
            ("hard", "soft"), ("wet", "dry"), ("rich", "poor"), ("strong", "weak"), ("long", "short"),
            ("loud", "quiet"), ("good", "bad"), ("day", "night"), ("in", "out")]
CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "China": "Beijing", "Egypt": "Cairo", "Canada": "Ottawa", "Russia": "Moscow", "Kenya": "Nairobi",
            "Peru": "Lima", "Greece": "Athens", "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw",
            "Austria": "Vienna", "Portugal": "Lisbon", "Ireland": "Dublin", "Cuba": "Havana", "Thailand": "Bangkok",
            "Turkey": "Ankara", "Australia": "Canberra", "Finland": "Helsinki", "Hungary": "Budapest"}


def ex(instruction: str, output: object, input: str = "") -> dict:
    return {"instruction": instruction, "input": input, "output": str(output)}


def generate(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for country, capital in CAPITALS.items():
        out += [ex(f"What is the capital of {country}?", capital),
                ex("Name the capital city of this country.", capital, country)]
    for a, b in ANTONYMS:
        for word, opposite in ((a, b), (b, a)):
            out += [ex(f"What is the opposite of {word}?", opposite),
                    ex("Give the opposite of the word.", opposite, word)]
    pairs = [(a, b) for a in range(10) for b in range(10)]
    for i, (a, b) in enumerate(rng.sample(pairs, 60)):
        out.append(ex(f"What is {a} plus {b}?", a + b) if i % 2 else ex("Add the two numbers.", a + b, f"{a} + {b}"))
    pairs = [(a, b) for a in range(13) for b in range(10) if b <= a]
    for i, (a, b) in enumerate(rng.sample(pairs, 40)):
        out.append(ex(f"What is {a} minus {b}?", a - b) if i % 2
                   else ex("Subtract the second number from the first.", a - b, f"{a} - {b}"))
    for letter, following in zip(string.ascii_lowercase, string.ascii_lowercase[1:], strict=False):
        out += [ex(f"Which letter comes after {letter}?", following),
                ex("Give the next letter of the alphabet.", following, letter)]
    for n in range(20):
        out += [ex(f"What number comes after {n}?", n + 1), ex("Give the next number.", n + 1, str(n))]
    for word in rng.sample(WORDS, 30):
        out.append(ex("Write the word in capital letters.", word.upper(), word))
    for word in rng.sample(WORDS, 30):
        out.append(ex("Write the word in small letters.", word, word.upper()))
    for i, word in enumerate(rng.sample(WORDS, len(WORDS))):
        out.append(ex(f"Spell {word} backwards.", word[::-1]) if i % 3 == 0
                   else ex("Reverse the letters of the word.", word[::-1], word))
    for word in WORDS:
        n = rng.randint(2, 4)
        out.append(ex(f"Repeat the word {word} {n} times.", " ".join([word] * n)))
    for word in rng.sample(WORDS, 20):
        out.append(ex("Repeat the word three times.", " ".join([word] * 3), word))
    rng.shuffle(out)
    return out


if __name__ == "__main__":
    records = generate()
    keys = [(r["instruction"], r["input"]) for r in records]
    assert len(set(keys)) == len(keys), "duplicate (instruction, input)"
    path = Path(__file__).with_name("demo.json")
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(records)} examples to {path}")
