"""Plumbing shared by the loss functions: input checks, valid-row selection, dtype handling.

The math lives in `eopd.py` and `topk_kl.py`; nothing here knows about a paper.
"""

from __future__ import annotations

import math

import torch

from ..validation import check_range, check_top_k


def upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits are upcast to fp32 for log-softmax; fp64 (used by the tests) stays fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Upcast, then divide by the temperature (skipped at 1: one [N, V] pass less)."""
    logits = upcast(logits)
    return logits if temperature == 1.0 else logits / temperature


def entropy_of_logp(logp: torch.Tensor) -> torch.Tensor:
    """-sum_v p log p of a (detached) log-distribution with one [N, V] temporary instead of two."""
    plogp = logp.exp()
    plogp.mul_(logp)
    return -plogp.sum(-1)


# Default rows per chunk: the largest power of two whose [rows, V] fp32 temporaries fit the budget. A student-only
# EOPD chunk step holds about LIVE_CHUNK_TENSORS of them at its peak (logits, log-softmax, and in the backward the
# gather's scatter, exp(log-softmax) and the logits gradient; a bf16 model adds a half-size copy).
LOSS_CHUNK_BUDGET_BYTES = 1 << 30
LIVE_CHUNK_TENSORS = 6
MIN_AUTO_CHUNK, MAX_AUTO_CHUNK = 64, 4096


def loss_chunk_size_for_vocab(vocab_size: int, budget_bytes: int = LOSS_CHUNK_BUDGET_BYTES) -> int:
    """Rows per loss chunk so that LIVE_CHUNK_TENSORS fp32 [rows, vocab_size] tensors stay within `budget_bytes`
    (1 GiB: 256 rows at Qwen3's V = 151,936, 512 at SmolLM2's 49,152), a power of two in [64, 4096]."""
    if int(vocab_size) != vocab_size or vocab_size < 1:
        raise ValueError(f"`vocab_size` must be a positive integer, got {vocab_size}.")
    fit = budget_bytes // (LIVE_CHUNK_TENSORS * 4 * int(vocab_size))
    rows = MIN_AUTO_CHUNK
    while rows * 2 <= min(fit, MAX_AUTO_CHUNK):
        rows *= 2
    return rows


def gate_enabled(tau: float) -> bool:
    """tau = +inf switches the entropy gate (and the forward-KL term with it) off: plain OPD."""
    return not math.isinf(tau)


def check_eopd_options(*, tau, alpha, top_k, clip_eps, temperature, rkl_estimator, vocab_size) -> None:
    check_range("tau", tau, low=0.0, allow_inf=True)
    check_range("alpha", alpha, low=0.0)
    check_range("clip_eps", clip_eps, low=0.0, low_open=True)
    check_range("temperature", temperature, low=0.0, low_open=True)
    check_top_k("top_k", top_k, vocab_size)
    if rkl_estimator not in ("sampled", "full"):
        raise ValueError(
            f"`rkl_estimator` must be 'sampled' (the paper's PPO-clipped sampled-token OPD term) or 'full' "
            f"(exact reverse KL over the vocabulary), got {rkl_estimator!r}."
        )


KL_TYPES = ("forward", "reverse", "mixed")


def check_topk_kl_options(*, kl_type, mixed_kl_weight, top_k, temperature, vocab_size) -> None:
    if kl_type not in KL_TYPES:
        raise ValueError(f"`kl_type` must be one of {KL_TYPES}, got {kl_type!r}.")
    check_range("mixed_kl_weight", mixed_kl_weight, low=0.0, high=1.0)
    check_range("temperature", temperature, low=0.0, low_open=True)
    check_top_k("top_k", top_k, vocab_size)


def _shape(x: torch.Tensor) -> list[int]:
    return list(x.shape)


def check_token_inputs(name: str, x: torch.Tensor | None, leading: tuple[int, ...], *, integer: bool = False) -> None:
    """A per-token tensor must have exactly the leading (batch, time) shape of the mask."""
    if x is None:
        return
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
    if tuple(x.shape) != leading:
        raise ValueError(
            f"`{name}` has shape {_shape(x)}, expected {list(leading)} (same batch and length as the mask)."
        )
    if integer and (x.is_floating_point() or x.is_complex()):
        raise ValueError(f"`{name}` must hold integer token ids, got dtype {x.dtype}.")


def check_logits_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> None:
    if student_logits.dim() != 3:
        raise ValueError(f"`student_logits` must be [batch, length, vocab], got shape {_shape(student_logits)}.")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"`teacher_logits` has shape {_shape(teacher_logits)} but `student_logits` has {_shape(student_logits)}: "
            "align the teacher's positions with the student's and slice both to the same vocabulary."
        )
    if mask.dim() != 2 or tuple(mask.shape) != tuple(student_logits.shape[:2]):
        raise ValueError(
            f"the mask has shape {_shape(mask)}, expected {list(student_logits.shape[:2])} "
            "(batch, length of the logits)."
        )


def check_hidden_pair(student_hidden, student_weight, teacher_hidden, teacher_weight, mask,
                      student_bias=None, teacher_bias=None) -> None:
    if student_hidden.dim() != 3 or teacher_hidden.dim() != 3:
        raise ValueError(
            f"hidden states must be [batch, length, hidden]; got student {_shape(student_hidden)}, "
            f"teacher {_shape(teacher_hidden)}."
        )
    if student_hidden.shape[:2] != teacher_hidden.shape[:2]:
        raise ValueError(
            f"`student_hidden` {_shape(student_hidden)} and `teacher_hidden` {_shape(teacher_hidden)} must share "
            "batch and length (the positions that predict the same completion tokens)."
        )
    if mask.dim() != 2 or tuple(mask.shape) != tuple(student_hidden.shape[:2]):
        raise ValueError(f"the mask has shape {_shape(mask)}, expected {list(student_hidden.shape[:2])}.")
    pairs = (("student", student_weight, student_hidden), ("teacher", teacher_weight, teacher_hidden))
    for name, weight, hidden in pairs:
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(
                f"`{name}_weight` must be the lm_head weight [vocab, {hidden.shape[-1]}], got {_shape(weight)}."
            )
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student and teacher lm_heads have different vocab sizes ({student_weight.shape[0]} vs "
            f"{teacher_weight.shape[0]}); slice both to the shared vocabulary."
        )
    for name, bias in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if bias is not None and tuple(bias.shape) != (student_weight.shape[0],):
            raise ValueError(f"`{name}` must have shape [{student_weight.shape[0]}], got {_shape(bias)}.")


def valid_row_index(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the valid tokens. Only these rows are ever computed on, so padding positions (which
    may hold anything, even NaN) cannot leak into values or gradients."""
    return mask.reshape(-1).nonzero().squeeze(1)


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[B,T,...] -> x[rows] over the flattened (B*T) axis, without a copy when every row is valid."""
    flat = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    if rows.numel() == flat.shape[0]:
        return flat
    return flat.index_select(0, rows)


def all_finite(*tensors: torch.Tensor) -> torch.Tensor:
    """True (0-dim bool tensor) when no element is NaN or +-inf. One summing pass per tensor instead of
    `isfinite(x).all()`'s several: any NaN or inf makes the sum NaN or inf (inf + -inf = NaN); a finite sum of
    logits cannot overflow in practice (it would need |logit| ~ 1e30)."""
    ok = torch.ones((), dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        if t is not None:
            ok = ok & torch.isfinite(t.sum())
    return ok


def not_finite_message(what: str) -> str:
    return (f"{what} contain NaN or infinite values on valid (mask=1) tokens. Check the model outputs (e.g. fp16 "
            "overflow: train in bf16/fp32) and that padding positions are masked out.")


def raise_if_not_finite(ok: torch.Tensor | bool, what: str) -> None:
    if not bool(ok):
        raise ValueError(not_finite_message(what))


def check_ids(ids: torch.Tensor, vocab_size: int) -> None:
    if ids.numel() and (bool((ids < 0).any()) or bool((ids >= vocab_size).any())):
        raise ValueError(
            f"`completion_ids` on valid tokens must lie in [0, {vocab_size}); got min {int(ids.min())}, "
            f"max {int(ids.max())}. Mask padding positions (completion_mask=0) instead of using -100 ids."
        )


def ids_in_range(ids: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids clamped into the vocabulary, 0-dim bool: all were in range) without a host sync. The deferred-check
    mode (`check_finite=False`) folds the flag into the finiteness flag instead of raising at once; clamping keeps a
    bad id from crashing the gather (a device-side assert on CUDA) before the flag is read."""
    ok = ((ids >= 0) & (ids < vocab_size)).all()
    return ids.clamp(0, vocab_size - 1), ok


def lm_head_compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the lm_head product runs in: autocast's when autocast is on for the device (what the model's own
    lm_head forward would use, e.g. fp32 master weights under bf16 autocast), else the hidden states' (what TRL's
    `_chunked_divergence_loss` casts an FSDP2 lm_head to)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def zero_loss_like(*tensors: torch.Tensor) -> torch.Tensor:
    """0 with a grad_fn (when any input requires grad): an all-masked batch must not break `backward()`."""
    out = None
    for t in tensors:
        if t is not None and t.requires_grad:
            # sums nothing: exactly 0 even if padding holds NaN, and a zero gradient
            term = upcast(t.reshape(-1)[:0].sum())
            out = term if out is None else out + term
    if out is None:
        ref = tensors[0]
        out = torch.zeros((), dtype=torch.promote_types(ref.dtype, torch.float32), device=ref.device)
    return out
