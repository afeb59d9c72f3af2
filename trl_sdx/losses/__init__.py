"""Distillation losses. Each paper equation lives in one per-token function (`eopd_token_terms`,
`topk_kl_token_terms`); the plain (full-logits) and fused (chunked lm_head) entry points share it. The teacher's
per-token targets (`score_teacher_targets`) can be computed once per rollout and handed to the student-only
losses (`eopd_loss_from_targets`, `fused_eopd_loss_from_targets`)."""

from .eopd import entropy_aware_opd_loss, eopd_loss_from_targets, eopd_token_terms
from .fused import fused_entropy_aware_opd_loss, fused_eopd_loss_from_targets, fused_topk_distillation_loss
from .teacher_targets import (
    TeacherTargets,
    score_teacher_targets,
    teacher_row_targets,
    teacher_targets_from_logits,
    token_logprobs,
    token_logprobs_from_logits,
)
from .topk_kl import topk_distillation_loss, topk_kl_token_terms
from .topk_kl_liger import LigerFusedLinearTopKKLFunction, liger_topk_distillation_loss

__all__ = [
    "TeacherTargets",
    "entropy_aware_opd_loss",
    "eopd_loss_from_targets",
    "eopd_token_terms",
    "fused_entropy_aware_opd_loss",
    "fused_eopd_loss_from_targets",
    "fused_topk_distillation_loss",
    "liger_topk_distillation_loss",
    "LigerFusedLinearTopKKLFunction",
    "score_teacher_targets",
    "teacher_row_targets",
    "teacher_targets_from_logits",
    "token_logprobs",
    "token_logprobs_from_logits",
    "topk_distillation_loss",
    "topk_kl_token_terms",
]
