"""Chunked ("fused linear") versions of the losses: never build [N, V] logits for the whole batch.

Why not `LigerFusedLinearDistillationBase` for EOPD: its loss hook sees only (student_logits, teacher_logits,
target) per chunk and divides by the count of non-ignored targets, whereas EOPD needs per-token extra inputs
(sampled ids, old log-probs) and statistics out of every chunk. SD-Zero's top-k KL does fit it (per-reward sums
come from one call per reward group): `topk_kl_liger.py` is that subclass, selectable by `loss_implementation`.
This module follows the same recipe in one shared `torch.autograd.Function`:

* rows = valid tokens only (padding never enters any computation);
* per chunk of `chunk_size` rows: logits = hidden @ W^T (+ b) for student and teacher (teacher under no_grad),
  the per-token equation from `eopd.py` / `topk_kl.py`, and dloss/dlogits (`torch.autograd.grad` in eager,
  `torch.func.grad_and_value` when compiled);
* still inside the forward: grad_hidden = g @ W and grad_W += g^T @ hidden (in place, summed in fp32),
  grad_b += sum g; backward only rescales these by the incoming gradient. Non-finite inputs are detected per
  chunk into one device flag: raised at the end (one host sync), or handed back (`check_finite=False`).

EOPD's teacher enters through its per-token targets (`teacher_targets.py`), scored once (per rollout in the
trainer); the student-only chunk loop is then `fused_eopd_loss_from_targets`.

The loss is sum over all valid tokens / #valid tokens, so each chunk's contribution (and its gradient) is exact:
the same value and gradient as the plain versions, up to float summation order.

`compiled=True` compiles the per-chunk step with static shapes: every chunk is padded with masked rows to a
power-of-two bucket >= 64 capped at `chunk_size` (`chunk_bucket`), so a training run whose token count changes
every step reuses a handful of compiled graphs instead of recompiling with dynamic shape guards (the failure
mode measured in ../shared/specs/anchors.md).
"""

from __future__ import annotations

import torch

from ._common import (
    all_finite,
    check_eopd_options,
    check_hidden_pair,
    check_ids,
    check_token_inputs,
    check_topk_kl_options,
    gate_enabled,
    ids_in_range,
    lm_head_compute_dtype,
    loss_chunk_size_for_vocab,
    not_finite_message,
    raise_if_not_finite,
    take_rows,
    valid_row_index,
    zero_loss_like,
)
from .eopd import (
    EOPD_STAT_NAMES,
    check_eopd_targets,
    eopd_sums,
    eopd_token_terms,
    finish,
    full_teacher_needed,
    sums_finite,
)
from .teacher_targets import TeacherTargets, score_teacher_targets, teacher_row_targets
from .topk_kl import TOPK_KL_STAT_NAMES, scatter_rows, topk_kl_stats, topk_kl_sums, topk_kl_token_terms

_MIN_BUCKET = 64


def _eopd_chunk(student_logits, teacher_logits, targets, valid, ids, old, options):
    options = dict(options)
    top_k = options.pop("top_k")
    if teacher_logits is not None:  # the full-distribution variants score the teacher chunk by chunk
        teacher = teacher_row_targets(teacher_logits, ids, top_k=top_k if gate_enabled(options["tau"]) else None,
                                      temperature=options["temperature"], keep_full=True)
    else:
        teacher = targets._asdict()
    terms = eopd_token_terms(student_logits, teacher, ids, old, **options)
    loss_sum, stat_sums = eopd_sums(terms, valid)
    # EOPD needs no per-row output; its loss and entropy sums already tell whether all inputs are finite
    return loss_sum, stat_sums, loss_sum.new_zeros(0), sums_finite(loss_sum, stat_sums)


def _topk_kl_chunk(student_logits, teacher_logits, targets, valid, ids, old, options):
    terms = topk_kl_token_terms(student_logits, teacher_logits, **dict(options))
    loss_sum, per_row, stat_sums = topk_kl_sums(terms, valid)
    return loss_sum, stat_sums, per_row, all_finite(student_logits, teacher_logits)


def _linear(hidden, weight, bias):
    logits = hidden @ weight.t()
    return logits if bias is None else logits + bias


def _chunk_step(chunk_fn, options, student_hidden, student_weight, student_bias, teacher_head, targets, valid, scale,
                ids, old, functional=False):
    """One chunk: (scaled loss, stat sums, per-row loss, dloss/dstudent_logits, inputs-finite flag).

    `teacher_head` is (hidden, weight, bias) of the chunk when the teacher is scored here, else None and `targets`
    holds the chunk's `TeacherTargets`. `functional=True` (the compiled path) differentiates with
    `torch.func.grad_and_value`, which dynamo traces; eager uses `torch.autograd.grad`, whose gather/scatter
    backward runs in place (functorch's copies a [chunk, V] tensor per gather)."""
    with torch.no_grad():
        teacher_logits = None if teacher_head is None else _linear(*teacher_head)
        student_logits = _linear(student_hidden, student_weight, student_bias)

    def loss_of_logits(logits):
        loss_sum, stat_sums, per_row, finite = chunk_fn(logits, teacher_logits, targets, valid, ids, old, options)
        return loss_sum * scale, (stat_sums, per_row, finite)

    if functional:
        grad_logits, (loss, (stat_sums, per_row, finite)) = torch.func.grad_and_value(
            loss_of_logits, has_aux=True)(student_logits)
    else:
        with torch.enable_grad():
            student_logits.requires_grad_(True)
            loss, (stat_sums, per_row, finite) = loss_of_logits(student_logits)
            (grad_logits,) = torch.autograd.grad(loss, student_logits)
        loss = loss.detach()
    return loss, stat_sums, per_row, grad_logits, finite


def _compiled_chunk_step(*args):
    return _chunk_step(*args, functional=True)


_compiled_step = None


def _get_step(compiled: bool):
    global _compiled_step
    if not compiled:
        return _chunk_step
    if _compiled_step is None:
        # dynamic=False: shapes are fixed by padding (see module docstring), so no symbolic-shape guards.
        _compiled_step = torch.compile(_compiled_chunk_step, dynamic=False)
    return _compiled_step


def chunk_bucket(real_rows: int, chunk_size: int) -> int:
    """Rows a chunk of `real_rows` (<= chunk_size) is padded to on the compiled path: the smallest power of two
    >= real_rows and >= 64, capped at `chunk_size`. Every chunk but the last is full, so a run whose token count
    changes every step sees at most log2(chunk_size / 64) + 2 shapes (one graph each) and pads a partial chunk by
    less than 2x (or to at most 64 rows)."""
    bucket = _MIN_BUCKET
    while bucket < real_rows:
        bucket *= 2
    return min(bucket, chunk_size)


def _pad(x, rows: int):
    if x is None or x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


class ChunkedLinearLoss(torch.autograd.Function):
    """sum over rows of chunk_fn(hidden @ W^T + b, ...) * scale, with the lm_head gradients computed chunk by
    chunk in the forward. Returns (loss, stat sums, per-row loss, inputs-finite flag); only the loss is
    differentiable.

    Precision: the products run in `lm_head_compute_dtype(hidden)` (autocast's dtype, else the hidden states'); a
    weight of another dtype (fp32 master weights under bf16 autocast, an FSDP2 head gathered in fp32) is cast to
    it once, before the chunk loop, as TRL's `_chunked_divergence_loss` does. The loss math runs in fp32, and the
    weight and bias gradients are summed across chunks in fp32, handed out in the parameters' own dtypes."""

    @staticmethod
    def forward(ctx, student_rows, student_weight, student_bias, teacher, ids, old, chunk_fn, options, n_stats,
                chunk_size, compiled):
        n_rows = student_rows.shape[0]
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        device = student_rows.device
        compute = lm_head_compute_dtype(student_rows)
        dtype = torch.promote_types(compute, torch.float32)
        accumulate = torch.promote_types(student_weight.dtype, torch.float32)
        scale = torch.tensor(1.0 / n_rows, dtype=dtype, device=device)
        weight = student_weight.detach().to(compute)
        bias = None if student_bias is None else student_bias.detach().to(compute)
        if teacher[0] == "head":
            _, teacher_rows, teacher_weight, teacher_bias = teacher
            teacher_compute = lm_head_compute_dtype(teacher_rows)
            teacher_weight = teacher_weight.detach().to(teacher_compute)
            teacher_bias = None if teacher_bias is None else teacher_bias.detach().to(teacher_compute)
        targets = teacher[1] if teacher[0] == "targets" else None

        grad_rows = torch.empty_like(student_rows) if want_hidden else None
        grad_weight = torch.zeros(student_weight.shape, dtype=accumulate, device=device) if want_weight else None
        grad_bias = (torch.zeros(student_bias.shape, dtype=accumulate, device=device)
                     if (want_bias and student_bias is not None) else None)
        loss = torch.zeros((), dtype=dtype, device=device)
        stat_sums = torch.zeros(n_stats, dtype=dtype, device=device)
        per_row = torch.empty(n_rows, dtype=dtype, device=device)
        finite = torch.ones((), dtype=torch.bool, device=device)

        step = _get_step(compiled)
        with torch.autocast(device.type, enabled=False):  # dtypes are settled above, explicitly
            for start in range(0, n_rows, chunk_size):
                end = min(start + chunk_size, n_rows)
                real = end - start
                padded = chunk_bucket(real, chunk_size) if compiled else real
                hidden = student_rows[start:end].detach().to(compute)  # a plain input: one guard set
                head = None
                if teacher[0] == "head":
                    head = (_pad(teacher_rows[start:end].detach().to(teacher_compute), padded), teacher_weight,
                            teacher_bias)
                chunk_targets = None if targets is None else TeacherTargets(
                    *(None if t is None else _pad(t[start:end], padded) for t in targets))
                chunk_loss, chunk_stats, chunk_per_row, grad_logits, chunk_finite = step(
                    chunk_fn, options, _pad(hidden, padded), weight, bias, head, chunk_targets,
                    torch.arange(padded, device=device) < real, scale,
                    _pad(ids[start:end], padded) if ids is not None else None,
                    _pad(old[start:end], padded) if old is not None else None,
                )
                loss += chunk_loss
                stat_sums += chunk_stats
                finite &= chunk_finite
                if chunk_per_row.numel():
                    per_row[start:end] = chunk_per_row[:real]
                grad_logits = grad_logits[:real].to(compute)  # padding rows have exactly zero gradient
                if want_hidden:
                    grad_rows[start:end] = grad_logits @ weight
                if want_weight:
                    if compute == accumulate:
                        grad_weight.addmm_(grad_logits.t(), hidden)
                    else:  # a bf16 product (fp32-accumulated inside the matmul) added to the fp32 running sum
                        grad_weight += grad_logits.t() @ hidden
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0, dtype=accumulate)
                del grad_logits

        ctx.save_for_backward(grad_rows, grad_weight, grad_bias)
        ctx.grad_dtypes = (student_rows.dtype, student_weight.dtype,
                           None if student_bias is None else student_bias.dtype)
        ctx.backward_done = False
        ctx.mark_non_differentiable(stat_sums, per_row, finite)
        return loss, stat_sums, per_row, finite

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats, _grad_per_row, _grad_finite):
        if ctx.backward_done:
            raise RuntimeError("The fused loss hands out the gradients it computed in its forward once; a second "
                               "backward through the same loss (retain_graph=True) is not supported.")
        ctx.backward_done = True
        grads = []
        # Scaled in place (no second [V, H] buffer) and without a host sync on `grad_loss == 1`.
        for grad, dtype in zip(ctx.saved_tensors, ctx.grad_dtypes):
            grads.append(None if grad is None else grad.mul_(grad_loss.to(grad.dtype)).to(dtype))
        return tuple(grads) + (None,) * 8


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size <= 0):
        raise ValueError(f"`chunk_size` must be a positive integer (rows per chunk) or None (sized by the "
                         f"vocabulary), got {chunk_size}.")


def _run(chunk_fn, options, n_stats, student_hidden, student_weight, student_bias, teacher, mask, ids, old,
         chunk_size, compiled, check_finite=True):
    """Select the valid rows, run the chunked Function. `teacher` is ("head", hidden [B, T, H], weight, bias) or
    ("targets", TeacherTargets [B, T, ...]). Returns (loss, stat sums, per-row loss, rows, inputs-finite flag) or
    None when nothing is valid. `check_finite=False` checks ids and old log-probs without a host sync (flag)."""
    rows = valid_row_index(mask)
    if rows.numel() == 0:
        return None
    vocab_size = student_weight.shape[0]
    student_rows = take_rows(student_hidden, rows)
    if teacher[0] == "head":
        teacher = ("head", take_rows(teacher[1], rows), teacher[2], teacher[3])
    else:
        teacher = ("targets", teacher[1].take(rows))
    ids_rows = take_rows(ids, rows).long() if ids is not None else None
    old_rows = take_rows(old, rows) if old is not None else None
    ok = torch.ones((), dtype=torch.bool, device=student_rows.device)
    if check_finite:
        if ids_rows is not None:
            check_ids(ids_rows, vocab_size)
        if old_rows is not None:
            raise_if_not_finite(all_finite(old_rows), "`old_logprobs`")
    else:
        if ids_rows is not None:
            ids_rows, ok = ids_in_range(ids_rows, vocab_size)
        if old_rows is not None:
            ok = ok & all_finite(old_rows)
    chunk_size = int(chunk_size or loss_chunk_size_for_vocab(vocab_size))
    loss, stat_sums, per_row, finite = ChunkedLinearLoss.apply(
        student_rows, student_weight, student_bias, teacher, ids_rows, old_rows, chunk_fn, options, n_stats,
        chunk_size, bool(compiled),
    )
    return loss, stat_sums, per_row, rows, finite & ok


def _eopd_options(tau, alpha, top_k, clip_eps, temperature, rkl_estimator):
    return (("tau", float(tau)), ("alpha", float(alpha)), ("top_k", None if top_k is None else int(top_k)),
            ("clip_eps", float(clip_eps)), ("temperature", float(temperature)), ("rkl_estimator", rkl_estimator))


def _fused_eopd(student_hidden, student_weight, student_bias, teacher, mask, ids, old, options, chunk_size,
                compiled, check_finite, return_stats, what):
    out = _run(_eopd_chunk, options, len(EOPD_STAT_NAMES), student_hidden, student_weight, student_bias, teacher,
               mask, ids, old, chunk_size, compiled, check_finite)
    if out is None:
        loss = zero_loss_like(student_hidden, student_weight, student_bias)
        stat_sums, n_valid = loss.new_zeros(len(EOPD_STAT_NAMES)), 0
        finite = torch.ones((), dtype=torch.bool, device=loss.device)
    else:
        loss, stat_sums, _, rows, finite = out
        n_valid = rows.numel()
    return finish(loss, stat_sums, n_valid, finite, what, check_finite=check_finite, return_stats=return_stats)


_FUSED_DOC = """
    Precision: bf16 (or fp16) hidden states and weights, fp32 master weights under autocast, and FSDP2 heads
    gathered to one tensor are all accepted (see `ChunkedLinearLoss`); the loss is fp32 and the weight gradient is
    summed across chunks in fp32. `chunk_size=None` sizes the chunks by the vocabulary (`loss_chunk_size_for_vocab`:
    about 1 GiB of temporaries). `compiled=True` torch.compiles the per-chunk step (fixed padded shapes, see
    `chunk_bucket`). `check_finite` as in `entropy_aware_opd_loss`.
"""


def fused_eopd_loss_from_targets(student_hidden, student_weight, teacher_targets, completion_ids, completion_mask,
                                 old_logprobs=None, *, student_bias=None, tau=0.8, alpha=1.0, top_k=16, clip_eps=0.2,
                                 temperature=1.0, chunk_size=None, compiled=False, return_stats=False,
                                 check_finite=True):
    r"""`eopd_loss_from_targets` from the student's hidden states and lm_head, chunk by chunk: the student alone.

    logits = hidden @ weight^T (+ bias) for the student [B, T, H]; the teacher enters only through
    `teacher_targets` (`TeacherTargets` [B, T(, k)], scored once per rollout by `score_teacher_targets`). Value,
    gradients (w.r.t. `student_hidden`, `student_weight`, `student_bias`) and stats equal
    `entropy_aware_opd_loss` on logits; peak memory is O(chunk_size * V).
    """ + _FUSED_DOC
    leading = tuple(completion_mask.shape)
    if student_hidden.dim() != 3 or tuple(student_hidden.shape[:2]) != leading:
        raise ValueError(f"`student_hidden` must be [batch, length, hidden] matching the mask {list(leading)}, got "
                         f"{list(student_hidden.shape)}.")
    if student_weight.dim() != 2 or student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"`student_weight` must be the lm_head weight [vocab, {student_hidden.shape[-1]}], got "
                         f"{list(student_weight.shape)}.")
    check_token_inputs("completion_ids", completion_ids, leading, integer=True)
    check_token_inputs("old_logprobs", old_logprobs, leading)
    check_eopd_options(tau=tau, alpha=alpha, top_k=top_k, clip_eps=clip_eps, temperature=temperature,
                       rkl_estimator="sampled", vocab_size=student_weight.shape[0])
    check_eopd_targets(teacher_targets, leading, tau=tau, top_k=top_k, rkl_estimator="sampled")
    _check_chunk_size(chunk_size)
    options = _eopd_options(tau, alpha, top_k, clip_eps, temperature, "sampled")
    return _fused_eopd(student_hidden, student_weight, student_bias, ("targets", teacher_targets), completion_mask,
                       completion_ids, old_logprobs, options, chunk_size, compiled, check_finite, return_stats,
                       "The student logits (`student_hidden` @ lm_head) or `teacher_targets`")


def fused_entropy_aware_opd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, completion_ids,
                                 completion_mask, old_logprobs=None, *, student_bias=None, teacher_bias=None, tau=0.8,
                                 alpha=1.0, top_k=16, clip_eps=0.2, temperature=1.0, rkl_estimator="sampled",
                                 chunk_size=None, compiled=False, return_stats=False, check_finite=True):
    r"""`entropy_aware_opd_loss` computed from hidden states and lm_head weights, chunk by chunk.

    logits = hidden @ weight^T (+ bias) for student [B, T, Hs] and teacher [B, T, Ht] (the final-norm hidden
    states at the positions that predict `completion_ids`); the per-token equation is `eopd_token_terms`:

        loss = ( sum_{t valid} max(-r_t A_t, -clip(r_t, 1-eps, 1+eps) A_t) + alpha 1[H_t >= tau] FKL_topk,t )
               / #(valid tokens)

    The default (sampled estimator, top-k forward KL) is one path: `score_teacher_targets` (teacher, chunked) then
    `fused_eopd_loss_from_targets` (student, chunked). The full-distribution variants (`top_k=None` with the gate
    on, `rkl_estimator="full"`) score the teacher inside each chunk instead. Same options, value, gradients
    (w.r.t. `student_hidden`, `student_weight`, `student_bias`) and stats as the plain version; peak memory is
    O(chunk_size * V) instead of O(B * T * V). The teacher tensors get no gradient.
    """ + _FUSED_DOC
    check_hidden_pair(student_hidden, student_weight, teacher_hidden, teacher_weight, completion_mask,
                      student_bias, teacher_bias)
    leading = tuple(completion_mask.shape)
    check_token_inputs("completion_ids", completion_ids, leading, integer=True)
    check_token_inputs("old_logprobs", old_logprobs, leading)
    check_eopd_options(tau=tau, alpha=alpha, top_k=top_k, clip_eps=clip_eps, temperature=temperature,
                       rkl_estimator=rkl_estimator, vocab_size=student_weight.shape[0])
    _check_chunk_size(chunk_size)
    vocab_size = student_weight.shape[0]
    if not full_teacher_needed(tau, top_k, rkl_estimator):
        if check_finite:
            check_ids(completion_ids[completion_mask.bool()], vocab_size)
        scored_ids = completion_ids if check_finite else completion_ids.clamp(0, vocab_size - 1)
        targets = score_teacher_targets(teacher_hidden, teacher_weight, scored_ids, completion_mask,
                                        teacher_bias=teacher_bias, top_k=top_k if gate_enabled(tau) else None,
                                        temperature=temperature, chunk_size=chunk_size)
        return fused_eopd_loss_from_targets(
            student_hidden, student_weight, targets, completion_ids, completion_mask, old_logprobs,
            student_bias=student_bias, tau=tau, alpha=alpha, top_k=top_k if gate_enabled(tau) else None,
            clip_eps=clip_eps, temperature=temperature, chunk_size=chunk_size, compiled=compiled,
            return_stats=return_stats, check_finite=check_finite)
    options = _eopd_options(tau, alpha, top_k, clip_eps, temperature, rkl_estimator)
    return _fused_eopd(student_hidden, student_weight, student_bias,
                       ("head", teacher_hidden, teacher_weight, teacher_bias), completion_mask, completion_ids,
                       old_logprobs, options, chunk_size, compiled, check_finite, return_stats,
                       "The logits from `student_hidden`/`teacher_hidden` and the lm_head weights")


def fused_topk_distillation_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, *,
                                 student_bias=None, teacher_bias=None, kl_type="mixed", mixed_kl_weight=0.5, top_k=64,
                                 temperature=1.0, chunk_size=None, compiled=False, return_stats=False):
    r"""`topk_distillation_loss` computed from hidden states and lm_head weights, chunk by chunk.

        loss = sum_{t valid} [ w FKL_t + (1 - w) RKL_t ] / #(valid tokens)

    (both distributions renormalised on the teacher's top-k; see `topk_kl_token_terms`).

    Same value, gradients and stats (incl. `per_token_loss` [B, T]) as the plain version, without [B*T, V]
    logits. The teacher tensors get no gradient. Precision and `chunk_size=None` as in
    `fused_entropy_aware_opd_loss`.
    """
    check_hidden_pair(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, student_bias, teacher_bias)
    check_topk_kl_options(kl_type=kl_type, mixed_kl_weight=mixed_kl_weight, top_k=top_k, temperature=temperature,
                          vocab_size=student_weight.shape[0])
    _check_chunk_size(chunk_size)
    options = (("kl_type", kl_type), ("mixed_kl_weight", float(mixed_kl_weight)),
               ("top_k", None if top_k is None else int(top_k)), ("temperature", float(temperature)))
    out = _run(_topk_kl_chunk, options, len(TOPK_KL_STAT_NAMES), student_hidden, student_weight, student_bias,
               ("head", teacher_hidden, teacher_weight, teacher_bias), mask, None, None, chunk_size, compiled)
    if out is None:
        loss = zero_loss_like(student_hidden, student_weight, student_bias)
        if not return_stats:
            return loss
        per_token = torch.zeros(mask.shape, dtype=loss.dtype, device=loss.device)
        return loss, topk_kl_stats(loss.new_zeros(len(TOPK_KL_STAT_NAMES)), per_token, 0)
    loss, stat_sums, per_row, rows, finite = out
    if not bool(finite):
        raise ValueError(not_finite_message("The logits from `student_hidden`/`teacher_hidden` and the lm_head "
                                            "weights"))
    if not return_stats:
        return loss
    return loss, topk_kl_stats(stat_sums, scatter_rows(per_row, rows, mask), rows.numel())
