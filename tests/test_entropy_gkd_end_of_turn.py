"""Base-model student, instruct teacher (issue 10, item 8): the teacher scores the student's completion with its own
end-of-turn token, as the official code swaps `<|endoftext|>` for `<|im_end|>` (`../shared/specs/eopd.md`).

Tiny tokenizers from `trl_sdx.testing` share one vocabulary; the "Base" student's ends a turn with `<|endoftext|>`,
the "instruct" teacher's with `<|im_end|>`.
"""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset

from trl_sdx.entropy_gkd import EntropyAwareGKDConfig, EntropyAwareGKDTrainer
from trl_sdx.entropy_gkd.end_of_turn import EndOfTurnMap, teacher_completion_ids
from trl_sdx.testing import make_tiny_model, make_tiny_tokenizer


def _tokenizers():
    teacher_tokenizer = make_tiny_tokenizer()  # instruct: a turn ends with <|im_end|>
    student_tokenizer = make_tiny_tokenizer()
    student_tokenizer.eos_token = "<|endoftext|>"  # Base model: a turn ends with <|endoftext|>
    assert student_tokenizer.get_vocab() == teacher_tokenizer.get_vocab()
    return student_tokenizer, teacher_tokenizer


def _trainer(tmp_path, student_tokenizer, teacher_tokenizer, **overrides):
    student = make_tiny_model(student_tokenizer, seed=0, hidden_size=32, num_layers=2)
    teacher = make_tiny_model(teacher_tokenizer or student_tokenizer, seed=1, hidden_size=64, num_layers=2)
    args = EntropyAwareGKDConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_completion_length=6,
                                 use_cpu=True, bf16=False, report_to="none", **overrides)
    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{i} + {i}?"}] for i in range(4)]})
    return EntropyAwareGKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                                  processing_class=student_tokenizer, teacher_processing_class=teacher_tokenizer)


def _rollout(tokenizer, student_eos: int) -> dict:
    """Two completions that end with the student's EOS; the second row pads with that same id (pad = EOS, as
    Base models do), so a padded EOS must stay as it is."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "1 + 2?"}], add_generation_prompt=True,
                                         tokenize=False)
    prompt = tokenizer(text)["input_ids"]
    a, b, c = tokenizer.convert_tokens_to_ids(["1", "2", "3"])
    completion_ids = torch.tensor([[a, b, student_eos, tokenizer.pad_token_id],
                                   [c, student_eos, student_eos, student_eos]])
    completion_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    return {"prompt_ids": torch.tensor([prompt, prompt]), "prompt_mask": torch.ones(2, len(prompt), dtype=torch.long),
            "completion_ids": completion_ids, "completion_mask": completion_mask}


def _ids_seen_by(model, calls: list):
    return model.model.embed_tokens.register_forward_pre_hook(lambda module, args: calls.append(args[0].clone()))


def _completion_logprobs(model, input_ids, width, ids):
    """log softmax of the model's own logits (T = 1) at the positions predicting the last `width` tokens of
    `input_ids`, at `ids`."""
    logits = model(input_ids=input_ids).logits[:, -width - 1 : -1]
    return logits.float().log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)


def test_teacher_completion_ids_maps_only_completion_end_tokens():
    ids = torch.tensor([[5, 7, 1, 1], [7, 1, 9, 1]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    mapped = teacher_completion_ids(ids, mask, EndOfTurnMap(1, 2, "<s_end>", "<t_end>"))
    assert mapped.tolist() == [[5, 7, 2, 1], [7, 2, 9, 2]]
    assert ids.tolist() == [[5, 7, 1, 1], [7, 1, 9, 1]]  # the student's tensor is not modified
    assert teacher_completion_ids(ids, mask, None) is ids


@pytest.mark.parametrize("use_fused_loss", [True, False])
def test_base_student_instruct_teacher(tmp_path, caplog, use_fused_loss):
    student_tokenizer, teacher_tokenizer = _tokenizers()
    student_eos, teacher_eos = student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id
    assert student_eos != teacher_eos
    with caplog.at_level(logging.INFO, logger="trl_sdx.entropy_gkd.end_of_turn"):
        trainer = _trainer(tmp_path, student_tokenizer, teacher_tokenizer, tau=float("inf"),  # OPD term only
                           use_fused_loss=use_fused_loss)
    assert "with '<|im_end|>' in place of '<|endoftext|>'" in caplog.text  # turned on by itself, and logged
    assert trainer._end_of_turn == (student_eos, teacher_eos, "<|endoftext|>", "<|im_end|>")

    rollout = _rollout(student_tokenizer, student_eos)
    student_ids = rollout["completion_ids"].clone()
    teacher_calls, student_calls = [], []
    hook = _ids_seen_by(trainer.teacher_model, teacher_calls)
    targets = trainer._score_teacher(rollout)
    hook.remove()

    # The teacher saw the mapped id exactly where the completion holds the student's EOS; the prompt, the other
    # completion tokens and the padding (even padding that uses the EOS id) are as the student wrote them.
    [teacher_input] = teacher_calls
    width = student_ids.shape[1]
    expected = student_ids.clone()
    expected[0, 2] = teacher_eos  # row 0: a, b, EOS | pad
    expected[1, 1] = teacher_eos  # row 1: c, EOS | EOS-as-padding, EOS-as-padding
    assert teacher_input[:, -width:].tolist() == expected.tolist()
    assert torch.equal(teacher_input[:, :-width], rollout["prompt_ids"])
    assert torch.equal(rollout["completion_ids"], student_ids)  # the rollout itself is unchanged

    # The stored log π_T(y_t) is the teacher's log-prob of the mapped token, on the mapped sequence.
    mask = rollout["completion_mask"].bool()
    with torch.no_grad():
        mapped_sequence = torch.cat([rollout["prompt_ids"], expected], 1)
        teacher_mapped = _completion_logprobs(trainer.teacher_model, mapped_sequence, width, expected)
        teacher_unmapped = _completion_logprobs(trainer.teacher_model, mapped_sequence, width, student_ids)
    torch.testing.assert_close(targets.logprob[mask], teacher_mapped[mask], rtol=1e-5, atol=1e-6)
    at_end = mask & (student_ids == student_eos)
    assert (teacher_mapped[at_end] - teacher_unmapped[at_end]).abs().min() > 1e-3  # the mapping matters here

    # The loss: the student's log-probs of its own ids, the advantage with the teacher's log-prob of the mapped
    # token. With π_old = the current student and the gate closed, its value is mean_t[log π_θ(y_t) − log π_T(y'_t)].
    trainer.model.eval()
    hook = _ids_seen_by(trainer.model, student_calls)
    loss = trainer.compute_loss(trainer.model, {**rollout, **targets.as_inputs()})
    hook.remove()
    assert torch.equal(student_calls[-1][:, -width:], student_ids)
    with torch.no_grad():
        student_sequence = torch.cat([rollout["prompt_ids"], student_ids], 1)
        student_logprobs = _completion_logprobs(trainer.model, student_sequence, width, student_ids)
    reference = (student_logprobs - teacher_mapped)[mask].mean()
    torch.testing.assert_close(loss.detach(), reference, rtol=1e-5, atol=1e-6)
    assert (reference - (student_logprobs - teacher_unmapped)[mask].mean()).abs() > 1e-4


def test_mapping_off_or_not_needed(tmp_path):
    student_tokenizer, teacher_tokenizer = _tokenizers()
    assert _trainer(tmp_path, student_tokenizer, teacher_tokenizer, end_of_turn_mapping="off")._end_of_turn is None
    assert _trainer(tmp_path, teacher_tokenizer, teacher_tokenizer)._end_of_turn is None  # same end of turn


def test_mapping_on_refuses_what_it_cannot_do(tmp_path, caplog):
    student_tokenizer, teacher_tokenizer = _tokenizers()
    with pytest.raises(ValueError, match="nothing to map"):
        _trainer(tmp_path, teacher_tokenizer, teacher_tokenizer, end_of_turn_mapping="on")
    with pytest.raises(ValueError, match="needs the teacher's tokenizer"):
        _trainer(tmp_path, student_tokenizer, None, end_of_turn_mapping="on")
    # Full-vocabulary forward KL: the teacher is scored inside the loss on the student's ids.
    with pytest.raises(ValueError, match="cannot apply"):
        _trainer(tmp_path, student_tokenizer, teacher_tokenizer, end_of_turn_mapping="on", fkl_top_k=None)
    with caplog.at_level(logging.WARNING):
        trainer = _trainer(tmp_path, student_tokenizer, teacher_tokenizer, fkl_top_k=None)
    assert trainer._end_of_turn is None and "cannot apply" in caplog.text
