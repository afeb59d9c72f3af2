import pytest

from trl_sdx.rewards import answers_match, boxed_answer_reward, extract_final_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}"),
        ("first \\boxed{2}, on reflection \\boxed{5}", "5"),
        ("It is 1,234 apples", "1,234"),
        ("3 plus 4 gives 7", "7"),
        ("no digits here", None),
        ("", None),
        ("\\boxed{x^{2}}", "x^{2}"),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_fractions_and_thousands_separators():
    assert answers_match("\\frac{3}{4}", "3/4")
    assert answers_match("0.75", "3/4")
    assert answers_match("1,000", "1000")
    assert answers_match("1,234,567", "1234567")
    assert not answers_match("1,001", "1000")
    assert not answers_match(None, "3")


def test_reward_plain_and_conversational():
    completions = [
        "The total is \\boxed{1,000}.",          # thousands separator
        "\\boxed{\\frac{1}{2}}",                 # fraction vs decimal gold
        "Try \\boxed{3}. Wait, \\boxed{4}.",     # several boxes: the last counts
        "Try \\boxed{4}. Wait, \\boxed{3}.",
        "I think the answer is 12",             # no box: last number
        "I have no idea",                        # nothing to grade
    ]
    gold = ["1000", "0.5", "4", "4", "12", "12"]
    assert boxed_answer_reward(completions, gold) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    conversational = [[{"role": "assistant", "content": c}] for c in completions]
    assert boxed_answer_reward(conversational, answer=gold, prompts=None) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]


def test_reward_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        boxed_answer_reward(["a", "b"], ["1"])
