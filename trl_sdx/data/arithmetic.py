"""Arithmetic word problems with an integer answer: the verifiable task of the demos and tests."""

from __future__ import annotations

import random

from datasets import Dataset

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

_NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Milo"]
_ITEMS = ["apples", "marbles", "books", "coins", "stickers", "pencils", "cookies", "shells"]


def _operand(rng: random.Random, difficulty: int) -> int:
    # difficulty d draws operands with up to d+1 digits: 1 → 1..99, 2 → 1..999, ...
    return rng.randint(1, 10 ** (difficulty + 1) - 1)


def _problem(rng: random.Random, difficulty: int) -> tuple[str, int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = _operand(rng, difficulty), _operand(rng, difficulty)
    kind = rng.choice(["add", "sub", "mul"] if difficulty > 1 else ["add", "sub"])
    if kind == "add":
        story, value = f"{name} has {a} {item} and gets {b} more.", a + b
    elif kind == "sub":
        a, b = max(a, b), min(a, b)
        story, value = f"{name} has {a} {item} and gives away {b}.", a - b
    else:
        b = rng.randint(2, 9)
        story, value = f"{name} buys {b} boxes with {a} {item} in each box.", a * b
    # Extra steps make harder problems multi-step rather than only bigger numbers.
    for _ in range(max(0, difficulty - 2)):
        c = _operand(rng, 1)
        story += f" Then {name} finds {c} more."
        value += c
    return f"{story} How many {item} does {name} have now?", value


def make_arithmetic_dataset(n: int = 256, seed: int = 0, difficulty: int = 1) -> Dataset:
    """`n` prompt-only conversational rows: `prompt` (a user message) and `answer` (the integer, as a string).

    Deterministic for a given (n, seed, difficulty); row i does not depend on n, so a larger set
    extends a smaller one. `difficulty` >= 1 grows the operands and the number of steps.
    """
    if difficulty < 1:
        raise ValueError(f"`difficulty` must be >= 1, got {difficulty}.")
    rows = {"prompt": [], "answer": []}
    for i in range(n):
        rng = random.Random(f"arith-{seed}-{difficulty}-{i}")
        text, value = _problem(rng, difficulty)
        rows["prompt"].append([{"role": "user", "content": f"{text} {INSTRUCTION}"}])
        rows["answer"].append(str(value))
    return Dataset.from_dict(rows)
