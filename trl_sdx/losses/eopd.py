"""Entropy-Aware On-Policy Distillation (EOPD) loss, arXiv 2603.07079 (official code: `WLS04/EOPD`,
`compute_policy_loss_on_policy_distill`).

`eopd_token_terms` is the paper's per-token equation (the single place it is written down); the plain
`entropy_aware_opd_loss` and the chunked `fused_entropy_aware_opd_loss` (in `fused.py`) both call it and
only differ in how they produce the logits rows and accumulate the sums.
"""

from __future__ import annotations

import torch

from ._common import (
    all_finite,
    check_eopd_options,
    check_ids,
    check_logits_pair,
    check_token_inputs,
    gate_enabled,
    raise_if_not_finite,
    scaled_logits,
    take_rows,
    upcast,
    valid_row_index,
    zero_loss_like,
)

# Order of the per-token statistics accumulated by `eopd_sums` (a flat tensor so chunked code can add it up).
EOPD_STAT_NAMES = ("teacher_entropy", "gate_count", "fkl_gated", "rkl_estimate", "clip_count", "student_entropy")


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    """-sum_v p log p of a (detached) log-distribution with one [N, V] temporary instead of two."""
    plogp = logp.exp()
    plogp.mul_(logp)
    return -plogp.sum(-1)


def eopd_token_terms(student_logits, teacher_logits, completion_ids, old_logprobs=None, *, tau=0.8, alpha=1.0,
                     top_k=16, clip_eps=0.2, temperature=1.0, rkl_estimator="sampled"):
    r"""Per-token EOPD loss on rows of logits.

    Inputs are rows: logits [N, V], `completion_ids` [N] (the sampled token y_t each row predicts),
    `old_logprobs` [N] (log pi_old(y_t) from rollout time) or None. Logits are divided by `temperature` first.

    With pi_T the teacher and pi_theta the student at that temperature, for every row t:

        H_t      = - sum_v pi_T(v) log pi_T(v)                                   (teacher entropy, full vocab)
        A_t      = stopgrad[ log pi_T(y_t) - log pi_old(y_t) ]                  (advantage)
        r_t      = pi_theta(y_t) / pi_old(y_t)                                   (PPO ratio)
        L_OPD,t  = max( -r_t A_t , -clip(r_t, 1 - clip_eps, 1 + clip_eps) A_t )
        S_t      = indices of the teacher's `top_k` largest logits
        ~pi_T    = log_softmax of the teacher logits over S_t                    (teacher renormalised on S_t)
        L_FKL,t  = sum_{v in S_t} ~pi_T(v) [ log ~pi_T(v) - log pi_theta(v) ]     (student: FULL-vocab log_softmax
                                                                                 gathered at S_t, not renormalised)
        L_t      = L_OPD,t + alpha * 1[H_t >= tau] * L_FKL,t

    Options:
      * `old_logprobs=None`: pi_old = the current student, detached (one optimiser step per rollout: r_t = 1).
      * `tau=inf`: the gate never opens and L_FKL is not computed -> plain OPD. `tau=0`: FKL on every token.
      * `top_k=None`: S_t is the whole vocabulary (plain forward KL, no renormalisation needed).
      * `rkl_estimator="full"`: L_OPD,t is replaced by the exact reverse KL
        sum_v pi_theta(v) [log pi_theta(v) - log pi_T(v)], differentiated through pi_theta. There is no sampled
        token weight and therefore no PPO ratio or clipping in this mode (`old_logprobs` then only feeds the
        `rkl_estimate` statistic; `clipped` is all False).

    Returns a dict of [N] tensors: `loss` (differentiable w.r.t. `student_logits`) and the detached
    per-token statistics `teacher_entropy`, `gate` (bool), `fkl` (L_FKL,t, 0 where not computed),
    `rkl_estimate` (log pi_old(y_t) - log pi_T(y_t)), `clipped` (bool: the clipped PPO branch is the max,
    so the token gets no gradient), `student_entropy`.
    """
    student = scaled_logits(student_logits, temperature)
    fkl_on, fkl_topk = gate_enabled(tau), gate_enabled(tau) and top_k is not None
    with torch.no_grad():
        teacher = scaled_logits(teacher_logits.detach(), temperature)
        teacher_logp = teacher.log_softmax(-1)
        teacher_entropy = _entropy(teacher_logp)
        teacher_logp_y = teacher_logp.gather(-1, completion_ids[:, None]).squeeze(-1)
        if fkl_topk:
            top_logits, top_index = teacher.topk(int(top_k), dim=-1)
            support_teacher_logp = top_logits.log_softmax(-1)

    student_logp = student.log_softmax(-1)
    # One gather for y_t and the top-k support: its backward scatters into a single [N, V] zero tensor.
    index = torch.cat([completion_ids[:, None], top_index], dim=1) if fkl_topk else completion_ids[:, None]
    student_logp_gathered = student_logp.gather(-1, index)
    student_logp_y = student_logp_gathered[:, 0]
    old = student_logp_y.detach() if old_logprobs is None else upcast(old_logprobs).detach().to(student_logp_y.dtype)

    with torch.no_grad():
        student_entropy = _entropy(student_logp.detach())
        rkl_estimate = old - teacher_logp_y

    if rkl_estimator == "sampled":
        advantage = teacher_logp_y - old
        ratio = torch.exp(student_logp_y - old)
        unclipped = -advantage * ratio
        clipped_branch = -advantage * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
        opd = torch.maximum(unclipped, clipped_branch)
        clipped = (clipped_branch > unclipped).detach()
    else:  # "full": exact reverse KL over the vocabulary, no ratio (see docstring)
        opd = (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
        clipped = torch.zeros_like(opd, dtype=torch.bool)

    gate = teacher_entropy >= tau
    if fkl_on:
        if fkl_topk:
            support_student_logp = student_logp_gathered[:, 1:]
        else:  # full vocabulary: nothing to renormalise
            support_teacher_logp, support_student_logp = teacher_logp, student_logp
        fkl = (support_teacher_logp.exp() * (support_teacher_logp - support_student_logp)).sum(-1)
        loss = opd + alpha * gate.to(fkl.dtype) * fkl
        fkl = fkl.detach()
    else:
        loss = opd
        fkl = torch.zeros_like(teacher_entropy)

    return {
        "loss": loss,
        "teacher_entropy": teacher_entropy,
        "gate": gate,
        "fkl": fkl,
        "rkl_estimate": rkl_estimate,
        "clipped": clipped,
        "student_entropy": student_entropy,
    }


def eopd_sums(terms, valid: torch.Tensor | None = None):
    """(sum of the loss, sums of the statistics in `EOPD_STAT_NAMES` order) over rows where `valid`.

    `valid` marks padding rows that chunked code appends to reach a fixed chunk shape; they hold finite
    dummy values, and `torch.where` keeps both their value and their gradient out of the sums."""
    loss = terms["loss"]
    if valid is None:
        valid = torch.ones_like(loss, dtype=torch.bool)
    zero = loss.new_zeros(())
    loss_sum = torch.where(valid, loss, zero).sum()
    gate = terms["gate"] & valid
    stats = torch.stack([
        torch.where(valid, terms["teacher_entropy"], zero).sum(),
        gate.sum().to(loss.dtype),
        torch.where(gate, terms["fkl"], zero).sum(),
        torch.where(valid, terms["rkl_estimate"], zero).sum(),
        (terms["clipped"] & valid).sum().to(loss.dtype),
        torch.where(valid, terms["student_entropy"], zero).sum(),
    ]).detach()
    return loss_sum, stats


def entropies_finite(stat_sums: torch.Tensor) -> torch.Tensor:
    """The summed teacher and student entropies are finite iff every logit of the valid rows is: a NaN or
    +-inf logit makes its row's log_softmax (+inf, NaN) or p*log p (0 * -inf) NaN. A free check."""
    entropy_sums = stat_sums[[EOPD_STAT_NAMES.index("teacher_entropy"), EOPD_STAT_NAMES.index("student_entropy")]]
    return torch.isfinite(entropy_sums).all()


def eopd_stats_from_sums(stat_sums: torch.Tensor, n_valid: int | torch.Tensor) -> dict:
    """Means over valid tokens (`fkl_gated`: over gated tokens); 0 when there are none."""
    sums = dict(zip(EOPD_STAT_NAMES, stat_sums.detach().unbind(0)))
    n = torch.as_tensor(n_valid, dtype=stat_sums.dtype, device=stat_sums.device).clamp(min=1)
    gated = sums["gate_count"]
    return {
        "teacher_entropy": sums["teacher_entropy"] / n,
        "gate_fraction": gated / n,
        "fkl_gated": sums["fkl_gated"] / gated.clamp(min=1),
        "rkl_estimate": sums["rkl_estimate"] / n,
        "clip_fraction": sums["clip_count"] / n,
        "student_entropy": sums["student_entropy"] / n,
    }


def entropy_aware_opd_loss(student_logits, teacher_logits, completion_ids, completion_mask, old_logprobs=None, *,
                           tau=0.8, alpha=1.0, top_k=16, clip_eps=0.2, temperature=1.0, rkl_estimator="sampled",
                           return_stats=False):
    r"""EOPD loss on full logits: token-mean over all valid tokens of `eopd_token_terms`.

        loss = ( sum_{t valid} L_OPD,t + alpha * 1[H_t >= tau] * L_FKL,t ) / #(valid tokens)

    (see `eopd_token_terms` for the per-token equation). The denominator counts every valid token, not
    only the gated ones, as in the official code.

    Args:
        student_logits, teacher_logits: [B, T, V]; position t predicts `completion_ids[:, t]`.
        completion_ids: [B, T] sampled tokens y_t.
        completion_mask: [B, T], 1 for completion tokens that count, 0 for padding.
        old_logprobs: [B, T] log pi_old(y_t) at rollout time, or None (= current student, detached).
        tau: entropy gate threshold in nats (paper 0.8; inf = plain OPD, 0 = FKL on every token).
        alpha: weight of the gated forward-KL term (paper 1.0).
        top_k: teacher top-k support of the forward KL (paper 16; None = full vocabulary).
        clip_eps: PPO clip range epsilon (paper 0.2).
        temperature: rollout temperature; both logits are divided by it.
        rkl_estimator: "sampled" (paper) or "full" (exact reverse KL, no PPO ratio).
        return_stats: also return a dict of detached scalars: teacher_entropy, gate_fraction, fkl_gated,
            rkl_estimate, clip_fraction, student_entropy.

    An all-masked batch returns 0 with a grad_fn.
    """
    check_logits_pair(student_logits, teacher_logits, completion_mask)
    leading = tuple(completion_mask.shape)
    check_token_inputs("completion_ids", completion_ids, leading, integer=True)
    check_token_inputs("old_logprobs", old_logprobs, leading)
    vocab_size = student_logits.shape[-1]
    check_eopd_options(tau=tau, alpha=alpha, top_k=top_k, clip_eps=clip_eps, temperature=temperature,
                       rkl_estimator=rkl_estimator, vocab_size=vocab_size)

    rows = valid_row_index(completion_mask)
    n_valid = rows.numel()
    if n_valid == 0:
        loss = zero_loss_like(student_logits, teacher_logits)
        stats = eopd_stats_from_sums(loss.new_zeros(len(EOPD_STAT_NAMES)).detach(), 0)
        return (loss, stats) if return_stats else loss

    student_rows = take_rows(student_logits, rows)
    teacher_rows = take_rows(teacher_logits, rows)
    ids = take_rows(completion_ids, rows).long()
    old = take_rows(old_logprobs, rows) if old_logprobs is not None else None
    check_ids(ids, vocab_size)
    if old is not None:
        raise_if_not_finite(all_finite(old), "`old_logprobs`")

    terms = eopd_token_terms(student_rows, teacher_rows, ids, old, tau=tau, alpha=alpha, top_k=top_k,
                             clip_eps=clip_eps, temperature=temperature, rkl_estimator=rkl_estimator)
    loss_sum, stat_sums = eopd_sums(terms)
    if not bool(entropies_finite(stat_sums)):  # only then pay for the full checks that name the culprit
        raise_if_not_finite(all_finite(student_rows), "`student_logits`")
        raise_if_not_finite(all_finite(teacher_rows), "`teacher_logits`")
    loss = loss_sum / n_valid
    if not return_stats:
        return loss
    return loss, eopd_stats_from_sums(stat_sums, n_valid)
