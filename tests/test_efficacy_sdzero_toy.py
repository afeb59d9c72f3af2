"""The SD-Zero efficacy benchmark at toy size: it runs end to end and writes what the docs link to; and the pieces
of its task that the result depends on (the untrained revision prefix, one token per digit, the lr rule).

The benchmark itself (benchmarks/efficacy/sdzero_from_rewards.py --size full) is not a test; this keeps it working.
"""

import json
import math
from pathlib import Path

from efficacy_modules import efficacy_module as _module


def _tokenizer(task):
    tiny_world = _module("tiny_world")
    pools = task.split_problems({"test": 40, "validation": 20, "train": 40}, carry_share=0.6)
    return tiny_world.train_chat_tokenizer(task.tokenizer_corpus(pools["pretrain"]), vocab_size=512), pools


def test_split_is_disjoint_with_the_carry_share():
    task = _module("sdzero_task")
    pools = task.split_problems({"test": 40, "validation": 20, "train": 40}, carry_share=0.6)
    seen = [set(pools[name]) for name in task.POOLS]
    assert sum(map(len, seen)) == len(set().union(*seen)) == 90 * 90  # disjoint, and every problem is somewhere
    assert sum(q.carry for q in pools["test"]) == 24 and sum(q.carry for q in pools["train"]) == 24
    q = task.Problem(57, 38)
    assert q.carry and q.answer == 95 and q.forgotten_carry == 85 and not task.Problem(52, 31).carry


def test_revision_prefix_is_untrained_and_tokenises_like_the_revision_prompt():
    task = _module("sdzero_task")
    tiny_world = _module("tiny_world")
    from trl_sdx.sdzero.srt_collect import revision_prompt_text

    tokenizer, pools = _tokenizer(task)
    q = task.Problem(57, 38)
    assert tokenizer.tokenize("\\boxed{195}")[-4:] == ["1", "9", "5", "}"]  # one token per digit
    plain = [*q.prompt, {"role": "assistant", "content": "\\boxed{85}"}]
    kwargs = {"chat_template": task.PREFIXED_CHATML_TEMPLATE}
    # without a prefix the template is the library's ChatML, token for token and mask for mask
    assert tiny_world.encode_chats(tokenizer, [plain], kwargs) == tiny_world.encode_chats(tokenizer, [plain])
    [revision] = task.pretraining_chats([q], 1, revision_share=1.0, p_carry_right=0.0, seed=0)
    [(ids, mask)] = tiny_world.encode_chats(tokenizer, [revision], kwargs)
    # Phase 1 revises by text: chat(x) + y + "\n\n" + P_0 + "\n\n"; pre-training must show the same tokens
    context = tokenizer(revision_prompt_text(task.prompt_text(tokenizer, q), "\\boxed{85}", task.INCORRECT_PHRASE),
                        add_special_tokens=False)["input_ids"]
    assert ids[: len(context)] == context
    answer = tokenizer(task.prompt_text(tokenizer, q) + "\\boxed{85}\n", add_special_tokens=False)["input_ids"]
    assert not any(mask[: len(answer)])  # neither y nor the "\n" after it: ending the turn after y stays the habit
    trained = [t for t, m in zip(ids, mask) if m]
    assert trained == ids[len(answer):-1]  # the rest (phrase and revision) is, up to the template's final "\n"
    assert tokenizer.decode(trained) == f"\n{task.INCORRECT_PHRASE}\n\n\\boxed{{95}}<|im_end|>"


def test_learning_rate_rule_highest_mean_ties_to_smaller_never_non_finite():
    rule = _module("sdzero_from_rewards").choose_lr
    assert rule({"0.001": [0.5, 0.7], "0.0003": [0.6, 0.6], "0.0001": [0.9, float("nan")]}) == "0.0003"
    assert rule({"0.001": [0.7, 0.7], "0.0003": [0.6, 0.6]}) == "0.001"
    assert rule({"0.001": [float("nan")]}) is None


def test_verdict_needs_the_interval_to_exclude_zero():
    verdict = _module("sdzero_from_rewards").verdict
    assert verdict({"mean": 0.1, "lo": 0.02, "hi": 0.18}) == "SD-Zero better"
    assert verdict({"mean": -0.1, "lo": -0.18, "hi": -0.02}) == "RFT better"
    assert verdict({"mean": 0.1, "lo": -0.02, "hi": 0.22}) == "no difference detected at this size"


def test_sdzero_efficacy_toy_writes_json_markdown_and_plot(tmp_path):
    bench = _module("sdzero_from_rewards")
    prefix = tmp_path / "results" / "sdzero_efficacy"
    result = bench.main(["--size", "toy", "--out-prefix", str(prefix)])
    assert result["complete"]
    saved = json.loads(Path(f"{prefix}.json").read_text())
    toy = saved["sizes"]
    assert set(saved["chosen_lr"]) == set(bench.ARMS) - {"base"} and all(saved["chosen_lr"].values())
    for arm in bench.ARMS:
        for metric in ("test_avg_at_k", "test_greedy"):
            stat = saved["final"][arm][metric]
            assert stat["n"] == len(toy["seeds"]) and 0.0 <= stat["mean"] <= 1.0
    for seed, counts in saved["generations"].items():  # equal generations and steps (rule R3)
        assert counts["sdzero"] == counts["rft"] > 0 and counts["steps"] > toy["phase2_steps"]
        srt = saved["seeds"][seed]["srt"][saved["chosen_lr"]["SRT (Phase 1)"]]
        assert counts["sdzero"] == (srt["counts"]["init_samples"] + srt["counts"]["revision_attempts"]
                                    + toy["phase2_steps"] * toy["batch_size"])
    curve = saved["phase2_curve"]
    assert [row["step"] for row in curve] == list(range(0, toy["phase2_steps"] + 1, toy["eval_every"]))
    kl = saved["kl_by_reward"]
    assert math.isfinite(kl["kl_incorrect"]["mean"]) or math.isfinite(kl["kl_correct"]["mean"])
    markdown = Path(f"{prefix}.md").read_text()
    assert "Pre-registered rule" in markdown and "Status: **complete**" in markdown
    assert "test avg@k (primary)" in markdown and "Phase 2 KL by reward" in markdown
    assert Path(f"{prefix}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
