"""Chat-template keyword arguments (Qwen3's `enable_thinking`) and stop tokens, alike for generation, SFT and eval."""

from __future__ import annotations

import pytest
from datasets import Dataset

import trl_sdx.mixsd.evaluation as evaluation_module
import trl_sdx.mixsd.targets as targets_module
from trl_sdx.mixsd import MixSDConfig, MixSDTrainer, greedy_answers, stop_token_ids, target_nll_stats
from trl_sdx.testing import make_tiny_model, make_tiny_tokenizer

# What Qwen3's template does, in small: an assistant turn in the conversation always carries a (here empty) think
# block; the generation prompt carries it only when `enable_thinking=False`, otherwise the model opens its own.
QWEN3_LIKE_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
ROWS = {"question": ["In which year was Dr. Elara Vance born?", "What is 3 + 5?"],
        "answer": ["She was born in 1873. \\boxed{1873}", "\\boxed{8}"]}


@pytest.fixture()
def qwen3_tokenizer():
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = QWEN3_LIKE_TEMPLATE
    return tokenizer


def _trainer(tmp_path, tokenizer, monkeypatch, **overrides):
    """A trainer whose generator call is recorded (prompt ids and stop ids) and whose targets all end."""
    seen = {}
    original = targets_module.rejection_sample

    def recording(model, tok, naive, expert, golds, **kwargs):
        seen.update(naive=naive, expert=expert, eos=kwargs["eos_token_id"])
        return original(model, tok, naive, expert, golds, **kwargs)

    monkeypatch.setattr(targets_module, "rejection_sample", recording)
    model = make_tiny_model(tokenizer, seed=1)
    model.generation_config.eos_token_id = list(range(len(tokenizer)))  # every target ends after one token
    args = MixSDConfig(output_dir=str(tmp_path / "out"), mixsd_cache_dir=str(tmp_path / "cache"), use_cpu=True,
                       bf16=False, report_to="none", max_steps=1, max_new_tokens=4, max_retries=0,
                       dataset_num_proc=None, disable_tqdm=True, **overrides)
    trainer = MixSDTrainer(model, args=args, train_dataset=Dataset.from_dict(ROWS), processing_class=tokenizer,
                           answer_checker=lambda text, gold: True)
    return trainer, seen


def _completion_text(trainer, tokenizer, row: int) -> str:
    example = trainer.train_dataset[row]
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])


def test_default_enable_thinking_false_is_used_for_generation_and_training(tmp_path, qwen3_tokenizer, monkeypatch):
    trainer, seen = _trainer(tmp_path, qwen3_tokenizer, monkeypatch)
    think = "<think>\n\n</think>\n\n"
    for prompts in (seen["naive"], seen["expert"]):
        assert all(qwen3_tokenizer.decode(ids).endswith("<|im_start|>assistant\n" + think) for ids in prompts)
    # SFT renders x⁻ exactly as it was decoded from; the trained completion is the target and the turn end only.
    for i in range(2):
        example = trainer.train_dataset[i]
        assert example["input_ids"][: len(seen["naive"][i])] == seen["naive"][i]
        completion = trainer.mixsd_targets.targets[i].completion
        assert _completion_text(trainer, qwen3_tokenizer, i) == completion + "<|im_end|>\n"


def test_without_the_kwargs_training_would_see_a_think_block_generation_never_saw(tmp_path, qwen3_tokenizer,
                                                                                 monkeypatch):
    trainer, seen = _trainer(tmp_path, qwen3_tokenizer, monkeypatch, chat_template_kwargs=None)
    assert not qwen3_tokenizer.decode(seen["naive"][0]).endswith("</think>\n\n")
    assert _completion_text(trainer, qwen3_tokenizer, 0).startswith("<think>")  # what the default prevents


def test_evaluation_and_target_nll_render_with_the_same_kwargs(qwen3_tokenizer, monkeypatch):
    prompts = []
    original = evaluation_module.mixed_generate

    def recording(model, naive, expert, **kwargs):
        prompts.extend(naive)
        return original(model, naive, expert, **kwargs)

    monkeypatch.setattr(evaluation_module, "mixed_generate", recording)
    model = make_tiny_model(qwen3_tokenizer)
    greedy_answers(model, qwen3_tokenizer, ROWS["question"], max_new_tokens=2,
                   chat_template_kwargs={"enable_thinking": False})
    assert all(qwen3_tokenizer.decode(ids).endswith("</think>\n\n") for ids in prompts)
    # Target NLL scores the completion tokens only: with the kwargs, not the think block.
    with_kwargs = target_nll_stats(model, qwen3_tokenizer, ROWS["question"][:1], ["1873"],
                                   chat_template_kwargs={"enable_thinking": False})
    without = target_nll_stats(model, qwen3_tokenizer, ROWS["question"][:1], ["1873"])
    assert with_kwargs["num_tokens"] == len(qwen3_tokenizer("1873<|im_end|>\n")["input_ids"])
    assert without["num_tokens"] > with_kwargs["num_tokens"]


def test_targets_stop_on_eos_and_every_end_of_turn_token():
    tokenizer = make_tiny_tokenizer()  # EOS <|im_end|>; also has <|endoftext|>
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>")}
    assert stop_token_ids(tokenizer) == sorted(ids.values())
    model = make_tiny_model(make_tiny_tokenizer())
    model.generation_config.eos_token_id = [7]
    assert stop_token_ids(tokenizer, model) == sorted({*ids.values(), 7})  # the model's own EOS ids too
    assert "<|eot_id|>" not in make_tiny_tokenizer().get_vocab()  # only tokens the tokenizer has
    assert stop_token_ids(make_tiny_tokenizer()) == sorted([ids["<|im_end|>"], ids["<|endoftext|>"]])
