"""`MixSDTrainer` / `MixSDConfig`: target construction, cache reuse, LoRA, training, errors, evaluation."""

from __future__ import annotations

import json
import os

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model

import trl_sdx.mixsd.targets as targets_module
from trl_sdx.mixsd import MixSDConfig, MixSDTrainer, mixed_generate, target_nll_stats
from trl_sdx.mixsd.evaluation import answer_accuracy, evaluate_knowledge_injection
from trl_sdx.mixsd.prompts import FACT_PREFIX, FACT_TRANSITION, build_prompt_ids, expert_user_message
from trl_sdx.testing import make_tiny_model, make_tiny_tokenizer

ROWS = {
    "question": ["What is 12 + 7?", "In which year was Dr. Elara Vance born?", "What is the capital of Zorbania?"],
    "answer": ["12 + 7 = 19. \\boxed{19}", "She was born in 1873. \\boxed{1873}", "It is \\boxed{Quillport}."],
}


def accept_all(text, gold):
    return True


def stopping_model(tokenizer, seed: int = 1, every: int = 1, **kwargs):
    """A tiny random model whose generation config stops on every `every`-th token id: its targets end (instead of
    being cut off by max_new_tokens, which rejection sampling counts as a failure)."""
    model = make_tiny_model(tokenizer, seed=seed, **kwargs)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *range(0, len(tokenizer), every)]
    return model


def _config(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"), mixsd_cache_dir=str(tmp_path / "cache"), use_cpu=True, bf16=False,
        report_to="none", max_steps=2, per_device_train_batch_size=3, learning_rate=1e-2, logging_steps=1,
        save_strategy="no", max_new_tokens=6, max_retries=0, lambda_mix=0.5, gradient_checkpointing=False,
        dataset_num_proc=None,
    )
    kwargs.update(overrides)
    return MixSDConfig(**kwargs)


@pytest.fixture()
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture()
def dataset():
    return Dataset.from_dict(ROWS)


@pytest.fixture()
def count_generation(monkeypatch):
    """Counts calls of the target generator (rejection sampling over mixed decoding)."""
    calls = []
    original = targets_module.rejection_sample

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(targets_module, "rejection_sample", counting)
    return calls


def test_targets_are_the_base_models_mixed_decoding(tmp_path, tokenizer, dataset, count_generation):
    model = stopping_model(tokenizer, seed=1, every=3, hidden_size=64, initializer_range=0.1)
    stops = set(model.generation_config.eos_token_id)
    trainer = MixSDTrainer(model, args=_config(tmp_path, max_new_tokens=12), train_dataset=dataset,
                           processing_class=tokenizer,
                           answer_checker=accept_all)
    assert count_generation == [1]
    # Independent expectation, from the spec: x⁻ = chat(user=q), x⁺ = chat(user=q + PREFIX + "\n" + y*.strip() +
    # TRANSITION); example i's coins are its generator's first max_new_tokens uniforms (seed (42, i)); token t is
    # the argmax of the side its coin picks, recomputed here by a plain forward of prompt + y_<t (no cache).
    from trl_sdx.mixsd.rejection import example_seed

    def chat(text):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             return_dict=False)

    prefix = "\nThis question is from a new knowledge base. Here is the answer to this question:\n"
    transition = "\nNow answer the question within \\boxed{}"
    sources_seen = set()
    for i, target in enumerate(trainer.mixsd_targets.targets):
        ids = target.completion_ids
        coins = torch.rand(12, generator=torch.Generator().manual_seed(example_seed(42, i)))
        naive = chat(ROWS["question"][i])
        expert = chat(ROWS["question"][i] + prefix + "\n" + ROWS["answer"][i].strip() + transition)
        for t, token in enumerate(ids):
            prompt = naive if coins[t] < 0.5 else expert
            sources_seen.add(coins[t].item() < 0.5)
            with torch.no_grad():
                logits = model(torch.tensor([prompt + ids[:t]])).logits[0, -1]
            assert token == logits.argmax().item(), f"example {i}, token {t}"
        assert ids[-1] in stops and not any(x in stops for x in ids[:-1])  # ended at its first stop token
        assert target.naive_tokens == int((coins[: len(ids)] < 0.5).sum())
    assert sources_seen == {True, False}  # both conditionals were used
    # SFT's completion-only loss: prompt = x⁻ (the question alone), labels only on the mixed completion.
    row = trainer.train_dataset[0]
    prompt_ids = chat(ROWS["question"][0])
    assert row["input_ids"][: len(prompt_ids)] == prompt_ids
    assert all(label == -100 for label in row["labels"][: len(prompt_ids)])
    assert all(label != -100 for label in row["labels"][len(prompt_ids):])
    # Statistics: reported and saved in the cache metadata.
    stats = trainer.mixsd_stats
    assert stats["num_examples"] == 3 and stats["num_dropped"] == 0 and stats["retries_per_example"] == [0, 0, 0]
    share = sum(t.naive_tokens for t in trainer.mixsd_targets.targets) / sum(
        t.num_tokens for t in trainer.mixsd_targets.targets)
    assert stats["naive_token_share"] == pytest.approx(share)
    metadata = json.loads(open(os.path.join(trainer.mixsd_targets.cache_entry, "metadata.json")).read())
    assert metadata["stats"]["naive_token_share"] == pytest.approx(share)
    assert metadata["inputs"]["lambda_mix"] == 0.5

    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_cache_reuse_lora_and_peft_model_share_the_base_targets(tmp_path, tokenizer, dataset, count_generation):
    first = MixSDTrainer(stopping_model(tokenizer), args=_config(tmp_path), train_dataset=dataset,
                         processing_class=tokenizer, answer_checker=accept_all)
    assert count_generation == [1] and not first.mixsd_targets.from_cache

    # Same base weights + LoRA: the base writes the targets, so the cache entry is reused (no generation).
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    second = MixSDTrainer(stopping_model(tokenizer), args=_config(tmp_path), train_dataset=dataset,
                          processing_class=tokenizer, answer_checker=accept_all, peft_config=lora)
    assert count_generation == [1] and second.mixsd_targets.from_cache
    assert second.mixsd_targets.cache_entry == first.mixsd_targets.cache_entry
    assert second.train_dataset["input_ids"] == first.train_dataset["input_ids"]
    second.train()
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in second.state.log_history if "loss" in log)

    # A PeftModel whose (random, non-zero) adapters change its outputs: targets come from the adapter-disabled base.
    peft_model = get_peft_model(stopping_model(tokenizer), LoraConfig(
        r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False))
    fresh_cache = _config(tmp_path, mixsd_cache_dir=str(tmp_path / "fresh"))
    third = MixSDTrainer(peft_model, args=fresh_cache, train_dataset=dataset, processing_class=tokenizer,
                         answer_checker=accept_all)
    assert count_generation == [1, 1]
    assert [t.completion_ids for t in third.mixsd_targets.targets] == [
        t.completion_ids for t in first.mixsd_targets.targets]
    naive, expert = build_prompt_ids(tokenizer, ROWS["question"], ROWS["answer"], FACT_PREFIX, FACT_TRANSITION)
    with_adapters = mixed_generate(peft_model, naive, expert, lambda_mix=0.0, max_new_tokens=6, eos_token_id=[])
    with peft_model.disable_adapter():
        without = mixed_generate(peft_model, naive, expert, lambda_mix=0.0, max_new_tokens=6, eos_token_id=[])
    assert with_adapters != without  # the adapters matter, so the equality above is meaningful

    # Any change to a mixing parameter is a new cache entry.
    MixSDTrainer(stopping_model(tokenizer), args=_config(tmp_path, lambda_mix=0.3), train_dataset=dataset,
                 processing_class=tokenizer, answer_checker=accept_all)
    assert count_generation == [1, 1, 1]


def test_failed_targets_are_dropped_or_kept(tmp_path, tokenizer, dataset):
    def accept_first(text, gold):  # only the first question's target passes
        return gold == ROWS["answer"][0]

    kwargs = dict(args=_config(tmp_path, max_retries=1), train_dataset=dataset, processing_class=tokenizer,
                  answer_checker=accept_first)
    trainer = MixSDTrainer(stopping_model(tokenizer), **kwargs)
    assert len(trainer.train_dataset) == 1
    assert trainer.mixsd_stats["num_dropped"] == 2 and trainer.mixsd_stats["retries_per_example"] == [0, 1, 1]
    kept = MixSDTrainer(stopping_model(tokenizer), **{**kwargs, "args": _config(tmp_path, max_retries=1,
                                                                                  keep_failed=True)})
    assert len(kept.train_dataset) == 3 and kept.mixsd_stats["num_dropped"] == 0
    with pytest.raises(ValueError, match="keep_failed"):
        MixSDTrainer(make_tiny_model(tokenizer), args=_config(tmp_path), train_dataset=dataset,
                     processing_class=tokenizer, answer_checker=lambda text, gold: False)


def test_answer_match_selects_the_rejection_rule(tmp_path, tokenizer, dataset, monkeypatch):
    from trl_sdx.mixsd import build_mixsd_targets

    texts = {0: "The answer: \\boxed{19}", 1: "born in 1873", 2: "the capital is Quillport"}
    monkeypatch.setattr(targets_module, "rejection_sample", _fake_rejection(texts))
    accepted, entries = {}, set()
    for rule in ("boxed", "boxed_or_last_number", "lenient"):
        built = build_mixsd_targets(make_tiny_model(tokenizer), tokenizer, dataset,
                                    _config(tmp_path, answer_match=rule, keep_failed=True))
        accepted[rule] = [t.accepted for t in built.targets]
        entries.add(built.cache_entry)
        assert built.metadata["inputs"]["answer_checker"]["name"].endswith(
            {"boxed": "boxed_answer_checker", "boxed_or_last_number": "boxed_or_last_number_checker",
             "lenient": "lenient_answer_checker"}[rule])
    assert accepted == {"boxed": [True, False, False],  # official fact rule: a box or nothing
                        "boxed_or_last_number": [True, True, False],  # digits: the last number counts
                        "lenient": [True, True, True]}  # the gold value as a whole word
    assert len(entries) == 3  # each rule is its own cache entry


def _fake_rejection(texts):
    """A generator stand-in returning fixed, ended texts, graded by the checker it is given (one attempt)."""
    from trl_sdx.mixsd.rejection import MixedTarget

    def fake(model, tokenizer, naive, expert, golds, *, answer_checker, example_indices, **kwargs):
        return [MixedTarget([1], texts[i], bool(answer_checker(texts[i], g)), 1, 0)
                for i, g in zip(example_indices, golds, strict=True)]
    return fake


def test_construction_errors(tmp_path, tokenizer, dataset):
    model = make_tiny_model(tokenizer)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['answer'\].*answer_column"):
        MixSDTrainer(model, args=_config(tmp_path), train_dataset=dataset.remove_columns("answer"),
                     processing_class=tokenizer)
    with pytest.raises(ValueError, match="lambda_mix"):
        _config(tmp_path, lambda_mix=1.2)
    with pytest.raises(ValueError, match="top_k"):
        _config(tmp_path, top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        _config(tmp_path, temperature=-1.0)
    with pytest.raises(ValueError, match="prompt_template"):
        _config(tmp_path, prompt_template="other")
    with pytest.raises(ValueError, match="expert_prefix"):
        _config(tmp_path, prompt_template="custom")
    with pytest.raises(ValueError, match="answer_match"):
        _config(tmp_path, answer_match="exact")
    with pytest.raises(ValueError, match="top_k.*vocabulary"):
        MixSDTrainer(model, args=_config(tmp_path, top_k=10**6), train_dataset=dataset, processing_class=tokenizer)
    no_template = make_tiny_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        MixSDTrainer(model, args=_config(tmp_path), train_dataset=dataset, processing_class=no_template)
    no_pad = make_tiny_tokenizer()
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="pad token"):
        MixSDTrainer(model, args=_config(tmp_path), train_dataset=dataset, processing_class=no_pad)


def test_evaluation_metrics(tokenizer, dataset):
    model = make_tiny_model(tokenizer, seed=2).eval()
    # target NLL: the same numbers as a direct teacher-forced computation of the completion tokens.
    completion = "3 + 5 = 8"
    stats = target_nll_stats(model, tokenizer, [ROWS["question"][0]], [completion], threshold=5.0)
    full = tokenizer.apply_chat_template([{"role": "user", "content": ROWS["question"][0]},
                                          {"role": "assistant", "content": completion}], return_dict=False)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": ROWS["question"][0]}],
                                           add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([full])).logits[0, :-1], dim=-1)
    nll = -logprobs[torch.arange(len(prompt) - 1, len(full) - 1), torch.tensor(full[len(prompt):])]
    assert stats["num_tokens"] == len(full) - len(prompt)
    assert stats["mean_nll"] == pytest.approx(nll.mean().item(), rel=1e-5)
    assert stats["high_nll_share"] == pytest.approx((nll > 5).float().mean().item())

    # Accuracy: the greedy answers are what plain `model.generate` answers; grading applies the checker to them.
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    expected = []
    for question in ROWS["question"]:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               return_dict=False)
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=4, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)
        expected.append(tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True))
    assert len(set(expected)) > 1  # different answers, so the grading below depends on them

    def checker(text, gold):  # depends on the answer text only
        return text == expected[0]

    answers = answer_accuracy(model, tokenizer, ROWS["question"], ROWS["answer"], max_new_tokens=4,
                              answer_checker=checker)
    assert answers["answers"] == expected
    correct = [text == expected[0] for text in expected]
    assert answers["correct"] == correct and answers["accuracy"] == pytest.approx(sum(correct) / 3)
    result = evaluate_knowledge_injection(model, tokenizer, dataset, dataset.select([1, 0]), max_new_tokens=4,
                                          base_probe_accuracy=0.25, answer_checker=checker)
    assert result["memorisation"] == pytest.approx(sum(correct) / 3)
    assert result["probe_accuracy"] == pytest.approx((correct[1] + correct[0]) / 2)
    assert result["retention"] == pytest.approx(result["probe_accuracy"] / 0.25)
    assert result["probe_answers"] == [expected[1], expected[0]]


def test_lenient_checker_accepts_unboxed_facts_only_as_whole_words():
    from trl_sdx.mixsd import lenient_answer_checker

    gold = "The capital is Paris. The answer is \\boxed{Paris}."
    assert lenient_answer_checker("Paris is the capital of France.", gold)
    assert lenient_answer_checker("so \\boxed{Paris}", gold)
    assert not lenient_answer_checker("Parisian food", gold)
    assert not lenient_answer_checker("It is 18.", "\\boxed{8}")
    assert lenient_answer_checker("12 + 5 = 17", "\\boxed{17}")


def test_script_generate_train_evaluate(tmp_path, capsys):
    """`trl-sdx mixsd` in-process: --generate_only, then training with --evaluate, then --evaluate_only. The console
    gets progress bars (unless --disable_tqdm) and one summary line per stage; the detail goes to the report file."""
    from trl_sdx.scripts.mixsd import main, make_parser
    from trl_sdx.testing import save_tiny_pair

    model_path, _ = save_tiny_pair(tmp_path / "models")
    out = tmp_path / "run"
    common = ["--model_name_or_path", model_path, "--dataset_name", "synthetic-knowledge",
              "--synthetic_num_entities", "2", "--output_dir", str(out), "--use_cpu", "--bf16", "False",
              "--report_to", "none", "--max_new_tokens", "4", "--max_retries", "0", "--keep_failed",
              "--eval_max_new_tokens", "4", "--max_steps", "1", "--per_device_train_batch_size", "2",
              "--save_strategy", "no", "--activation_checkpointing", "False"]
    main(*make_parser().parse_args_and_config(common + ["--generate_only"]))
    report = json.loads((out / "mixsd_targets.json").read_text())
    assert report["stats"]["num_examples"] == 4 and not report["from_cache"]
    assert report["target_nll"]["sft"]["num_tokens"] > 0 and report["target_nll"]["mixsd"]["num_tokens"] > 0
    assert [row["question"] for row in report["targets"]] == report_questions(4)  # per-fact detail in the file
    assert not os.path.exists(out / "config.json")  # nothing trained
    console = capsys.readouterr()
    assert "MixSD targets:" in console.err  # the progress bar
    lines = [line for line in console.out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("MixSD targets: 4 facts") and "mixsd_targets.json" in lines[0]

    main(*make_parser().parse_args_and_config(common + ["--evaluate", "--disable_tqdm", "True"]))
    report = json.loads((out / "mixsd_eval.json").read_text())
    assert report["mixsd_stats"]["num_examples"] == 4
    for stage in ("base", "trained"):
        assert report[stage]["num_injected"] == 4 and report[stage]["num_probe"] == 30
        assert len(report[stage]["answers"]) == 4 and len(report[stage]["probe_answers"]) == 30
    assert "retention" in report["trained"] and (out / "model.safetensors").exists()
    console = capsys.readouterr()
    assert "MixSD targets:" not in console.err and "MixSD eval" not in console.err  # --disable_tqdm respected
    summary = [line for line in console.out.splitlines() if line.startswith("MixSD evaluation:")]
    assert len(summary) == 1 and " → " in summary[0] and "retries_per_example" not in console.out

    main(*make_parser().parse_args_and_config(
        common + ["--evaluate_only", "--model_name_or_path", str(out), "--base_model_name_or_path", model_path,
                  "--eval_output_file", str(tmp_path / "eval.json")]))
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["trained"]["base_probe_accuracy"] == report["base"]["probe_accuracy"]


def report_questions(n_facts: int) -> list[str]:
    from trl_sdx.data import make_knowledge_dataset

    return make_knowledge_dataset(n_facts // 2, seed=0)["train"]["question"]
