"""A task the CPU demo model can solve: single-digit additions.

Phase 1 keeps only *verified-correct* revisions, so it needs a model that is sometimes right. SmolLM2-135M-Instruct
(the embedded offline model) solves about 1 in 5 of "What is a + b?" with single digits at temperature 1, and
essentially none of `trl_sdx.data.make_arithmetic_dataset`'s word problems, which would leave D_rev empty.
"""

from __future__ import annotations

import random

from datasets import Dataset


def make_single_digit_dataset(n: int, seed: int = 0) -> Dataset:
    """`n` conversational prompts "What is a + b?" (1 <= a, b <= 9) with the sum as `answer`; deterministic."""
    rows = {"prompt": [], "answer": []}
    for i in range(n):
        rng = random.Random(f"single-digit-{seed}-{i}")
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows["prompt"].append([{"role": "user", "content": f"What is {a} + {b}?"}])
        rows["answer"].append(str(a + b))
    return Dataset.from_dict(rows)
