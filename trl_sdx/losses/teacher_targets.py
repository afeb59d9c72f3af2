"""Teacher scoring: the compact per-token targets a distillation loss needs from the teacher, computed once.

The teacher is frozen, so everything the loss needs from it can be computed once per rollout (the official EOPD
code does this in its teacher worker, before the actor's mini-batch updates) and stored with the rollout; the
loss steps then run the student alone. For every completion token y_t, from the teacher's logits z_t at the
loss temperature T:

    H_t               = -sum_v pi_T(v) log pi_T(v),  pi_T = softmax(z_t / T)      (entropy, FULL vocabulary)
    log pi_T(y_t)                                                                  (log-prob of the sampled token)
    S_t               = ids of the k largest z_t                                   (top-k support)
    log ~pi_T(v)      = log_softmax over the k logits z_t[S_t] / T                (renormalised on S_t)

At k = 16 that is 4 + 4 + 16 * (8 + 4) = 200 bytes per token instead of 4 V bytes of logits.

`teacher_row_targets` is the equation (one place); `score_teacher_targets` runs it from hidden states and the
lm_head in chunks of valid rows (never an [N, V] tensor), `teacher_targets_from_logits` from full logits.
`token_logprobs` is the same chunked pass reduced to log pi(y_t), used for the student's pi_old at rollout time.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._common import (
    check_token_inputs,
    entropy_of_logp,
    lm_head_compute_dtype,
    loss_chunk_size_for_vocab,
    scaled_logits,
    take_rows,
    valid_row_index,
)
from ..validation import check_range, check_top_k


class TeacherTargets(NamedTuple):
    """Per-token teacher targets. Layout [B, T] / [B, T, k] (zeros on padding) or rows [N] / [N, k]."""

    entropy: torch.Tensor  # H_t, full vocabulary, at the loss temperature
    logprob: torch.Tensor  # log pi_T(y_t)
    topk_ids: torch.Tensor | None  # S_t (int64); None when scored without a top-k support
    topk_logprobs: torch.Tensor | None  # log ~pi_T on S_t, renormalised

    # Names under which the targets travel in a rollout dict (split and shuffled with it along dim 0).
    KEYS = ("teacher_entropy", "teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs")

    @property
    def top_k(self) -> int | None:
        return None if self.topk_ids is None else self.topk_ids.shape[-1]

    def as_inputs(self) -> dict:
        return {key: value for key, value in zip(self.KEYS, self) if value is not None}

    @classmethod
    def from_inputs(cls, inputs: dict) -> TeacherTargets | None:
        """The targets stored in a rollout dict by `as_inputs`, or None when it holds none."""
        if cls.KEYS[0] not in inputs:
            return None
        return cls(*(inputs.get(key) for key in cls.KEYS))

    def take(self, rows: torch.Tensor) -> TeacherTargets:
        """[B, T, ...] -> the valid rows [N, ...] (flat indices from `valid_row_index`)."""
        return TeacherTargets(*(None if t is None else take_rows(t, rows) for t in self))

    def slice(self, start: int, end: int) -> TeacherTargets:
        return TeacherTargets(*(None if t is None else t[start:end] for t in self))


@torch.no_grad()
def teacher_row_targets(teacher_logits, completion_ids, *, top_k=16, temperature=1.0, keep_full=False) -> dict:
    """The targets of rows of teacher logits [N, V] predicting `completion_ids` [N] (equations in the module
    docstring). Returns a dict with `entropy`, `logprob`, `topk_ids`, `topk_logprobs` (None when `top_k` is None)
    and, with `keep_full=True`, `logp`: the full [N, V] log-distribution (the full-vocabulary loss variants)."""
    teacher = scaled_logits(teacher_logits.detach(), temperature)
    logp = teacher.log_softmax(-1)
    out = {
        "entropy": entropy_of_logp(logp),
        "logprob": logp.gather(-1, completion_ids[:, None]).squeeze(-1),
        "topk_ids": None,
        "topk_logprobs": None,
    }
    if top_k is not None:
        top_logits, top_ids = teacher.topk(int(top_k), dim=-1)
        out["topk_ids"], out["topk_logprobs"] = top_ids, top_logits.log_softmax(-1)
    if keep_full:
        out["logp"] = logp
    return out


def _check_scoring_inputs(completion_ids, completion_mask, top_k, temperature, vocab_size) -> None:
    leading = tuple(completion_mask.shape)
    if completion_mask.dim() != 2:
        raise ValueError(f"`completion_mask` must be [batch, length], got shape {list(completion_mask.shape)}.")
    check_token_inputs("completion_ids", completion_ids, leading, integer=True)
    check_top_k("top_k", top_k, vocab_size)
    check_range("temperature", temperature, low=0.0, low_open=True)


def _layout(rows_values: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row values [N, ...] back to the [B, T, ...] layout of the mask, zeros on padding."""
    out = rows_values.new_zeros((mask.numel(), *rows_values.shape[1:]))
    out[rows] = rows_values
    return out.view(*mask.shape, *rows_values.shape[1:])


def _targets_layout(row_targets: dict, rows, mask) -> TeacherTargets:
    return TeacherTargets(*(None if row_targets[name] is None else _layout(row_targets[name], rows, mask)
                            for name in TeacherTargets._fields))


def _lm_head_chunks(hidden_rows, weight, bias, chunk_size):
    """Yield (start, end, logits [chunk, V]) over the rows; the weight is cast to the compute dtype once."""
    dtype = lm_head_compute_dtype(hidden_rows)
    weight = weight.detach().to(dtype)
    bias = None if bias is None else bias.detach().to(dtype)
    with torch.autocast(hidden_rows.device.type, enabled=False):
        for start in range(0, hidden_rows.shape[0], chunk_size):
            end = min(start + chunk_size, hidden_rows.shape[0])
            logits = hidden_rows[start:end].to(dtype) @ weight.t()
            yield start, end, logits if bias is None else logits + bias


@torch.no_grad()
def score_teacher_targets(teacher_hidden, teacher_weight, completion_ids, completion_mask, *, teacher_bias=None,
                          top_k=16, temperature=1.0, chunk_size=None) -> TeacherTargets:
    r"""`TeacherTargets` [B, T(, k)] from the teacher's final hidden states [B, T, H] and lm_head weight [V, H]
    (bias [V]), in chunks of `chunk_size` valid rows (default: sized by the vocabulary,
    `loss_chunk_size_for_vocab`); logits = hidden @ W^T (+ b), never more than one chunk of them at a time.
    Padding positions (mask 0) are never computed on and hold zeros. Targets are fp32 (fp64 stays fp64)."""
    _check_scoring_inputs(completion_ids, completion_mask, top_k, temperature, teacher_weight.shape[0])
    if teacher_hidden.dim() != 3 or tuple(teacher_hidden.shape[:2]) != tuple(completion_mask.shape):
        raise ValueError(f"`teacher_hidden` must be [batch, length, hidden] matching the mask "
                         f"{list(completion_mask.shape)}, got {list(teacher_hidden.shape)}.")
    chunk_size = chunk_size or loss_chunk_size_for_vocab(teacher_weight.shape[0])
    rows = valid_row_index(completion_mask)
    hidden_rows, ids = take_rows(teacher_hidden, rows), take_rows(completion_ids, rows).long()
    pieces = []
    for start, end, logits in _lm_head_chunks(hidden_rows, teacher_weight, teacher_bias, chunk_size):
        pieces.append(teacher_row_targets(logits, ids[start:end], top_k=top_k, temperature=temperature))
    if not pieces:  # nothing valid: an empty batch of targets with the right shapes
        empty = torch.zeros(0, teacher_weight.shape[0], dtype=torch.promote_types(teacher_hidden.dtype, torch.float32),
                            device=teacher_hidden.device)
        pieces.append(teacher_row_targets(empty, ids, top_k=top_k, temperature=temperature))
    joined = {name: None if pieces[0][name] is None else torch.cat([p[name] for p in pieces])
              for name in TeacherTargets._fields}
    return _targets_layout(joined, rows, completion_mask)


@torch.no_grad()
def teacher_targets_from_logits(teacher_logits, completion_ids, completion_mask, *, top_k=16,
                                temperature=1.0) -> TeacherTargets:
    """`TeacherTargets` [B, T(, k)] from full teacher logits [B, T, V] (models whose logits must come from their
    own forward); only the valid rows are computed on."""
    _check_scoring_inputs(completion_ids, completion_mask, top_k, temperature, teacher_logits.shape[-1])
    rows = valid_row_index(completion_mask)
    row_targets = teacher_row_targets(take_rows(teacher_logits, rows), take_rows(completion_ids, rows).long(),
                                      top_k=top_k, temperature=temperature)
    return _targets_layout(row_targets, rows, completion_mask)


@torch.no_grad()
def token_logprobs(hidden, weight, completion_ids, completion_mask, *, bias=None, temperature=1.0,
                   chunk_size=None) -> torch.Tensor:
    """log pi(y_t) [B, T] (fp32, 0 on padding) from final hidden states and an lm_head, chunked over the valid
    rows only: what a trainer records as pi_old at rollout time."""
    _check_scoring_inputs(completion_ids, completion_mask, None, temperature, weight.shape[0])
    chunk_size = chunk_size or loss_chunk_size_for_vocab(weight.shape[0])
    rows = valid_row_index(completion_mask)
    hidden_rows, ids = take_rows(hidden, rows), take_rows(completion_ids, rows).long()
    out = torch.zeros(rows.numel(), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    for start, end, logits in _lm_head_chunks(hidden_rows, weight, bias, chunk_size):
        logp = scaled_logits(logits, temperature).log_softmax(-1)
        out[start:end] = logp.gather(-1, ids[start:end, None]).squeeze(-1)
    return _layout(out, rows, completion_mask)


@torch.no_grad()
def token_logprobs_from_logits(logits, completion_ids, completion_mask, *, temperature=1.0) -> torch.Tensor:
    """log pi(y_t) [B, T] (fp32, 0 on padding) from full logits [B, T, V], computed on the valid rows only."""
    rows = valid_row_index(completion_mask)
    logp = scaled_logits(take_rows(logits, rows), temperature).log_softmax(-1)
    values = logp.gather(-1, take_rows(completion_ids, rows).long()[:, None]).squeeze(-1)
    return _layout(values, rows, completion_mask)
