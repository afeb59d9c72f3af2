"""SD-Zero's top-k distillation loss, arXiv 2604.12002 (official code: `princeton-pli/Self-Distillation-Zero`,
`DistillationLossFn` in `nemo_rl/algorithms/loss_functions.py`).

`topk_kl_token_terms` is the per-token equation; `topk_distillation_loss` (full logits) and
`fused_topk_distillation_loss` (chunked, in `fused.py`) both call it.
"""

from __future__ import annotations

import torch

from ._common import (
    all_finite,
    check_logits_pair,
    check_topk_kl_options,
    raise_if_not_finite,
    scaled_logits,
    take_rows,
    valid_row_index,
    zero_loss_like,
)

TOPK_KL_STAT_NAMES = ("forward_kl", "reverse_kl")


def topk_kl_token_terms(student_logits, teacher_logits, *, kl_type="mixed", mixed_kl_weight=0.5, top_k=64,
                        temperature=1.0):
    r"""Per-token KL between teacher and student, both renormalised over the teacher's top-k.

    Rows: logits [N, V], divided by `temperature` first. For each row t:

        S_t    = indices of the teacher's `top_k` largest logits (the whole vocabulary if top_k is None)
        ~p_T   = log_softmax of the teacher logits gathered at S_t
        ~p_S   = log_softmax of the student logits gathered at S_t      (student ALSO renormalised on S_t)
        FKL_t  = sum_{v in S_t} ~p_T(v) [ log ~p_T(v) - log ~p_S(v) ]
        RKL_t  = sum_{v in S_t} ~p_S(v) [ log ~p_S(v) - log ~p_T(v) ]
        L_t    = FKL_t                              (kl_type="forward")
               = RKL_t                              (kl_type="reverse", the paper's Eq. 4)
               = w * FKL_t + (1 - w) * RKL_t        (kl_type="mixed", w = mixed_kl_weight; code default w = 0.5)

    Returns a dict of [N] tensors: `loss` (differentiable w.r.t. `student_logits`), and detached
    `forward_kl`, `reverse_kl` for logging.
    """
    student = scaled_logits(student_logits, temperature)
    with torch.no_grad():
        teacher = scaled_logits(teacher_logits.detach(), temperature)
        if top_k is None:
            teacher_logp = teacher.log_softmax(-1)
        else:
            top_logits, top_index = teacher.topk(int(top_k), dim=-1)
            teacher_logp = top_logits.log_softmax(-1)
        teacher_p = teacher_logp.exp()

    student_support = student if top_k is None else student.gather(-1, top_index)
    student_logp = student_support.log_softmax(-1)
    student_p = student_logp.exp()

    forward = (teacher_p * (teacher_logp - student_logp)).sum(-1)
    reverse = (student_p * (student_logp - teacher_logp)).sum(-1)
    if kl_type == "forward":
        loss = forward
    elif kl_type == "reverse":
        loss = reverse
    else:
        loss = mixed_kl_weight * forward + (1.0 - mixed_kl_weight) * reverse
    return {"loss": loss, "forward_kl": forward.detach(), "reverse_kl": reverse.detach()}


def topk_kl_sums(terms, valid: torch.Tensor | None = None):
    """(loss sum, per-row loss with padding zeroed, [forward_kl sum, reverse_kl sum]) over `valid` rows."""
    loss = terms["loss"]
    if valid is None:
        valid = torch.ones_like(loss, dtype=torch.bool)
    zero = loss.new_zeros(())
    per_row = torch.where(valid, loss, zero)
    stats = torch.stack([torch.where(valid, terms[name], zero).sum() for name in TOPK_KL_STAT_NAMES]).detach()
    return per_row.sum(), per_row.detach(), stats


def topk_kl_stats(stat_sums: torch.Tensor, per_token_loss: torch.Tensor, n_valid) -> dict:
    n = torch.as_tensor(n_valid, dtype=stat_sums.dtype, device=stat_sums.device).clamp(min=1)
    stats = {name: value / n for name, value in zip(TOPK_KL_STAT_NAMES, stat_sums.detach().unbind(0))}
    stats["per_token_loss"] = per_token_loss
    return stats


def scatter_rows(values: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row values back to the [B, T] layout of the mask, 0 on masked positions."""
    out = torch.zeros(mask.numel(), dtype=values.dtype, device=values.device)
    out[rows] = values
    return out.view(mask.shape)


def topk_distillation_loss(student_logits, teacher_logits, mask, *, kl_type="mixed", mixed_kl_weight=0.5, top_k=64,
                           temperature=1.0, return_stats=False):
    r"""SD-Zero distillation loss on full logits: token-mean over all valid tokens of `topk_kl_token_terms`.

        loss = sum_{t valid} L_t / #(valid tokens)

    Args:
        student_logits, teacher_logits: [B, T, V], aligned so that position t of both predicts the same token.
        mask: [B, T], 1 for tokens that count.
        kl_type: "forward", "reverse" or "mixed" (default, w * FKL + (1 - w) * RKL).
        mixed_kl_weight: w in [0, 1] (code default 0.5).
        top_k: size of the teacher's top-k support S_t (paper 64; None = full vocabulary).
        temperature: both logits are divided by it.
        return_stats: also return a dict with `per_token_loss` [B, T] (detached, 0 where masked) and the
            token-mean `forward_kl` and `reverse_kl` (both on the renormalised support).

    An all-masked batch returns 0 with a grad_fn.
    """
    check_logits_pair(student_logits, teacher_logits, mask)
    check_topk_kl_options(kl_type=kl_type, mixed_kl_weight=mixed_kl_weight, top_k=top_k, temperature=temperature,
                          vocab_size=student_logits.shape[-1])
    rows = valid_row_index(mask)
    n_valid = rows.numel()
    if n_valid == 0:
        loss = zero_loss_like(student_logits, teacher_logits)
        per_token = torch.zeros(mask.shape, dtype=loss.dtype, device=loss.device)
        return (loss, topk_kl_stats(loss.new_zeros(len(TOPK_KL_STAT_NAMES)), per_token, 0)) if return_stats else loss

    student_rows = take_rows(student_logits, rows)
    teacher_rows = take_rows(teacher_logits, rows)
    with torch.no_grad():
        raise_if_not_finite(all_finite(student_rows), "`student_logits`")
        raise_if_not_finite(all_finite(teacher_rows), "`teacher_logits`")
    terms = topk_kl_token_terms(student_rows, teacher_rows, kl_type=kl_type, mixed_kl_weight=mixed_kl_weight,
                                top_k=top_k, temperature=temperature)
    loss_sum, per_row, stat_sums = topk_kl_sums(terms)
    loss = loss_sum / n_valid
    if not return_stats:
        return loss
    return loss, topk_kl_stats(stat_sums, scatter_rows(per_row, rows, mask), n_valid)
