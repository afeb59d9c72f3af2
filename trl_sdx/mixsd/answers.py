"""The official MixSD rejection rule: which mixed targets count as giving the gold answer.

`mixsd/mix_distribution_sampling.py` of the official code extracts a comparable answer from the generated text and
from the gold answer turn with the same rule, and accepts the target when the two are equal:

- fact QA (KGFact, SimpleQA), `boxed`: the content of the last brace-matched `\\boxed{...}`, stripped, must equal
  the gold string exactly. No box means failure; there is no "last number" fallback.
- digit operations (KGFunc), `boxed_or_last_number`: the last `\\boxed{...}`, else the last number, compared as
  numbers (so `\\boxed{1,000}` and `1000.0` match 1000).

A target cut off by `max_new_tokens` fails whatever it contains (`rejection_sample` checks that, not the checker).
These checkers are deliberately strict and math-verify-free: the lenient grading used for evaluation lives in
`evaluation.lenient_answer_checker`.
"""

from __future__ import annotations

import re

# A number, with optional thousands separators and decimals: "-12", "8,800,000", "3.5".
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (nested braces balanced), stripped; None without a closed box."""
    from trl_sdx.rewards import extract_boxed_answer

    return extract_boxed_answer(text, openers=("\\boxed{",))


def extract_last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None


def boxed_answer_checker(completion: str, gold: str) -> bool:
    """Fact QA (official `extract_mode="boxed"`): last `\\boxed{}` of both texts, stripped, equal as strings.

    The gold turn's own box is its answer; a gold turn without one is a bare answer string (e.g. "glassmaker").
    """
    predicted = extract_boxed(completion)
    if predicted is None:
        return False
    expected = extract_boxed(gold)
    return predicted == (gold.strip() if expected is None else expected)


def boxed_or_last_number_checker(completion: str, gold: str) -> bool:
    """Digit operations (official `extract_mode="boxed_or_last_number"`): last `\\boxed{}`, else last number,
    compared as numbers (as strings when either is not a number)."""
    predicted = extract_boxed(completion)
    if predicted is None:
        predicted = extract_last_number(completion)
    expected = extract_boxed(gold)
    if expected is None:
        expected = extract_last_number(gold)
    if expected is None:
        expected = gold.strip()
    if predicted is None:
        return False
    a, b = _as_number(predicted), _as_number(expected)
    if a is not None and b is not None:
        return a == b
    return predicted == expected
