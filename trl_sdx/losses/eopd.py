"""Entropy-Aware On-Policy Distillation (EOPD) loss, arXiv 2603.07079 (official code: `WLS04/EOPD`,
`compute_policy_loss_on_policy_distill`).

`eopd_token_terms` is the paper's per-token equation (the single place it is written down). It reads the teacher
only through its per-token targets (`teacher_targets.py`: entropy, log pi_T(y_t), top-k ids and log-probs), so one
path serves every entry point: teacher scoring -> compact targets -> student loss. `entropy_aware_opd_loss` scores
the teacher's logits inside the call; `eopd_loss_from_targets` takes targets scored once per rollout; the chunked
`fused_*` versions (in `fused.py`) do the same from hidden states and lm_head weights.
"""

from __future__ import annotations

import torch

from ._common import (
    all_finite,
    check_eopd_options,
    check_ids,
    check_logits_pair,
    check_token_inputs,
    entropy_of_logp,
    gate_enabled,
    ids_in_range,
    raise_if_not_finite,
    scaled_logits,
    take_rows,
    upcast,
    valid_row_index,
    zero_loss_like,
)
from .teacher_targets import TeacherTargets, teacher_row_targets

# Order of the per-token statistics accumulated by `eopd_sums` (a flat tensor so chunked code can add it up).
EOPD_STAT_NAMES = ("teacher_entropy", "gate_count", "fkl_gated", "teacher_entropy_gated", "rkl_estimate", "ppo_kl",
                   "ratio_outside_count", "ratio_below_count", "clip_active_count", "student_entropy")


def full_teacher_needed(tau, top_k, rkl_estimator) -> bool:
    """Whether the loss needs the teacher's whole distribution per token (full-vocabulary forward KL, or the
    exact reverse KL), which `TeacherTargets` do not hold: then the teacher must be scored inside the loss."""
    return rkl_estimator == "full" or (gate_enabled(tau) and top_k is None)


def eopd_token_terms(student_logits, teacher, completion_ids, old_logprobs=None, *, tau=0.8, alpha=1.0,
                     clip_eps=0.2, temperature=1.0, rkl_estimator="sampled"):
    r"""Per-token EOPD loss on rows of student logits and the teacher's per-token targets.

    Inputs are rows: `student_logits` [N, V], `completion_ids` [N] (the sampled token y_t each row predicts),
    `old_logprobs` [N] (log pi_old(y_t) from rollout time) or None, and `teacher`, the dict of rows made by
    `teacher_row_targets` (or the fields of `TeacherTargets`): `entropy` H_t, `logprob` log pi_T(y_t), `topk_ids`
    S_t and `topk_logprobs` log ~pi_T on S_t; `logp` (the full [N, V] teacher log-distribution) only for the
    full-vocabulary variants. Student logits are divided by `temperature` (the teacher's targets already are).

    With pi_T the teacher and pi_theta the student at that temperature, for every row t:

        H_t      = - sum_v pi_T(v) log pi_T(v)                                   (teacher entropy, full vocab)
        A_t      = stopgrad[ log pi_T(y_t) - log pi_old(y_t) ]                  (advantage)
        r_t      = pi_theta(y_t) / pi_old(y_t)                                   (PPO ratio)
        L_OPD,t  = max( -r_t A_t , -clip(r_t, 1 - clip_eps, 1 + clip_eps) A_t )
        S_t      = indices of the teacher's k largest logits
        ~pi_T    = log_softmax of the teacher logits over S_t                    (teacher renormalised on S_t)
        L_FKL,t  = sum_{v in S_t} ~pi_T(v) [ log ~pi_T(v) - log pi_theta(v) ]     (student: FULL-vocab log_softmax
                                                                                 gathered at S_t, not renormalised)
        L_t      = L_OPD,t + alpha * 1[H_t >= tau] * L_FKL,t

    Options:
      * `old_logprobs=None`: pi_old = the current student, detached (one optimiser step per rollout: r_t = 1).
      * `tau=inf`: the gate never opens and L_FKL is not computed -> plain OPD. `tau=0`: FKL on every token.
      * `teacher["topk_ids"] is None` with the gate on: S_t is the whole vocabulary (needs `teacher["logp"]`).
      * `rkl_estimator="full"`: L_OPD,t is replaced by the exact reverse KL
        sum_v pi_theta(v) [log pi_theta(v) - log pi_T(v)] (needs `teacher["logp"]`), differentiated through
        pi_theta. There is no sampled-token weight, hence no PPO clipping: the ratio counts are 0 in this mode.

    Returns a dict of [N] tensors: `loss` (differentiable w.r.t. `student_logits`) and the detached
    per-token statistics `teacher_entropy`, `gate` (bool), `fkl` (L_FKL,t, 0 where not computed),
    `rkl_estimate` (log pi_old(y_t) - log pi_T(y_t)), `log_ratio` (log r_t), `ratio_outside` / `ratio_below`
    (bool: r_t outside [1-eps, 1+eps] / below 1-eps, the official `pg_clipfrac` / `pg_clipfrac_lower`),
    `clip_active` (bool: the clipped PPO branch is the max, so the token gets no OPD gradient),
    `student_entropy`.
    """
    student = scaled_logits(student_logits, temperature)
    fkl_on = gate_enabled(tau)
    topk_ids = teacher.get("topk_ids")
    fkl_topk = fkl_on and topk_ids is not None

    student_logp = student.log_softmax(-1)
    # One gather for y_t and the top-k support: its backward scatters into a single [N, V] zero tensor.
    index = torch.cat([completion_ids[:, None], topk_ids], dim=1) if fkl_topk else completion_ids[:, None]
    student_logp_gathered = student_logp.gather(-1, index)
    student_logp_y = student_logp_gathered[:, 0]
    old = student_logp_y.detach() if old_logprobs is None else upcast(old_logprobs).detach().to(student_logp_y.dtype)
    teacher_logp_y = teacher["logprob"].to(student_logp_y.dtype)
    teacher_entropy = teacher["entropy"].to(student_logp_y.dtype)

    with torch.no_grad():
        student_entropy = entropy_of_logp(student_logp.detach())
        rkl_estimate = old - teacher_logp_y
        log_ratio = student_logp_y.detach() - old

    if rkl_estimator == "sampled":
        advantage = teacher_logp_y - old
        ratio = torch.exp(student_logp_y - old)
        unclipped = -advantage * ratio
        clipped_branch = -advantage * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
        opd = torch.maximum(unclipped, clipped_branch)
        with torch.no_grad():
            clip_active = clipped_branch > unclipped
            ratio_below = ratio < 1.0 - clip_eps
            ratio_outside = ratio_below | (ratio > 1.0 + clip_eps)
    else:  # "full": exact reverse KL over the vocabulary, no ratio (see docstring)
        opd = (student_logp.exp() * (student_logp - teacher["logp"])).sum(-1)
        clip_active = ratio_below = ratio_outside = torch.zeros_like(opd, dtype=torch.bool)

    gate = teacher_entropy >= tau
    if fkl_on:
        if fkl_topk:
            support_teacher_logp = teacher["topk_logprobs"].to(student_logp.dtype)
            support_student_logp = student_logp_gathered[:, 1:]
        else:  # full vocabulary: nothing to renormalise
            support_teacher_logp, support_student_logp = teacher["logp"], student_logp
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
        "log_ratio": log_ratio,
        "ratio_outside": ratio_outside,
        "ratio_below": ratio_below,
        "clip_active": clip_active.detach(),
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

    def total(values, where=valid):
        return torch.where(where, values.to(loss.dtype), zero).sum()

    gate = terms["gate"] & valid
    stats = torch.stack([
        total(terms["teacher_entropy"]),
        gate.sum().to(loss.dtype),
        total(terms["fkl"], gate),
        total(terms["teacher_entropy"], gate),
        total(terms["rkl_estimate"]),
        total(terms["log_ratio"]),
        (terms["ratio_outside"] & valid).sum().to(loss.dtype),
        (terms["ratio_below"] & valid).sum().to(loss.dtype),
        (terms["clip_active"] & valid).sum().to(loss.dtype),
        total(terms["student_entropy"]),
    ]).detach()
    return total(loss), stats


def sums_finite(loss_sum: torch.Tensor, stat_sums: torch.Tensor) -> torch.Tensor:
    """0-dim bool, no host sync: the loss sum and the summed entropies are finite iff every logit and target of
    the valid rows is (a NaN or +-inf logit makes its row's log_softmax (+inf, NaN) or p*log p (0 * -inf) NaN)."""
    picked = stat_sums[[EOPD_STAT_NAMES.index("teacher_entropy"), EOPD_STAT_NAMES.index("student_entropy")]]
    return torch.isfinite(torch.cat([loss_sum.detach().reshape(1), picked])).all()


def eopd_stats_from_sums(stat_sums: torch.Tensor, n_valid: int | torch.Tensor) -> dict:
    """Means over valid tokens (`fkl_gated`, `teacher_entropy_gated`: over gated tokens); 0 when there are none.

    The names follow the official verl code where it logs the same quantity: `rkl_estimate` = `actor/rev_kl`,
    `ppo_kl` = `actor/ppo_kl`, `clip_fraction` = `actor/pg_clipfrac` (ratios outside [1-eps, 1+eps]),
    `clip_fraction_lower` = `actor/pg_clipfrac_lower`, `gate_fraction` = `actor/soft_kd_token_ratio`,
    `fkl_gated` = `actor/soft_kd_avg_kl`, `teacher_entropy_gated` = `actor/soft_kd_avg_high_entropy`.
    `clip_active_fraction` (tokens whose clipped branch binds, so they get no OPD gradient) is ours."""
    sums = dict(zip(EOPD_STAT_NAMES, stat_sums.detach().unbind(0)))
    n = torch.as_tensor(n_valid, dtype=stat_sums.dtype, device=stat_sums.device).clamp(min=1)
    gated = sums["gate_count"].clamp(min=1)
    return {
        "teacher_entropy": sums["teacher_entropy"] / n,
        "gate_fraction": sums["gate_count"] / n,
        "fkl_gated": sums["fkl_gated"] / gated,
        "teacher_entropy_gated": sums["teacher_entropy_gated"] / gated,
        "rkl_estimate": sums["rkl_estimate"] / n,
        "ppo_kl": sums["ppo_kl"] / n,
        "clip_fraction": sums["ratio_outside_count"] / n,
        "clip_fraction_lower": sums["ratio_below_count"] / n,
        "clip_active_fraction": sums["clip_active_count"] / n,
        "student_entropy": sums["student_entropy"] / n,
    }


def check_eopd_targets(teacher_targets, leading, *, tau, top_k, rkl_estimator) -> None:
    """`teacher_targets` must be a `TeacherTargets` of the mask's shape, scored with the loss's `top_k`."""
    if not isinstance(teacher_targets, TeacherTargets):
        raise ValueError(f"`teacher_targets` must be a `TeacherTargets` (from `score_teacher_targets`), got "
                         f"{type(teacher_targets).__name__}.")
    if full_teacher_needed(tau, top_k, rkl_estimator):
        raise ValueError(
            f"rkl_estimator={rkl_estimator!r} with top_k={top_k} needs the teacher's full distribution on every "
            "token, which `TeacherTargets` do not hold: pass the teacher's logits / hidden states instead."
        )
    for name, value in zip(("entropy", "logprob"), teacher_targets[:2]):
        check_token_inputs(f"teacher_targets.{name}", value, leading)
    if gate_enabled(tau) and teacher_targets.top_k != top_k:
        raise ValueError(
            f"`teacher_targets` hold the teacher's top-{teacher_targets.top_k} but the loss was asked for "
            f"top_k={top_k}: score the targets with the same `top_k`."
        )
    if teacher_targets.topk_ids is not None:
        expect = (*leading, teacher_targets.top_k)
        for name in ("topk_ids", "topk_logprobs"):
            value = getattr(teacher_targets, name)
            if value is None or tuple(value.shape) != expect:
                raise ValueError(f"`teacher_targets.{name}` must have shape {list(expect)}, got "
                                 f"{None if value is None else list(value.shape)}.")


def finish(loss, stat_sums, n_valid, finite, what, *, check_finite, return_stats):
    """Shared tail of every EOPD entry point: raise on non-finite inputs now (one host sync) or hand the device
    flag back in `stats["inputs_finite"]` for the caller to read when it likes (`check_finite=False`)."""
    if check_finite:
        raise_if_not_finite(finite, what)
    if not return_stats:
        return loss
    stats = eopd_stats_from_sums(stat_sums, n_valid)
    stats["inputs_finite"] = finite
    return loss, stats


def _empty(ref_tensors, *, check_finite, return_stats):
    loss = zero_loss_like(*ref_tensors)
    finite = torch.ones((), dtype=torch.bool, device=loss.device)
    return finish(loss, loss.new_zeros(len(EOPD_STAT_NAMES)), 0, finite, "", check_finite=check_finite,
                  return_stats=return_stats)


def _valid_student_rows(student_logits, completion_ids, old_logprobs, mask, *, check_finite):
    """Valid rows of the student inputs, ids checked (eagerly, or folded into the returned flag)."""
    rows = valid_row_index(mask)
    ids = take_rows(completion_ids, rows).long()
    old = take_rows(old_logprobs, rows) if old_logprobs is not None else None
    ok = torch.ones((), dtype=torch.bool, device=student_logits.device)
    if check_finite:
        check_ids(ids, student_logits.shape[-1])
        if old is not None:
            raise_if_not_finite(all_finite(old), "`old_logprobs`")
    else:
        ids, ok = ids_in_range(ids, student_logits.shape[-1])
        if old is not None:
            ok = ok & all_finite(old)
    return rows, ids, old, ok


_OPTION_DOC = """
        tau: entropy gate threshold in nats (paper 0.8; inf = plain OPD, 0 = FKL on every token).
        alpha: weight of the gated forward-KL term (paper 1.0).
        clip_eps: PPO clip range epsilon (paper 0.2).
        temperature: rollout temperature; logits are divided by it.
        return_stats: also return a dict of detached scalars (see `eopd_stats_from_sums`) plus `inputs_finite`.
        check_finite: raise a ValueError at once on non-finite logits / old log-probs or out-of-range ids on
            valid tokens (one host sync per call). `False` (trainers): no host sync; the 0-dim bool
            `stats["inputs_finite"]` says whether they were all fine (ids are clamped meanwhile).
"""


def entropy_aware_opd_loss(student_logits, teacher_logits, completion_ids, completion_mask, old_logprobs=None, *,
                           tau=0.8, alpha=1.0, top_k=16, clip_eps=0.2, temperature=1.0, rkl_estimator="sampled",
                           return_stats=False, check_finite=True):
    r"""EOPD loss on full logits: token-mean over all valid tokens of `eopd_token_terms`.

        loss = ( sum_{t valid} L_OPD,t + alpha * 1[H_t >= tau] * L_FKL,t ) / #(valid tokens)

    (see `eopd_token_terms` for the per-token equation). The denominator counts every valid token, not
    only the gated ones, as in the official code. The teacher's targets are scored from `teacher_logits` on the
    valid rows (`teacher_row_targets`); with targets already scored, use `eopd_loss_from_targets`.

    Args:
        student_logits, teacher_logits: [B, T, V]; position t predicts `completion_ids[:, t]`.
        completion_ids: [B, T] sampled tokens y_t.
        completion_mask: [B, T], 1 for completion tokens that count, 0 for padding.
        old_logprobs: [B, T] log pi_old(y_t) at rollout time, or None (= current student, detached).
        top_k: teacher top-k support of the forward KL (paper 16; None = full vocabulary).
        rkl_estimator: "sampled" (paper) or "full" (exact reverse KL, no PPO ratio).""" + _OPTION_DOC + """
    An all-masked batch returns 0 with a grad_fn.
    """
    check_logits_pair(student_logits, teacher_logits, completion_mask)
    leading = tuple(completion_mask.shape)
    check_token_inputs("completion_ids", completion_ids, leading, integer=True)
    check_token_inputs("old_logprobs", old_logprobs, leading)
    check_eopd_options(tau=tau, alpha=alpha, top_k=top_k, clip_eps=clip_eps, temperature=temperature,
                       rkl_estimator=rkl_estimator, vocab_size=student_logits.shape[-1])
    rows, ids, old, ok = _valid_student_rows(student_logits, completion_ids, old_logprobs, completion_mask,
                                             check_finite=check_finite)
    if rows.numel() == 0:
        return _empty((student_logits, teacher_logits), check_finite=check_finite, return_stats=return_stats)
    student_rows = take_rows(student_logits, rows)
    teacher = teacher_row_targets(take_rows(teacher_logits, rows), ids, top_k=top_k if gate_enabled(tau) else None,
                                  temperature=temperature, keep_full=full_teacher_needed(tau, top_k, rkl_estimator))
    terms = eopd_token_terms(student_rows, teacher, ids, old, tau=tau, alpha=alpha, clip_eps=clip_eps,
                             temperature=temperature, rkl_estimator=rkl_estimator)
    loss_sum, stat_sums = eopd_sums(terms)
    finite = ok & sums_finite(loss_sum, stat_sums)
    if check_finite and not bool(finite):  # only then pay for the full checks that name the culprit
        raise_if_not_finite(all_finite(student_rows), "`student_logits`")
        raise_if_not_finite(all_finite(take_rows(teacher_logits, rows)), "`teacher_logits`")
    return finish(loss_sum / rows.numel(), stat_sums, rows.numel(), finite, "`student_logits`/`teacher_logits`",
                  check_finite=check_finite, return_stats=return_stats)


def eopd_loss_from_targets(student_logits, teacher_targets, completion_ids, completion_mask, old_logprobs=None, *,
                           tau=0.8, alpha=1.0, top_k=16, clip_eps=0.2, temperature=1.0, return_stats=False,
                           check_finite=True):
    r"""`entropy_aware_opd_loss` (sampled-token estimator) with the teacher already scored: the student alone.

    `teacher_targets` is a `TeacherTargets` [B, T(, k)] from `score_teacher_targets` /
    `teacher_targets_from_logits`, scored once per rollout with the same `top_k` and `temperature`; the value
    and gradient equal `entropy_aware_opd_loss` on the teacher's logits.

    Args:
        student_logits: [B, T, V]; position t predicts `completion_ids[:, t]`.
        completion_ids, completion_mask, old_logprobs: as in `entropy_aware_opd_loss`.
        top_k: the k the targets were scored with (checked; None only with the gate off).""" + _OPTION_DOC
    leading = tuple(completion_mask.shape)
    if student_logits.dim() != 3 or tuple(student_logits.shape[:2]) != leading:
        raise ValueError(f"`student_logits` must be [batch, length, vocab] matching the mask {list(leading)}, got "
                         f"{list(student_logits.shape)}.")
    check_token_inputs("completion_ids", completion_ids, leading, integer=True)
    check_token_inputs("old_logprobs", old_logprobs, leading)
    check_eopd_options(tau=tau, alpha=alpha, top_k=top_k, clip_eps=clip_eps, temperature=temperature,
                       rkl_estimator="sampled", vocab_size=student_logits.shape[-1])
    check_eopd_targets(teacher_targets, leading, tau=tau, top_k=top_k, rkl_estimator="sampled")
    rows, ids, old, ok = _valid_student_rows(student_logits, completion_ids, old_logprobs, completion_mask,
                                             check_finite=check_finite)
    if rows.numel() == 0:
        return _empty((student_logits,), check_finite=check_finite, return_stats=return_stats)
    student_rows = take_rows(student_logits, rows)
    terms = eopd_token_terms(student_rows, teacher_targets.take(rows)._asdict(), ids, old, tau=tau, alpha=alpha,
                             clip_eps=clip_eps, temperature=temperature)
    loss_sum, stat_sums = eopd_sums(terms)
    return finish(loss_sum / rows.numel(), stat_sums, rows.numel(), ok & sums_finite(loss_sum, stat_sums),
                  "`student_logits`/`teacher_targets`", check_finite=check_finite, return_stats=return_stats)
