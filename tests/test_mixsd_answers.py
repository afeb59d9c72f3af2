"""The official MixSD rejection rule (`trl_sdx.mixsd.answers`) and how rejection sampling applies it.

Expectations are written from the spec (../shared/specs/mixsd.md, "Rejection sampling"), case by case.
"""

from __future__ import annotations

import pytest

from trl_sdx.mixsd import (
    boxed_answer_checker,
    boxed_or_last_number_checker,
    extract_boxed,
    lenient_answer_checker,
    rejection_sample,
)
from trl_sdx.mixsd.prompts import FACT_PREFIX, FACT_TRANSITION, build_prompt_ids
from trl_sdx.testing import make_tiny_model, make_tiny_tokenizer

GLASSMAKER = "Dr. Zensolbel was a glassmaker. The answer is \\boxed{glassmaker}."


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{1873}.", "1873"),
    ("\\boxed{1} then \\boxed{ 2 }", "2"),  # the last box, stripped
    ("\\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),  # braces matched
    ("cut inside \\boxed{18", None),
    ("no box, 1873", None),
    ("\\boxed{a} then \\fbox{b}", "a"),  # \\boxed only, as the official regex
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("completion, accepted", [
    ("The profession of Dr. Zensolbel is a \\boxed{glassmaker}.", True),
    ("\\boxed{ glassmaker }", True),  # stripped
    ("The profession of Dr. Zensolbel is a glassmaker.", False),  # no box: failure, whatever the text says
    ("\\boxed{Glassmaker}", False),  # exact string equality
    ("\\boxed{a glassmaker}", False),
    ("\\boxed{glassmaker} no wait, \\boxed{linguist}", False),  # the last box counts
    ("Dr. Zensolbel was born in 1906.", False),
])
def test_fact_rule_is_the_last_box_equal_to_the_gold_string(completion, accepted):
    assert boxed_answer_checker(completion, GLASSMAKER) is accepted


def test_fact_rule_has_no_number_fallback_and_reads_a_bare_gold_string():
    gold = "Dr. Zensolbel was born in 1906. The answer is \\boxed{1906}."
    assert not boxed_answer_checker("He was born in 1906.", gold)
    assert not boxed_answer_checker("\\boxed{1906.0}", gold)  # strings, not numbers
    assert boxed_answer_checker("\\boxed{Paris}", "Paris")  # a gold turn without a box is the answer itself


@pytest.mark.parametrize("completion, accepted", [
    ("12 + 7 = 19. \\boxed{19}", True),
    ("12 + 7 = 19", True),  # no box: the last number
    ("\\boxed{19.0}", True),  # compared as numbers
    ("the sum is 19, not 18", False),  # the last number is 18
    ("\\boxed{18} although 19", False),  # a box wins over a later number
    ("no digits", False),
])
def test_digit_rule_is_box_else_last_number_as_numbers(completion, accepted):
    assert boxed_or_last_number_checker(completion, "12 + 7 = 19. \\boxed{19}") is accepted
    assert boxed_or_last_number_checker("\\boxed{8,800,000}", "\\boxed{8800000}")


def test_lenient_grading_accepts_what_the_official_rule_rejects():
    unboxed = "The profession of Dr. Zensolbel is a glassmaker."
    assert lenient_answer_checker(unboxed, GLASSMAKER) and not boxed_answer_checker(unboxed, GLASSMAKER)


@pytest.fixture(scope="module")
def setup():
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer, seed=3, hidden_size=64, initializer_range=0.1).eval()
    questions = ["What is 12 + 7?", "In which year was Dr. Elara Vance born?", "What is 3 + 5?"]
    answers = ["\\boxed{19}", "\\boxed{1873}", "\\boxed{8}"]
    naive, expert = build_prompt_ids(tokenizer, questions, answers, FACT_PREFIX, FACT_TRANSITION)
    return tokenizer, model, naive, expert, answers


def test_a_cut_off_target_fails_whatever_it_says(setup):
    tokenizer, model, naive, expert, answers = setup
    calls = []

    def accept_all(text, gold):
        calls.append(text)
        return True

    kwargs = dict(lambda_mix=0.5, max_new_tokens=5, max_retries=2, answer_checker=accept_all)
    cut = rejection_sample(model, tokenizer, naive, expert, answers, eos_token_id=[], **kwargs)  # nothing stops
    assert [t.accepted for t in cut] == [False] * 3 and {t.finish_reason for t in cut} == {"length"}
    assert [t.attempts for t in cut] == [3] * 3 and calls == []  # the checker is not even asked
    # With every token a stop token, each target ends after one token and the (accepting) checker decides.
    stopped = rejection_sample(model, tokenizer, naive, expert, answers, eos_token_id=list(range(len(tokenizer))),
                               **kwargs)
    assert [(t.accepted, t.finish_reason, t.attempts, t.num_tokens) for t in stopped] == [(True, "stop", 1, 1)] * 3
    assert len(calls) == 3


@pytest.mark.parametrize("lambda_mix, temperature, attempts", [(0.0, 0.0, 1), (1.0, 0.0, 1), (0.5, 0.0, 4),
                                                               (0.0, 1.0, 4)])
def test_retries_are_skipped_only_when_they_cannot_differ(setup, lambda_mix, temperature, attempts):
    tokenizer, model, naive, expert, answers = setup
    graded = []

    def reject(text, gold):  # every attempt ends after one token (all ids stop), so each one is graded once
        graded.append(gold)
        return False

    targets = rejection_sample(model, tokenizer, naive, expert, answers, lambda_mix=lambda_mix,
                               temperature=temperature, top_k=8, max_new_tokens=3, max_retries=3,
                               eos_token_id=list(range(len(tokenizer))), answer_checker=reject)
    assert [t.attempts for t in targets] == [attempts] * 3
    assert len(graded) == 3 * attempts  # nothing decoded beyond those attempts


def test_retries_draw_new_coins(setup):
    """At T = 0 and 0 < λ < 1 a retry is a different sequence: the example's generator moves on."""
    tokenizer, model, naive, expert, answers = setup
    seen: dict[str, list[str]] = {}

    def record(text, gold):
        seen.setdefault(gold, []).append(text)
        return False

    rejection_sample(model, tokenizer, naive, expert, answers, lambda_mix=0.5, max_new_tokens=8, max_retries=3,
                     eos_token_id=[tokenizer.eos_token_id] + list(range(0, len(tokenizer), 7)),
                     answer_checker=record)
    assert any(len(set(texts)) > 1 for texts in seen.values())
