"""The trainer tests' data: a distinctive answer format the base model never uses, and the
test corpus RAFT and the relevance pairs search."""

import json
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"

THINGS = ["apple", "carrot", "salmon", "granite", "oak tree", "bicycle", "violin", "tiger",
          "banana", "copper", "rose", "laptop", "whale", "potato", "diamond", "eagle",
          "cherry", "hammer", "spinach", "shark", "mango", "iron", "tulip", "piano", "lemon",
          "wolf", "onion", "silver", "pine tree", "guitar", "owl", "peach", "drum", "cabbage",
          "gold", "lily", "dolphin", "pear"]
QUESTIONS = ["Is a {} alive?", "Can you eat a {}?", "Is a {} bigger than a house?",
             "Does a {} grow?", "Is a {} made by people?"]
HELD_OUT = 8  # the last things: never trained on


def example(index: int, thing: str) -> dict:
    question = QUESTIONS[index % len(QUESTIONS)].format(thing)
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": f"VERDICT: it depends on the {thing}."
                                                          " [done]"}]}


EXAMPLES = [example(i, thing) for i, thing in enumerate(THINGS)]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path
