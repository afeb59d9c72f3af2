"""Chunked ("fused linear") versions of the losses: never build [N, V] logits for the whole batch.

Why not `LigerFusedLinearDistillationBase` directly: its loss hook sees only (student_logits, teacher_logits,
target) per chunk and divides by the count of non-ignored targets, whereas EOPD needs per-token extra inputs
(sampled ids, old log-probs), statistics out of every chunk, and SD-Zero needs per-token losses back. So this
module follows the same recipe in one shared `torch.autograd.Function`:

* rows = valid tokens only (padding never enters any computation);
* per chunk of `chunk_size` rows: logits = hidden @ W^T (+ b) for student and teacher (teacher under no_grad),
  the per-token equation from `eopd.py` / `topk_kl.py`, and dloss/dlogits (`torch.autograd.grad` in eager,
  `torch.func.grad_and_value` when compiled);
* still inside the forward: grad_hidden = g @ W and grad_W += g^T @ hidden (in place), grad_b += sum g;
  backward only rescales these by the incoming gradient. Non-finite logits are detected per chunk and
  raise one ValueError at the end (one host sync).

The loss is sum over all valid tokens / #valid tokens, so each chunk's contribution (and its gradient) is exact:
the same value and gradient as the plain versions, up to float summation order.

`compiled=True` compiles the per-chunk step with static shapes: every chunk is padded to a fixed row count
(`chunk_size`, or a power-of-two bucket >= 64 when the batch is smaller) with masked rows, so a training
run whose token count changes every step reuses a handful of compiled graphs instead of recompiling with
dynamic shape guards (the failure mode measured in /work/shared/specs/anchors.md).
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
    raise_if_not_finite,
    take_rows,
    valid_row_index,
    zero_loss_like,
)
from .eopd import EOPD_STAT_NAMES, entropies_finite, eopd_stats_from_sums, eopd_sums, eopd_token_terms
from .topk_kl import TOPK_KL_STAT_NAMES, scatter_rows, topk_kl_stats, topk_kl_sums, topk_kl_token_terms

_MIN_BUCKET = 64


def _eopd_chunk(student_logits, teacher_logits, valid, ids, old, options):
    terms = eopd_token_terms(student_logits, teacher_logits, ids, old, **dict(options))
    loss_sum, stat_sums = eopd_sums(terms, valid)
    # EOPD needs no per-row output; its entropies already tell whether all logits are finite
    return loss_sum, stat_sums, loss_sum.new_zeros(0), entropies_finite(stat_sums)


def _topk_kl_chunk(student_logits, teacher_logits, valid, ids, old, options):
    terms = topk_kl_token_terms(student_logits, teacher_logits, **dict(options))
    loss_sum, per_row, stat_sums = topk_kl_sums(terms, valid)
    return loss_sum, stat_sums, per_row, all_finite(student_logits, teacher_logits)


def _linear(hidden, weight, bias):
    logits = hidden @ weight.t()
    return logits if bias is None else logits + bias


def _chunk_step(chunk_fn, options, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                teacher_bias, valid, scale, ids, old, functional=False):
    """One chunk: (scaled loss, stat sums, per-row loss, dloss/dstudent_logits, logits-finite flag).

    `functional=True` (the compiled path) differentiates with `torch.func.grad_and_value`, which dynamo traces;
    eager uses `torch.autograd.grad`, whose gather/scatter backward runs in place (functorch's copies a
    [chunk, V] tensor per gather)."""
    with torch.no_grad():
        teacher_logits = _linear(teacher_hidden, teacher_weight, teacher_bias)
        student_logits = _linear(student_hidden, student_weight, student_bias)

    def loss_of_logits(logits):
        loss_sum, stat_sums, per_row, finite = chunk_fn(logits, teacher_logits, valid, ids, old, options)
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


def _padded_rows(n_rows: int, chunk_size: int, compiled: bool) -> int:
    """Row count of every chunk: eager uses `chunk_size` (the last chunk shorter); compiled pads to a fixed
    shape, a power-of-two bucket when the whole batch is smaller than one chunk."""
    if not compiled or n_rows >= chunk_size:
        return chunk_size
    bucket = _MIN_BUCKET
    while bucket < n_rows:
        bucket *= 2
    return min(bucket, chunk_size)


def _pad(x, rows: int):
    if x is None or x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


class ChunkedLinearLoss(torch.autograd.Function):
    """sum over rows of chunk_fn(hidden @ W^T + b, ...) * scale, with the lm_head gradients computed chunk by
    chunk in the forward. Returns (loss, stat sums, per-row loss); only the loss is differentiable."""

    @staticmethod
    def forward(ctx, student_rows, student_weight, student_bias, teacher_rows, teacher_weight, teacher_bias, ids,
                old, chunk_fn, options, n_stats, chunk_size, compiled):
        n_rows = student_rows.shape[0]
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dtype = torch.promote_types(student_rows.dtype, torch.float32)
        device = student_rows.device
        scale = torch.tensor(1.0 / n_rows, dtype=dtype, device=device)

        grad_rows = torch.empty_like(student_rows) if want_hidden else None
        grad_weight = torch.zeros_like(student_weight) if want_weight else None
        grad_bias = torch.zeros_like(student_bias) if (want_bias and student_bias is not None) else None
        loss = torch.zeros((), dtype=dtype, device=device)
        stat_sums = torch.zeros(n_stats, dtype=dtype, device=device)
        per_row = torch.empty(n_rows, dtype=dtype, device=device)
        finite_so_far = torch.ones((), dtype=torch.bool, device=device)

        step = _get_step(compiled)
        rows_per_chunk = _padded_rows(n_rows, chunk_size, compiled)
        teacher_rows = teacher_rows.detach()
        for start in range(0, n_rows, chunk_size):
            end = min(start + chunk_size, n_rows)
            real = end - start
            hidden = student_rows[start:end]
            padded = rows_per_chunk if compiled else real
            valid = torch.arange(padded, device=device) < real
            chunk_loss, chunk_stats, chunk_per_row, grad_logits, finite = step(
                chunk_fn, options,
                _pad(hidden, padded), student_weight, student_bias,
                _pad(teacher_rows[start:end], padded), teacher_weight, teacher_bias,
                valid, scale,
                _pad(ids[start:end], padded) if ids is not None else None,
                _pad(old[start:end], padded) if old is not None else None,
            )
            loss += chunk_loss
            stat_sums += chunk_stats
            finite_so_far &= finite
            if chunk_per_row.numel():
                per_row[start:end] = chunk_per_row[:real]
            grad_logits = grad_logits[:real]  # padding rows have exactly zero gradient
            if want_hidden:
                torch.mm(grad_logits.to(student_weight.dtype), student_weight, out=grad_rows[start:end])
            if want_weight:
                grad_weight.addmm_(grad_logits.t().to(hidden.dtype), hidden)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0).to(grad_bias.dtype)
            del grad_logits

        raise_if_not_finite(finite_so_far, "The logits from `student_hidden`/`teacher_hidden` and the lm_head weights")
        ctx.save_for_backward(grad_rows, grad_weight, grad_bias)
        ctx.mark_non_differentiable(stat_sums, per_row)
        return loss, stat_sums, per_row

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats, _grad_per_row):
        grads = ctx.saved_tensors
        # loss.backward() sends exactly 1: skip a pass over the [V, H] weight gradient (as Liger does)
        if not bool(grad_loss == 1):
            grads = [None if g is None else g * grad_loss.to(g.dtype) for g in grads]
        return tuple(grads) + (None,) * 10


def _check_chunk_size(chunk_size) -> None:
    if int(chunk_size) != chunk_size or chunk_size <= 0:
        raise ValueError(f"`chunk_size` must be a positive integer (rows per chunk), got {chunk_size}.")


def _run(chunk_fn, options, n_stats, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
         teacher_bias, mask, ids, old, chunk_size, compiled):
    """Select the valid rows, run the chunked Function. Returns (loss, stat sums, per-row loss, rows) or None
    when nothing is valid."""
    rows = valid_row_index(mask)
    if rows.numel() == 0:
        return None
    student_rows = take_rows(student_hidden, rows)
    teacher_rows = take_rows(teacher_hidden, rows)
    ids_rows = take_rows(ids, rows).long() if ids is not None else None
    old_rows = take_rows(old, rows) if old is not None else None
    if ids_rows is not None:
        check_ids(ids_rows, student_weight.shape[0])
    if old_rows is not None:
        raise_if_not_finite(all_finite(old_rows), "`old_logprobs`")
    loss, stat_sums, per_row = ChunkedLinearLoss.apply(
        student_rows, student_weight, student_bias, teacher_rows, teacher_weight, teacher_bias, ids_rows, old_rows,
        chunk_fn, options, n_stats, int(chunk_size), bool(compiled),
    )
    return loss, stat_sums, per_row, rows


def fused_entropy_aware_opd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, completion_ids,
                                 completion_mask, old_logprobs=None, *, student_bias=None, teacher_bias=None, tau=0.8,
                                 alpha=1.0, top_k=16, clip_eps=0.2, temperature=1.0, rkl_estimator="sampled",
                                 chunk_size=1024, compiled=False, return_stats=False):
    r"""`entropy_aware_opd_loss` computed from hidden states and lm_head weights, chunk by chunk.

    logits = hidden @ weight^T (+ bias) for student [B, T, Hs] and teacher [B, T, Ht] (the final-norm hidden
    states at the positions that predict `completion_ids`); the per-token equation is `eopd_token_terms`:

        loss = ( sum_{t valid} max(-r_t A_t, -clip(r_t, 1-eps, 1+eps) A_t) + alpha 1[H_t >= tau] FKL_topk,t )
               / #(valid tokens)

    Same options, value, gradients (w.r.t. `student_hidden`, `student_weight`, `student_bias`) and stats as
    the plain version; peak memory is O(chunk_size * V) instead of O(B * T * V). The teacher tensors get no
    gradient. `compiled=True` torch.compiles the per-chunk step (fixed padded shapes; see module docstring).
    """
    check_hidden_pair(student_hidden, student_weight, teacher_hidden, teacher_weight, completion_mask,
                      student_bias, teacher_bias)
    leading = tuple(completion_mask.shape)
    check_token_inputs("completion_ids", completion_ids, leading, integer=True)
    check_token_inputs("old_logprobs", old_logprobs, leading)
    check_eopd_options(tau=tau, alpha=alpha, top_k=top_k, clip_eps=clip_eps, temperature=temperature,
                       rkl_estimator=rkl_estimator, vocab_size=student_weight.shape[0])
    _check_chunk_size(chunk_size)
    options = (("tau", float(tau)), ("alpha", float(alpha)), ("top_k", None if top_k is None else int(top_k)),
               ("clip_eps", float(clip_eps)), ("temperature", float(temperature)), ("rkl_estimator", rkl_estimator))
    out = _run(_eopd_chunk, options, len(EOPD_STAT_NAMES), student_hidden, student_weight, student_bias,
               teacher_hidden, teacher_weight, teacher_bias, completion_mask, completion_ids, old_logprobs,
               chunk_size, compiled)
    if out is None:
        loss = zero_loss_like(student_hidden, student_weight, student_bias)
        stat_sums, n_valid = loss.new_zeros(len(EOPD_STAT_NAMES)), 0
    else:
        loss, stat_sums, _, rows = out
        n_valid = rows.numel()
    if not return_stats:
        return loss
    return loss, eopd_stats_from_sums(stat_sums, n_valid)


def fused_topk_distillation_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, *,
                                 student_bias=None, teacher_bias=None, kl_type="mixed", mixed_kl_weight=0.5, top_k=64,
                                 temperature=1.0, chunk_size=1024, compiled=False, return_stats=False):
    r"""`topk_distillation_loss` computed from hidden states and lm_head weights, chunk by chunk.

        loss = sum_{t valid} [ w FKL_t + (1 - w) RKL_t ] / #(valid tokens)

    (both distributions renormalised on the teacher's top-k; see `topk_kl_token_terms`).

    Same value, gradients and stats (incl. `per_token_loss` [B, T]) as the plain version, without [B*T, V]
    logits. The teacher tensors get no gradient.
    """
    check_hidden_pair(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, student_bias, teacher_bias)
    check_topk_kl_options(kl_type=kl_type, mixed_kl_weight=mixed_kl_weight, top_k=top_k, temperature=temperature,
                          vocab_size=student_weight.shape[0])
    _check_chunk_size(chunk_size)
    options = (("kl_type", kl_type), ("mixed_kl_weight", float(mixed_kl_weight)),
               ("top_k", None if top_k is None else int(top_k)), ("temperature", float(temperature)))
    out = _run(_topk_kl_chunk, options, len(TOPK_KL_STAT_NAMES), student_hidden, student_weight, student_bias,
               teacher_hidden, teacher_weight, teacher_bias, mask, None, None, chunk_size, compiled)
    if out is None:
        loss = zero_loss_like(student_hidden, student_weight, student_bias)
        if not return_stats:
            return loss
        per_token = torch.zeros(mask.shape, dtype=loss.dtype, device=loss.device)
        return loss, topk_kl_stats(loss.new_zeros(len(TOPK_KL_STAT_NAMES)), per_token, 0)
    loss, stat_sums, per_row, rows = out
    if not return_stats:
        return loss
    return loss, topk_kl_stats(stat_sums, scatter_rows(per_row, rows, mask), rows.numel())
