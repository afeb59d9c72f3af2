"""Distillation losses. Each paper equation lives in one per-token function (`eopd_token_terms`,
`topk_kl_token_terms`); the plain (full-logits) and fused (chunked lm_head) entry points share it."""

from .eopd import entropy_aware_opd_loss, eopd_token_terms
from .fused import fused_entropy_aware_opd_loss, fused_topk_distillation_loss
from .topk_kl import topk_distillation_loss, topk_kl_token_terms

__all__ = [
    "entropy_aware_opd_loss",
    "eopd_token_terms",
    "fused_entropy_aware_opd_loss",
    "fused_topk_distillation_loss",
    "topk_distillation_loss",
    "topk_kl_token_terms",
]
