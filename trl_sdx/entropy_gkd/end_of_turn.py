"""Base-model student, instruct teacher: the teacher scores the completion with its own end-of-turn token.

In the paper's setting the student is a Base model, whose turn ends with its EOS (`<|endoftext|>` for Qwen3-Base),
and the teacher an instruct model, whose turn ends with `<|im_end|>`. Scored as-is, the teacher finds the student's
`<|endoftext|>` after an answer very unlikely, so the advantage log π_T(y_t) − log π_old(y_t) punishes the student
for ending its answer. The official code replaces the student's `<|endoftext|>` by `<|im_end|>` before the teacher
scores the sequence (`../shared/specs/eopd.md`); so does `teacher_completion_ids`. The student's own ids, its
log-probs and the ratio are untouched: only what the teacher sees, and the token whose teacher log-prob enters the
advantage, change.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from accelerate.logging import get_logger

logger = get_logger(__name__)


class EndOfTurnMap(NamedTuple):
    """The student's end-of-turn token id and the teacher's, which replaces it in the teacher's view."""

    student_id: int
    teacher_id: int
    student_token: str
    teacher_token: str


def resolve_end_of_turn_mapping(mode: str, student_tokenizer, teacher_tokenizer, *,
                                scored_at_rollout: bool = True) -> EndOfTurnMap | None:
    """The mapping `end_of_turn_mapping` asks for ('auto', 'on', 'off'), from the two tokenizers' EOS tokens.

    'auto' maps when both tokenizers are known and their EOS tokens differ, and logs it; 'on' raises when it cannot
    map (no teacher tokenizer, or the same EOS); 'off' never maps. The mapping needs the teacher scored at rollout
    time (`scored_at_rollout`): the full-vocabulary variants score it inside the loss, on the student's ids.
    """
    if mode == "off":
        return None
    if teacher_tokenizer is None or getattr(teacher_tokenizer, "eos_token_id", None) is None:
        if mode == "on":
            raise ValueError(
                "`end_of_turn_mapping='on'` needs the teacher's tokenizer to know its end-of-turn token: pass "
                "`teacher_processing_class` (or a teacher path whose tokenizer can be loaded)."
            )
        logger.info("end_of_turn_mapping='auto': the teacher's tokenizer is not known, so the teacher scores the "
                    "student's end-of-turn token as it is (pass `teacher_processing_class` to compare them).")
        return None
    student_id, teacher_id = student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id
    if student_id is None:
        raise ValueError("The student's tokenizer has no EOS token, so its end of turn is unknown; set one "
                         "(`tokenizer.eos_token = ...`) or `end_of_turn_mapping='off'`.")
    if student_id == teacher_id:
        if mode == "on":
            raise ValueError(
                f"`end_of_turn_mapping='on'`, but student and teacher both end a turn with "
                f"{student_tokenizer.eos_token!r}: there is nothing to map. Use 'auto' or 'off'."
            )
        return None
    mapping = EndOfTurnMap(student_id, teacher_id, student_tokenizer.eos_token, teacher_tokenizer.eos_token)
    if not scored_at_rollout:
        message = (f"The student ends a turn with {mapping.student_token!r}, the teacher with "
                   f"{mapping.teacher_token!r}, but the full-vocabulary variants (`fkl_top_k=None` with the gate "
                   "open, or `rkl_estimator='full'`) score the teacher inside the loss on the student's ids, so the "
                   "end-of-turn mapping cannot apply. Use a top-k forward KL (`fkl_top_k`, paper 16) with "
                   "`rkl_estimator='sampled'` to map it")
        if mode == "on":
            raise ValueError(f"{message}, or set `end_of_turn_mapping='off'`.")
        logger.warning(f"{message}; the teacher scores {mapping.student_token!r} as it is.", main_process_only=True)
        return None
    logger.info(f"The student ends a turn with {mapping.student_token!r} (id {student_id}), the teacher with "
                f"{mapping.teacher_token!r} (id {teacher_id}): the teacher scores completions with "
                f"{mapping.teacher_token!r} in place of {mapping.student_token!r} (end_of_turn_mapping="
                f"{mode!r}; 'off' disables it).", main_process_only=True)
    return mapping


def teacher_completion_ids(completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                           mapping: EndOfTurnMap | None) -> torch.Tensor:
    """The completion as the teacher sees it: the student's end-of-turn id → the teacher's, on completion tokens
    (mask 1) only; padding, which may use the same id, is left alone. A new tensor; `completion_ids` is unchanged."""
    if mapping is None:
        return completion_ids
    is_end = (completion_ids == mapping.student_id) & completion_mask.bool()
    return torch.where(is_end, torch.full_like(completion_ids, mapping.teacher_id), completion_ids)
