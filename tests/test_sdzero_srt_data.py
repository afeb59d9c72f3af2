"""SD-Zero Phase 1 data rules, on hand-built tuples: cleaning, deduplication, the stage split, the SFT strings, the
collection prompts handed to the sampler, revise-correct off by default, the revision stop, and the released
defaults."""

import re

import pytest
from datasets import Dataset

from trl_sdx.sdzero.srt_collect import _cut_at_stop_strings, collect_revisions
from trl_sdx.sdzero.srt_config import SRTConfig
from trl_sdx.sdzero.srt_data import (
    format_generation_example,
    format_revision_example,
    prepare_srt_data,
    split_revisions,
    strip_sycophantic_opening,
    trim_repeating_tail,
)
from trl_sdx.testing import make_tiny_tokenizer

P1, P0 = "Let me rephrase the above solution.", "Wait, this response is wrong. Let me correct it."
X = [{"role": "user", "content": "What is 2 + 3?"}]


def _tuple(i, init_reward, y_init=None, y_revised=None, prompt=None):
    return {"prompt": prompt or [{"role": "user", "content": f"Problem {i}?"}], "answer": str(i),
            "y_init": y_init or f"init {i}", "init_reward": init_reward,
            "control_phrase": P1 if init_reward else P0, "y_revised": y_revised or f"revised {i} \\boxed{{{i}}}"}


# --------------------------------------------------------------------------------------------------------- cleaning
def test_repeating_tail_is_cut_to_one_copy():
    loop = "Let me check again. "
    trimmed = trim_repeating_tail("So x = 4. " + loop * 12)
    # one copy is kept (the periodic region starts at the ". " before the loop, so the copy kept ends there)
    assert trimmed.startswith("So x = 4. Let me check again") and trimmed.count("check again") == 1
    assert trim_repeating_tail("So x = 4. " + loop * 2) == "So x = 4. " + loop * 2  # two copies: not a loop
    assert trim_repeating_tail("abcabcabcabc") == "abcabcabcabc"  # period 3 < the 10-character minimum
    text = "A proof with no repeats at all, \\boxed{7}."
    assert trim_repeating_tail(text) == text


@pytest.mark.parametrize("text, expected", [
    ("You're absolutely right — the sum is 5. \\boxed{5}", "The sum is 5. \\boxed{5}"),
    ("Yes, you are right, let me redo it: 2 + 3 = 5.", "Let me redo it: 2 + 3 = 5."),
    ("You are right to question the carry. 2 + 3 = 5.", "2 + 3 = 5."),
    ("Thank you for pointing that out! the sum is 5.", "The sum is 5."),
    ("Great question. 2 + 3 = 5.", "2 + 3 = 5."),
    ("Good catch! You're right, we get 5.", "We get 5."),
    ("Nice observation - so the sum is 5.", "So the sum is 5."),
    ("Let me redo it: 2 + 3 = 5.", "Let me redo it: 2 + 3 = 5."),  # nothing to strip: unchanged
    ("the right answer is 5", "the right answer is 5"),  # not an opening: not re-capitalised
])
def test_sycophantic_openings_are_stripped(text, expected):
    assert strip_sycophantic_opening(text) == expected


def test_cleaning_and_deduplication_counts():
    loop = "I will verify once more. "
    records = [
        _tuple(1, 0, y_init="2 + 3 = 6. " + loop * 5, y_revised="You're right — it is 5. \\boxed{5}"),
        _tuple(1, 0, y_init="2 + 3 = 6. " + loop * 9, y_revised="It is 5. \\boxed{5}"),  # same after cleaning
        _tuple(2, 0),
        _tuple(2, 0),  # an exact duplicate
    ]
    sets, counts = prepare_srt_data(records, stage2_size=1, seed=0)
    assert counts["tuples"] == 4 and counts["duplicates_removed"] == 2
    assert counts["tails_trimmed"] == 2 and counts["openings_stripped"] == 1
    assert len(sets["generation"]) + len(sets["revision"]) == 2
    all_text = str(sets["generation"][:]) + str(sets["revision"][:])
    assert loop * 2 not in all_text and "You're right" not in all_text

    raw, raw_counts = prepare_srt_data(records, stage2_size=1, seed=0, clean=False)
    assert raw_counts["duplicates_removed"] == 1 and raw_counts["tails_trimmed"] == 0
    assert len(raw["generation"]) + len(raw["revision"]) == 3


# ------------------------------------------------------------------------------------------------------------ split
def test_stage2_quota_goes_to_correct_init_first_and_stage1_is_incorrect_only():
    correct = [_tuple(i, 1) for i in range(3)]
    incorrect = [_tuple(10 + i, 0) for i in range(5)]
    stage1, stage2 = split_revisions(correct + incorrect, stage2_size=4, seed=0)
    assert sorted(r["answer"] for r in stage2 if r["init_reward"] == 1) == ["0", "1", "2"]  # every correct one
    assert sum(r["init_reward"] == 0 for r in stage2) == 1  # the quota filled with incorrect-init
    assert len(stage1) == 4 and all(r["init_reward"] == 0 for r in stage1)
    incorrect_answers = sorted(r["answer"] for r in incorrect)
    assert sorted(r["answer"] for r in stage1 + stage2 if r["init_reward"] == 0) == incorrect_answers

    # a small quota: correct-init tuples beyond it are unused, never moved to stage 1
    stage1, stage2 = split_revisions(correct + incorrect, stage2_size=2, seed=0)
    assert [r["init_reward"] for r in stage2] == [1, 1] and len(stage1) == 5
    assert all(r["init_reward"] == 0 for r in stage1)


def test_stage2_is_shuffled_and_the_split_is_seeded():
    records = [_tuple(i, 1) for i in range(3)] + [_tuple(10 + i, 0) for i in range(5)]
    orders = {tuple(r["answer"] for r in split_revisions(records, 6, seed)[1]) for seed in range(8)}
    assert len(orders) > 1  # the order depends on the seed ...
    positions = {[r["init_reward"] for r in split_revisions(records, 6, seed)[1]].index(0) for seed in range(8)}
    assert positions != {3}  # ... and the incorrect-init tuples are not simply appended after the correct ones
    assert split_revisions(records, 6, 3) == split_revisions(records, 6, 3)


def test_empty_stage1_and_no_revise_correct_counts():
    _, counts = prepare_srt_data([_tuple(i, 1) for i in range(3)] + [_tuple(9, 0)], stage2_size=2, seed=0)
    assert counts["stage2_revision"] == 2 and counts["stage2_from_correct"] == 2
    assert counts["stage1_generation"] == 1 and counts["correct_init_unused"] == 1


# ------------------------------------------------------------------------------------------------------ SFT strings
def test_sft_rows_follow_the_spec_exactly():
    system = "Please reason step by step, and put your final answer within \\boxed{}."
    record = _tuple(5, 0, y_init="It is 6.", y_revised="2 + 3 = 5. \\boxed{5}", prompt=X)
    assert format_generation_example(record, system) == {
        "prompt": [{"role": "system", "content": system}, X[0]],
        "completion": [{"role": "assistant", "content": f"It is 6.\n\n{P0}\n\n2 + 3 = 5. \\boxed{{5}}"}],
    }
    assert format_revision_example(record, system) == {
        "prompt": [{"role": "system", "content": system},
                   {"role": "user", "content": f"What is 2 + 3?\n\nIt is 6.\n\n{P0}"}],
        "completion": [{"role": "assistant", "content": "2 + 3 = 5. \\boxed{5}"}],
    }
    own_system = [{"role": "system", "content": "Be brief."}, *X]  # a prompt's own system turn is kept
    assert format_generation_example({**record, "prompt": own_system}, system)["prompt"] == own_system
    plain = {**record, "prompt": "Q?", "y_init": "a", "control_phrase": "P", "y_revised": "b"}
    assert format_generation_example(plain, system) == {"prompt": "Q?", "completion": "a\n\nP\n\nb"}
    assert format_revision_example(plain, system) == {"prompt": "Q?\n\na\n\nP", "completion": "b"}


# -------------------------------------------------------------------------------------------------------- collection
class ScriptedSampler:
    """Answers "What is a + b?" by a script and records every prompt it is handed (decoded)."""

    def __init__(self, tokenizer, init_answers):
        self.tokenizer, self.init_answers, self.calls = tokenizer, init_answers, []

    def __call__(self, prompt_ids, n, max_new_tokens, seed):
        texts = [self.tokenizer.decode(ids) for ids in prompt_ids]
        self.calls.append((texts, n, max_new_tokens))
        out = []
        for text in texts:
            a, b = (int(v) for v in re.findall(r"What is (\d+) \+ (\d+)\?", text)[0])
            if text.endswith(f"{P0}\n\n") or text.endswith(f"{P1}\n\n"):  # a revision prompt: revise correctly
                out.append([f"fixed {k}: \\boxed{{{a + b}}}" for k in range(n)])
            else:  # y_init by the script: offsets from the right sum (0 = correct)
                out.append([f"\\boxed{{{a + b + d}}}" for d in self.init_answers[:n]])
        return out


def _problems(n):
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(n)],
                              "answer": [str(i + 1) for i in range(n)]})


def _collection_config(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", disable_tqdm=True,
                  num_init_samples=3, num_revisions=2, init_max_new_tokens=7, revision_max_new_tokens=9,
                  collection_batch_size=2)
    return SRTConfig(**{**kwargs, **overrides})


def test_collection_prompts_handed_to_the_sampler(tmp_path):
    from trl_sdx.rewards import boxed_answer_reward

    tokenizer = make_tiny_tokenizer()
    config = _collection_config(tmp_path)
    sampler = ScriptedSampler(tokenizer, init_answers=[0, 1, 2])  # 1 correct, 2 incorrect y_init per problem
    revisions, counts = collect_revisions(sampler, tokenizer, _problems(2), config, [boxed_answer_reward])

    (init_texts, n_init, budget_init), (revision_texts, n_rev, budget_rev) = sampler.calls
    system = "You are a helpful assistant that solves math problems step by step."
    suffix = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    expected_x = tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": "What is 0 + 1?" + suffix}],
        tokenize=False, add_generation_prompt=True)
    assert init_texts[0] == expected_x and (n_init, budget_init) == (3, 7)
    # only the two incorrect y_init of each problem are revised, each as a continuation of the assistant turn
    assert len(revision_texts) == 4 and (n_rev, budget_rev) == (2, 9)
    assert revision_texts[0] == expected_x + "\\boxed{2}" + f"\n\n{P0}\n\n"
    assert counts["revision_attempts_from_correct"] == 0 and counts["kept"] == 8 == len(revisions)
    assert set(revisions["init_reward"]) == {0} and set(revisions["control_phrase"]) == {P0}

    # revise_correct: the correct y_init is rephrased after P_1
    sampler = ScriptedSampler(tokenizer, init_answers=[0, 1, 2])
    revisions, counts = collect_revisions(sampler, tokenizer, _problems(2),
                                          _collection_config(tmp_path, revise_correct=True), [boxed_answer_reward])
    assert sampler.calls[1][0][0] == expected_x + "\\boxed{1}" + f"\n\n{P1}\n\n"
    assert counts["kept_from_correct"] == 4 and counts["kept_from_incorrect"] == 8


def test_collection_stops_at_max_revisions_and_counts_the_excess(tmp_path):
    from trl_sdx.rewards import boxed_answer_reward

    tokenizer = make_tiny_tokenizer()
    sampler = ScriptedSampler(tokenizer, init_answers=[1, 1, 1])  # 3 incorrect y_init -> 6 kept per problem
    config = _collection_config(tmp_path, max_revisions=15)  # reached after the 2nd step of 2 problems (24 kept)
    revisions, counts = collect_revisions(sampler, tokenizer, _problems(10), config, [boxed_answer_reward])
    assert counts["problems"] == 4 and counts["problems_in_dataset"] == 10 and len(sampler.calls) == 4
    assert len(revisions) == counts["kept"] == 15 and counts["dropped_over_max_revisions"] == 24 - 15
    assert revisions["answer"] == ["1"] * 6 + ["2"] * 6 + ["3"] * 3  # the first 15 in problem order


def test_stop_strings_are_cut_like_vllm_does():
    assert _cut_at_stop_strings("2 + 3 = 5. \\boxed{5}\n\nQuestion: next", ["Question:", "<|im_end|>"]) == \
        "2 + 3 = 5. \\boxed{5}\n\n"
    assert _cut_at_stop_strings("no stop here", ["Question:"]) == "no stop here"


def test_released_defaults(tmp_path):
    config = SRTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    assert (config.sampling_temperature, config.sampling_top_p) == (1.0, 0.9)
    assert (config.num_init_samples, config.num_revisions) == (3, 3)
    assert config.init_max_new_tokens == config.revision_max_new_tokens == 16384
    assert config.stop_strings == ["<|im_end|>", "<|endoftext|>", "<|im_start|>", "Question:"]
    assert (config.max_revisions, config.stage2_size, config.max_length) == (6000, 1000, 32768)
    assert not config.revise_correct and config.clean_revisions and config.long_rows == "drop"
    assert config.collection_system_prompt == "You are a helpful assistant that solves math problems step by step."
    assert config.sft_system_prompt == "Please reason step by step, and put your final answer within \\boxed{}."
    assert (config.learning_rate, config.num_train_epochs, config.lr_scheduler_type) == (5e-6, 3.0, "cosine")
    assert (config.warmup_steps, config.weight_decay, config.adam_beta2) == (0.05, 1e-4, 0.95)
    with pytest.raises(ValueError, match="long_rows"):
        SRTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, long_rows="cut")


@pytest.mark.parametrize("disable_tqdm", [False, True])
def test_collection_shows_progress_unless_disabled_and_ends_with_one_summary_line(tmp_path, capsys, disable_tqdm):
    from trl_sdx.rewards import boxed_answer_reward

    tokenizer = make_tiny_tokenizer()
    config = _collection_config(tmp_path, disable_tqdm=disable_tqdm)
    collect_revisions(ScriptedSampler(tokenizer, [0, 1, 2]), tokenizer, _problems(4), config, [boxed_answer_reward])
    out, err = capsys.readouterr()
    assert ("SRT collection (problems)" in err) != disable_tqdm  # the bar, on stderr as TRL's
    lines = [line for line in out.splitlines() if line.startswith("SRT collection:")]
    assert lines == ["SRT collection: 4/4 problems, y_init correct 4/12, revisions kept 16/16 (16 after an incorrect "
                     "y_init, 0 after a correct one)."]
