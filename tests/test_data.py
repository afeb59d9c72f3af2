import pytest

from trl_sdx.data import SYNTHETIC_DATASETS, make_arithmetic_dataset, make_knowledge_dataset
from trl_sdx.rewards import boxed_answer_reward


def test_arithmetic_rows_are_prompt_only_conversations_with_integer_answers():
    ds = make_arithmetic_dataset(50, seed=1)
    assert ds.column_names == ["prompt", "answer"]
    for row in ds:
        assert row["prompt"][0]["role"] == "user" and "\\boxed{}" in row["prompt"][0]["content"]
        assert int(row["answer"]) >= 0


def test_arithmetic_answers_are_correct():
    # Recompute every answer from the text: the reward is only as good as the labels.
    import re

    for difficulty in (1, 2, 3):
        for row in make_arithmetic_dataset(40, seed=2, difficulty=difficulty):
            text = row["prompt"][0]["content"]
            nums = [int(x) for x in re.findall(r"\d+", text)]
            if "boxes with" in text:
                value = nums[0] * nums[1]
                rest = nums[2:]
            elif "gives away" in text:
                value, rest = nums[0] - nums[1], nums[2:]
            else:
                value, rest = nums[0] + nums[1], nums[2:]
            assert str(value + sum(rest)) == row["answer"], text


def test_deterministic_and_prefix_stable():
    a = make_arithmetic_dataset(20, seed=7)
    assert a[:] == make_arithmetic_dataset(20, seed=7)[:]
    assert make_arithmetic_dataset(30, seed=7)[:20] == a[:]
    assert make_arithmetic_dataset(20, seed=8)[:] != a[:]


def test_difficulty_grows_numbers():
    easy = [int(a) for a in make_arithmetic_dataset(100, difficulty=1)["answer"]]
    hard = [int(a) for a in make_arithmetic_dataset(100, difficulty=3)["answer"]]
    assert max(easy) < 200 and sum(hard) / len(hard) > 10 * sum(easy) / len(easy)
    with pytest.raises(ValueError, match="difficulty"):
        make_arithmetic_dataset(3, difficulty=0)


def test_knowledge_base_facts_and_probes():
    kb = make_knowledge_dataset(25, seed=0)
    train, probe = kb["train"], kb["probe"]
    assert len(train) == 50 and len(set(train["question"])) == 50
    assert set(train["domain"]) == {"person", "city", "company", "mineral", "ship"}
    # Gold answers grade as correct against their own value; probes share no entity with the facts.
    assert boxed_answer_reward(train["answer"], train["value"]) == [1.0] * 50
    assert boxed_answer_reward(probe["answer"], probe["value"]) == [1.0] * len(probe)
    entities = set(train["entity"])
    assert not any(e in q for q in probe["question"] for e in entities)
    assert make_knowledge_dataset(25, seed=0)["train"][:] == train[:]
    assert make_knowledge_dataset(25, seed=1)["train"]["value"] != train["value"]


def test_synthetic_names_registered():
    assert set(SYNTHETIC_DATASETS) == {"synthetic-arithmetic", "synthetic-knowledge"}
