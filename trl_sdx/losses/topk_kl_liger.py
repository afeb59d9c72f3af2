"""SD-Zero's top-k KL on Liger's chunked distillation base (`LigerFusedLinearDistillationBase`).

The loss needs only the student's and teacher's logits of a chunk, which is what Liger's base hands a subclass's
`distillation_loss_fn`; the per-token equation is still `topk_kl_token_terms` (the one place it is written).
Liger's recipe: per chunk of rows, logits = hidden @ W^T (+ b), `torch.func.grad_and_value` of the chunk loss,
hidden/weight/bias gradients accumulated in the forward; the loss is divided by the number of targets that are not
`ignore_index`. Here:

* the mask goes into the target: a row counts iff its target is not `IGNORE_INDEX`; the hard (CE) loss has weight 0
  and is never computed, so the target carries nothing else;
* only valid rows are handed to Liger (padding, which may hold anything, never enters a matmul), so the target of
  every row passed is 0 and Liger's divisor is the number of valid tokens;
* `groups` (e.g. each sample's reward) splits the rows: one Liger call per group, each scaled by its share of the
  tokens, so the group losses add up to the token-mean over the batch and their sums are the per-group KL.

Always eager (`compiled=False`): Liger's compiled step sees the whole target (its divisor) and chunks of
N // chunk_size rows, so every new token count N is a new shape; on torch 2.11 the third distinct N crashed dynamo's
shape guards (../shared/specs/anchors.md). Training changes N every step, so compiling is not offered here; our
native kernel (`fused.py`, `compiled=True`) pads to fixed shapes instead.
"""

from __future__ import annotations

import torch
from liger_kernel.chunked_loss.fused_linear_distillation import LigerFusedLinearDistillationBase

from ._common import (
    all_finite,
    check_hidden_pair,
    check_topk_kl_options,
    raise_if_not_finite,
    take_rows,
    valid_row_index,
    zero_loss_like,
)
from .topk_kl import topk_kl_token_terms

IGNORE_INDEX = -100


class LigerFusedLinearTopKKLFunction(LigerFusedLinearDistillationBase):
    """`topk_kl_token_terms` summed over the non-ignored rows of each chunk, on Liger's distillation base.

    apply(student_input [N, Hs], student_weight [V, Hs], teacher_input [N, Ht], teacher_weight [V, Ht],
          target [N] (IGNORE_INDEX = row does not count), student_bias, teacher_bias,
          kl_type, mixed_kl_weight, top_k, temperature, chunk_size)
    -> sum over counted rows of L_t / #(counted rows).
    """

    @staticmethod
    def distillation_loss_fn(student_logits, teacher_logits, target=None, ignore_index=IGNORE_INDEX, beta=None,
                             kl_type="mixed", mixed_kl_weight=0.5, top_k=64):
        # Liger has already divided both logits by the temperature; `beta` is Liger's JSD knob, unused here.
        terms = topk_kl_token_terms(student_logits, teacher_logits, kl_type=kl_type,
                                    mixed_kl_weight=mixed_kl_weight, top_k=top_k)
        loss = terms["loss"]
        if target is not None:
            loss = loss.masked_fill(target == ignore_index, 0.0)
        return loss.sum()

    @classmethod
    def forward(cls, ctx, student_input, student_weight, teacher_input, teacher_weight, target, student_bias,
                teacher_bias, kl_type, mixed_kl_weight, top_k, temperature, chunk_size):
        return super().forward(
            cls=cls, ctx=ctx, student_input=student_input, student_weight=student_weight,
            teacher_input=teacher_input, teacher_weight=teacher_weight, target=target, student_bias=student_bias,
            teacher_bias=teacher_bias, chunk_size=chunk_size, ignore_index=IGNORE_INDEX,
            weight_hard_loss=0.0, weight_soft_loss=1.0, compute_ce_loss=False, temperature=temperature,
            compiled=False,  # see the module docstring
            kl_type=kl_type, mixed_kl_weight=mixed_kl_weight, top_k=top_k,
        )

    @staticmethod
    def backward(ctx, grad_output, *args):
        grads = LigerFusedLinearDistillationBase.backward(ctx, grad_output, *args)[:6]
        return (*grads, None, None, None, None, None, None)  # teacher_bias and the five options


def _row_groups(groups, mask, rows):
    """Group value of every valid row (None: one group), and the distinct values in ascending order."""
    if groups is None:
        return None, None
    groups = torch.as_tensor(groups, device=mask.device)
    if groups.dim() != 1 or groups.shape[0] != mask.shape[0]:
        raise ValueError(f"`groups` must hold one value per sample, shape [{mask.shape[0]}], got {list(groups.shape)}.")
    per_row = groups[:, None].expand(mask.shape).reshape(-1)[rows]
    return per_row, torch.unique(per_row)


def liger_topk_distillation_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, *,
                                 student_bias=None, teacher_bias=None, kl_type="mixed", mixed_kl_weight=0.5, top_k=64,
                                 temperature=1.0, chunk_size=1024, groups=None, return_stats=False):
    r"""`topk_distillation_loss` from hidden states and lm_head weights, on Liger's chunked distillation base.

        loss = sum_{t valid} [ w FKL_t + (1 - w) RKL_t ] / #(valid tokens)

    (both distributions renormalised on the teacher's top-k; see `topk_kl_token_terms`). Same value and gradients
    (w.r.t. `student_hidden`, `student_weight`, `student_bias`) as `fused_topk_distillation_loss`; the teacher gets
    no gradient.

    Args:
        groups: optional [B] value per sample (e.g. the reward r). The rows of each distinct value go through their
            own Liger call; the calls' losses, weighted by their token shares, add up to `loss`.
        return_stats: also return `{"group_values" [G], "group_loss_sums" [G], "group_token_counts" [G]}`
            (G = 1 without `groups`): per group, the sum of L_t over its valid tokens and their number. Liger's loss
            hook returns one number per chunk, so the per-token loss and the forward/reverse split of the native
            kernel are not available here.
    """
    check_hidden_pair(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, student_bias, teacher_bias)
    check_topk_kl_options(kl_type=kl_type, mixed_kl_weight=mixed_kl_weight, top_k=top_k, temperature=temperature,
                          vocab_size=student_weight.shape[0])
    if int(chunk_size) != chunk_size or chunk_size <= 0:
        raise ValueError(f"`chunk_size` must be a positive integer (rows per chunk), got {chunk_size}.")
    rows = valid_row_index(mask)
    n_valid = rows.numel()
    row_group, values = _row_groups(groups, mask, rows)
    if n_valid == 0:
        loss = zero_loss_like(student_hidden, student_weight, student_bias)
        empty = loss.new_zeros(0 if groups is not None else 1)
        stats = {"group_values": empty.clone(), "group_loss_sums": empty.clone(), "group_token_counts": empty}
        return (loss, stats) if return_stats else loss

    student_rows = take_rows(student_hidden, rows)
    teacher_rows = take_rows(teacher_hidden, rows).detach()
    with torch.no_grad():
        raise_if_not_finite(all_finite(student_rows, teacher_rows), "`student_hidden`/`teacher_hidden`")
    options = (kl_type, float(mixed_kl_weight), None if top_k is None else int(top_k), float(temperature),
               int(chunk_size))

    selections = [None] if row_group is None else [(row_group == v).nonzero().squeeze(1) for v in values]
    loss, sums, counts = None, [], []
    for selected in selections:
        s_rows = student_rows if selected is None else student_rows.index_select(0, selected)
        t_rows = teacher_rows if selected is None else teacher_rows.index_select(0, selected)
        n_group = s_rows.shape[0]
        target = torch.zeros(n_group, dtype=torch.long, device=s_rows.device)  # every row passed is valid
        group_mean = LigerFusedLinearTopKKLFunction.apply(s_rows, student_weight, t_rows, teacher_weight, target,
                                                          student_bias, teacher_bias, *options)
        share = group_mean * (n_group / n_valid)
        loss = share if loss is None else loss + share
        sums.append(group_mean.detach() * n_group)
        counts.append(n_group)
    # logits overflowing from finite hidden states show up here (Liger has no per-chunk finiteness flag)
    raise_if_not_finite(torch.isfinite(loss.detach()), "The loss computed from the logits of the valid tokens")
    if not return_stats:
        return loss
    stats = {
        "group_values": values if values is not None else loss.new_zeros(1),
        "group_loss_sums": torch.stack(sums),
        "group_token_counts": torch.tensor(counts, dtype=loss.dtype, device=loss.device),
    }
    return loss, stats
