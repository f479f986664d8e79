"""The quickstart's tasks: letter strings rewritten three ways, checkable by a program.

    copy     Q: c a f\nA:  ->  " c a f"     (what the base model is pre-trained on)
    upper    Q: c a f\nA:  ->  " C A F"     (adapter 1)
    shift    Q: c a f\nA:  ->  " d b g"     (adapter 2: each letter moved one place along the alphabet)

Every task shares the prompt format, so a model can be scored on any task's prompts: an adapter should solve its
own task and fail the other, the base should fail both. The data files in `data/` are written by `python -m
ortlora.quickstart.tasks` (fixed seed) and ship with the package.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).parent / "data"
LETTERS = "abcdefghijklmnop"
TASKS = {
    "copy": lambda xs: xs,
    "upper": lambda xs: [c.upper() for c in xs],
    "shift": lambda xs: [LETTERS[(LETTERS.index(c.lower()) + 1) % len(LETTERS)] for c in xs],
}
ADAPTER_TASKS = ("upper", "shift")


def example(letters: list[str], task: str) -> dict[str, str]:
    return {"prompt": "Q: " + " ".join(letters) + "\nA:", "response": " " + " ".join(TASKS[task](letters))}


def load(name: str) -> list[dict[str, str]]:
    with open(DATA / f"{name}.jsonl") as f:
        return [json.loads(line) for line in f]


def write_data(n_train: int = 3000, n_test: int = 64, seed: int = 0) -> None:
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()

    def draw() -> list[str]:
        while True:
            xs = [rng.choice(LETTERS) for _ in range(rng.randint(3, 6))]
            if tuple(xs) not in seen:
                seen.add(tuple(xs))
                return xs

    test = [draw() for _ in range(n_test)]  # held out: never in any training file
    DATA.mkdir(exist_ok=True)
    for task in TASKS:
        train = [draw() for _ in range(n_train)]
        if task == "copy":  # the base also copies capitals, so it knows those tokens before `upper` needs them
            train = [[c.upper() for c in xs] if i % 2 else xs for i, xs in enumerate(train)]
        for name, rows in ((f"{task}_train", train), (f"{task}_test", test)):
            with open(DATA / f"{name}.jsonl", "w") as f:
                f.writelines(json.dumps(example(xs, task)) + "\n" for xs in rows)


if __name__ == "__main__":
    write_data()
