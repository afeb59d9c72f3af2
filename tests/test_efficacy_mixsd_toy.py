"""The MixSD-versus-SFT efficacy benchmark at toy size: it runs end to end and writes what the docs link to; its
learning-rate rule and the cut-off count of the evaluation answers do what the protocol says.

The benchmark itself (benchmarks/efficacy/mixsd_vs_sft.py --size full) is not a test; this keeps it working.
"""

import json
import math
from pathlib import Path

import torch

from efficacy_modules import efficacy_module as _module


def _record(matched_validation=None, final_memorisation=0.5):
    matched = None if matched_validation is None else {"validation_retention": matched_validation}
    return {"matched": matched, "mem_curve": [{"step": 0, "memorisation": 0.0},
                                              {"step": 8, "memorisation": final_memorisation}]}


def test_lr_rule_best_validation_retention_among_lrs_where_every_seed_reaches_the_threshold():
    choose_lr = _module("mixsd_vs_sft").choose_lr
    runs = {"0.001": [_record(0.8), _record(0.9)],   # mean 0.85
            "0.003": [_record(0.95), _record(None)],  # one seed never reached 0.9: not eligible
            "0.0003": [_record(0.9), _record(0.8)]}   # mean 0.85, ties with 0.001 → the smaller lr
    assert choose_lr(runs) == ("0.0003", True)
    runs["0.01"] = [_record(0.99), _record(0.99)]
    assert choose_lr(runs) == ("0.01", True)
    # no lr reaches 0.9 in every seed: the highest final memorisation, flagged as not reached
    never = {"0.001": [_record(None, 0.5), _record(None, 0.7)], "0.003": [_record(None, 0.8), _record(None, 0.6)]}
    assert choose_lr(never) == ("0.003", False)


def test_verdict_needs_the_interval_to_exclude_zero():
    verdict = _module("mixsd_vs_sft").verdict
    assert verdict({"mean": 0.1, "lo": 0.02, "hi": 0.18}, True) == "MixSD better"
    assert verdict({"mean": 0.1, "lo": -0.02, "hi": 0.22}, True) == "no difference detected at this size"
    assert verdict({"mean": -0.1, "lo": -0.2, "hi": -0.01}, True) == "SFT better"
    assert verdict({"mean": -0.1, "lo": -0.2, "hi": -0.01}, False) == "MixSD better"  # KL: lower is better


def test_answer_accuracy_counts_answers_cut_off_by_max_new_tokens():
    from trl_sdx.mixsd.evaluation import answer_accuracy
    from trl_sdx.testing import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer, seed=3).eval()
    eos = tokenizer.eos_token_id
    questions = ["What is 12 + 7?", "Name a colour."]

    def reference_cut_off():  # transformers' own greedy generate, stopped on the same EOS
        cut = []
        for q in questions:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=False)
            out = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=eos, pad_token_id=eos)
            cut.append(eos not in out[0, ids.shape[1]:].tolist())
        return cut

    result = answer_accuracy(model, tokenizer, questions, ["19", "red"], max_new_tokens=4)
    assert result["cut_off"] == reference_cut_off() == [True, True]  # an untrained model does not stop
    assert result["num_cut_off"] == 2
    # make EOS the argmax everywhere: every answer ends at once, none is cut off
    hook = model.lm_head.register_forward_hook(lambda module, args, out: out.index_add(
        -1, torch.tensor([eos]), torch.full((*out.shape[:-1], 1), 1e4)))
    try:
        stopped = answer_accuracy(model, tokenizer, questions, ["19", "red"], max_new_tokens=4)
        assert stopped["cut_off"] == reference_cut_off() == [False, False]
    finally:
        hook.remove()
    assert stopped["num_cut_off"] == 0


def test_mixsd_vs_sft_toy_writes_json_markdown_and_plot(tmp_path):
    prefix = tmp_path / "results" / "mixsd_efficacy"
    result = _module("mixsd_vs_sft").main(["--size", "toy", "--out-prefix", str(prefix)])
    assert result["complete"]
    saved = json.loads(Path(f"{prefix}.json").read_text())
    arms = ["SFT on y*", "MixSD λ=0", "MixSD λ=0.3", "MixSD λ=0.5"]
    toy = saved["sizes"]
    assert set(saved["chosen_lr"]) == set(arms)
    for arm in arms:
        records = saved["runs"][arm][str(toy["lrs"][0])]
        assert len(records) == len(toy["seeds"])
        for record in records:
            assert [row["step"] for row in record["mem_curve"]] == list(range(0, toy["steps"] + 1, toy["mem_every"]))
            assert [row["step"] for row in record["full_curve"]] == [0, toy["steps"]]
            last = record["full_curve"][-1]
            assert {"retention", "validation_retention", "kl_generic", "injected_cut_off"} <= set(last)
            if arm != "SFT on y*":
                assert record["targets"]["num_examples"] == saved["base_check"]["injected_facts_per_seed"]
        stat = saved["outcomes"][arm]["kl_generic"]
        assert stat["n"] == len(toy["seeds"]) and math.isfinite(stat["mean"])
        assert stat["lo"] <= stat["mean"] <= stat["hi"]
        assert stat["mean"] > 0  # training moved every arm away from the base
    check = saved["base_check"]
    assert check["eval_max_new_tokens"] >= toy["max_new_tokens"] + 16
    assert {"lambda0_pass_share", "passes_90_percent"} <= set(saved["within_reach"])
    assert 0.0 <= saved["fingerprint"]["SFT on y*"]["high_nll_share"]["mean"] <= 1.0
    markdown = Path(f"{prefix}.md").read_text()
    assert "Pre-registered rule" in markdown and "Status: **complete**" in markdown
    assert "Within reach (R0, checked first)" in markdown and "share of tokens with base NLL > 5" in markdown
    assert Path(f"{prefix}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
