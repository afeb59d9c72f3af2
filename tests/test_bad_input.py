"""Bad inputs that docs/troubleshooting.md lists and no method-specific test covers yet.

Each test asserts the clear error (naming the argument and the fix) or the documented safe behaviour.
"""

import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from tiny_trainers import FACTORIES, build_entropy_gkd, build_sdzero
from trl_sdx.entropy_gkd import EntropyAwareGKDConfig, EntropyAwareGKDTrainer
from trl_sdx.losses import entropy_aware_opd_loss, topk_distillation_loss
from trl_sdx.mixsd import MixSDTrainer
from trl_sdx.sdzero import SDZeroTrainer
from trl_sdx.testing import make_student_teacher

DOC = Path(__file__).parents[1] / "docs" / "troubleshooting.md"


def _eopd(tmp_path, tokenizer, student, teacher, dataset, **overrides):
    args = EntropyAwareGKDConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                                 max_completion_length=4, report_to="none", use_cpu=True, bf16=False,
                                 disable_tqdm=True, logging_steps=1, **overrides)
    return EntropyAwareGKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                  processing_class=tokenizer)


def _prompts(n, words=3):
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": "word " * words + str(i)}] for i in range(n)]})


def test_eopd_tokenizer_without_chat_template(tmp_path):
    tokenizer, student, teacher = make_student_teacher()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        _eopd(tmp_path, tokenizer, student, teacher, _prompts(4))


def test_eopd_tokenizer_without_pad_token_falls_back_to_eos(tmp_path):
    tokenizer, student, teacher = make_student_teacher()
    tokenizer.pad_token = None
    trainer = _eopd(tmp_path, tokenizer, student, teacher, _prompts(4))
    trainer.train()
    assert tokenizer.pad_token == tokenizer.eos_token  # DistillationTrainer's fallback, inherited
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))


@pytest.mark.parametrize("method", sorted(FACTORIES))
def test_empty_dataset(method, tmp_path, monkeypatch):
    import tiny_trainers

    # Empty each factory's training data at its source.
    monkeypatch.setattr(tiny_trainers, "_prompts", lambda n: _prompts(0))
    no_rows = Dataset.from_dict({"prompt": [], "answer": []})
    monkeypatch.setattr("trl_sdx.data.make_arithmetic_dataset", lambda n: no_rows)
    monkeypatch.setattr(tiny_trainers, "MIXSD_ROWS", {"question": [], "answer": []})
    with pytest.raises(ValueError, match="is empty"):
        FACTORIES[method](tmp_path, max_steps=1)


def test_eopd_prompt_longer_than_the_context(tmp_path):
    tokenizer, student, teacher = make_student_teacher()
    trainer = _eopd(tmp_path, tokenizer, student, teacher, _prompts(4, words=600))
    with pytest.raises(ValueError, match=r"exceeds the model's context of 512 tokens.*max_completion_length"):
        trainer.train()


def test_eopd_teacher_in_another_dtype_is_upcast(tmp_path):
    tokenizer, student, teacher = make_student_teacher()
    trainer = _eopd(tmp_path, tokenizer, student, teacher.to(torch.bfloat16), _prompts(4))
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))
    assert trainer.teacher_model.dtype == torch.bfloat16 and trainer.model.dtype == torch.float32


def test_sdzero_reward_function_that_raises(tmp_path):
    def broken_reward(completions, **kwargs):
        raise KeyError("solution")

    trainer = build_sdzero(tmp_path, max_steps=1)
    trainer.reward_funcs = [broken_reward]
    with pytest.raises(RuntimeError, match=r"Reward function 'broken_reward' raised KeyError.*'answer'"):
        trainer.train()


@pytest.mark.parametrize("trainer_cls", [EntropyAwareGKDTrainer, SDZeroTrainer, MixSDTrainer])
def test_config_of_the_wrong_class(trainer_cls, tmp_path):
    from trl import SFTConfig

    tokenizer, student, teacher = make_student_teacher()
    kwargs = {"teacher_model": teacher} if trainer_cls is not MixSDTrainer else {}
    with pytest.raises(ValueError, match=r"`args` must be an? `\w+Config`"):
        trainer_cls(model=student, args=SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False),
                    train_dataset=_prompts(4), processing_class=tokenizer, **kwargs)


def test_teacher_is_the_student_object(tmp_path):
    tokenizer, student, _ = make_student_teacher()
    with pytest.raises(ValueError, match="teacher_model` is the student object itself"):
        _eopd(tmp_path, tokenizer, student, student, _prompts(4))


@pytest.mark.parametrize("loss", ["eopd", "topk"])
def test_every_completion_token_masked_gives_zero_loss(loss):
    student = torch.randn(2, 3, 32, requires_grad=True)
    teacher = torch.randn(2, 3, 32)
    mask = torch.zeros(2, 3)
    if loss == "eopd":
        value = entropy_aware_opd_loss(student, teacher, torch.zeros(2, 3, dtype=torch.long), mask)
    else:
        value = topk_distillation_loss(student, teacher, mask, top_k=4)
    value.backward()
    assert value.item() == 0.0 and torch.count_nonzero(student.grad) == 0


def test_every_row_of_the_troubleshooting_table_names_an_existing_test():
    """The doc promises a test behind each row: keep that promise checkable."""
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| ") and "`tests/" in line]
    assert len(rows) >= 15
    for row in rows:
        for path, name in re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", row):
            source = (Path(__file__).parents[1] / path).read_text()
            assert re.search(rf"^def {name}\(", source, re.M), f"{path}::{name} (named in troubleshooting.md)"
        assert re.search(r"`tests/[\w/]+\.py::\w+`", row), row
