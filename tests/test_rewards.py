"""Answer checks: strict by default (an unboxed or cut-off answer is wrong), lenient only on request."""

import pytest

from trl_sdx.rewards import (
    answers_match,
    boxed_answer_reward,
    extract_boxed_answer,
    extract_final_answer,
    lenient_answer_reward,
    math_verify_reward,
)


@pytest.mark.parametrize(
    "text, boxed, lenient",
    [
        ("so the answer is \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}", "\\frac{3}{4}"),
        ("first \\boxed{2}, on reflection \\boxed{5}", "5", "5"),
        ("It is 1,234 apples", None, "1,234"),
        ("3 plus 4 gives 7", None, "7"),
        ("cut off inside the box: \\boxed{1", None, "1"),
        ("no digits here", None, None),
        ("", None, None),
        ("\\boxed{x^{2}}", "x^{2}", "x^{2}"),
    ],
)
def test_strict_and_lenient_extraction(text, boxed, lenient):
    assert extract_boxed_answer(text) == boxed
    assert extract_final_answer(text) == lenient


def test_fractions_and_thousands_separators():
    assert answers_match("\\frac{3}{4}", "3/4")
    assert answers_match("0.75", "3/4")
    assert answers_match("1,000", "1000")
    assert answers_match("1,234,567", "1234567")
    assert not answers_match("1,001", "1000")
    assert not answers_match(None, "3")


COMPLETIONS = [
    "The total is \\boxed{1,000}.",          # thousands separator
    "\\boxed{\\frac{1}{2}}",                 # fraction vs decimal gold
    "Try \\boxed{3}. Wait, \\boxed{4}.",     # several boxes
    "Try \\boxed{4}. Wait, \\boxed{3}.",
    "I think the answer is 12",             # no box: the right number, unboxed
    "So far: 5 + 7 = 12, then we carry \\boxed{1",  # cut off inside the box
    "The answer is $12$.",                   # LaTeX but no box
    "I have no idea",                        # nothing to grade
]
GOLD = ["1000", "0.5", "4", "4", "12", "12", "12", "12"]


def test_phase1_check_grades_the_last_box_and_nothing_else():
    assert boxed_answer_reward(COMPLETIONS, GOLD) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    conversational = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    assert boxed_answer_reward(conversational, answer=GOLD, prompts=None) == boxed_answer_reward(COMPLETIONS, GOLD)


def test_phase2_check_is_math_verify_against_the_boxed_reference():
    # math-verify reads every box: two different boxed values are a set, which is not the single reference
    assert math_verify_reward(COMPLETIONS, GOLD) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert math_verify_reward(["so \\boxed{4}, and again \\boxed{4}"], ["4"]) == [1.0]


def test_lenient_check_credits_unboxed_and_cut_off_numbers():
    assert lenient_answer_reward(COMPLETIONS, GOLD) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert lenient_answer_reward(["we carry \\boxed{1"], ["1"]) == [1.0]  # the cut-off box's last number


@pytest.mark.parametrize("reward", [boxed_answer_reward, math_verify_reward, lenient_answer_reward])
def test_reward_length_mismatch_is_an_error(reward):
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        reward(["a", "b"], ["1"])


def test_sdzero_defaults_are_the_strict_checks():
    from trl_sdx.sdzero.rewards import PHASE1_DEFAULT_REWARD, PHASE2_DEFAULT_REWARD, resolve_reward_funcs

    assert PHASE1_DEFAULT_REWARD is boxed_answer_reward and PHASE2_DEFAULT_REWARD is math_verify_reward
    assert resolve_reward_funcs(None)[0] == [math_verify_reward]
    assert resolve_reward_funcs(None, default=boxed_answer_reward)[0] == [boxed_answer_reward]
