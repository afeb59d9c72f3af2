"""Rejection sampling over mixed decoding: keep a mixed sequence only if its final answer matches the gold one.

A failing example is regenerated with fresh coin flips (and samples at T > 0) up to `max_retries` extra times; an
example that never passes is dropped, or kept with `accepted=False` when the caller asks for it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from .mixed_decoding import mixed_generate

logger = logging.getLogger(__name__)

AnswerChecker = Callable[[str, str], bool]
"""`checker(completion_text, gold_answer_text) -> bool`: does the completion give the gold answer?"""


def default_answer_checker(completion: str, gold: str) -> bool:
    """Final answer of the completion (last \\boxed{}, else last number) equals the gold one under math-verify.

    The gold answer is read from the gold answer turn the same way; a gold turn without a box or number is compared
    as a whole (short fact answers such as "Paris").
    """
    from trl_sdx.rewards import answers_match, extract_final_answer

    gold_value = extract_final_answer(gold) or gold.strip()
    return answers_match(extract_final_answer(completion), gold_value)


@dataclass
class MixedTarget:
    """One example's final mixed sequence (the last attempt) and how it was obtained."""

    completion_ids: list[int]
    completion: str  # decoded without special tokens: the chat template adds the end-of-turn when training
    accepted: bool
    attempts: int
    naive_tokens: int  # tokens taken from the naive conditional

    @property
    def num_tokens(self) -> int:
        return len(self.completion_ids)

    def to_dict(self) -> dict:
        return asdict(self)


def example_seed(seed: int, index: int) -> int:
    """A per-example seed: example i's draws do not depend on which other examples share its batch."""
    digest = hashlib.sha256(f"mixsd:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def rejection_sample(
    model,
    tokenizer,
    naive_input_ids: Sequence[Sequence[int]],
    expert_input_ids: Sequence[Sequence[int]],
    gold_answers: Sequence[str],
    *,
    lambda_mix: float = 0.3,
    temperature: float = 0.0,
    top_k: int | None = 64,
    max_new_tokens: int = 256,
    max_retries: int = 10,
    batch_size: int = 16,
    seed: int = 0,
    answer_checker: AnswerChecker | None = None,
    eos_token_id: int | Sequence[int] | None = None,
) -> list[MixedTarget]:
    """Mixed targets for every example, regenerating failures up to `max_retries` extra attempts.

    Example i draws from its own generator seeded by `example_seed(seed, i)` across all its attempts, so its result
    does not depend on `batch_size` or on the other examples. Returns one `MixedTarget` per example, in order
    (`accepted=False` for those that never passed: the caller decides whether to drop them).
    """
    if max_retries < 0:
        raise ValueError(f"`max_retries` must be >= 0 (0 disables retries), got {max_retries}.")
    if batch_size < 1:
        raise ValueError(f"`generation_batch_size` must be >= 1, got {batch_size}.")
    n = len(gold_answers)
    if not (len(naive_input_ids) == len(expert_input_ids) == n):
        raise ValueError("`naive_input_ids`, `expert_input_ids` and `gold_answers` must have the same length.")
    checker = answer_checker or default_answer_checker
    generators = [torch.Generator().manual_seed(example_seed(seed, i)) for i in range(n)]
    results: list[MixedTarget | None] = [None] * n
    pending = list(range(n))
    for attempt in range(1, max_retries + 2):
        failed = []
        for start in range(0, len(pending), batch_size):
            chunk = pending[start:start + batch_size]
            output = mixed_generate(
                model,
                [naive_input_ids[i] for i in chunk],
                [expert_input_ids[i] for i in chunk],
                lambda_mix=lambda_mix, temperature=temperature, top_k=top_k, max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id, generator=[generators[i] for i in chunk], return_sources=True,
            )
            for i, ids, sources in zip(chunk, output.sequences, output.from_naive, strict=True):
                text = tokenizer.decode(ids, skip_special_tokens=True)
                ok = bool(checker(text, gold_answers[i]))
                results[i] = MixedTarget(ids, text, ok, attempt, int(sum(sources)))
                if not ok:
                    failed.append(i)
        logger.info("MixSD attempt %d: %d/%d examples still failing", attempt, len(failed), n)
        pending = failed
        if not pending:
            break
    return results  # type: ignore[return-value]


def summarize_targets(targets: Sequence[MixedTarget], *, keep_failed: bool = False) -> dict:
    """What the paper reports about target construction: naive-token share, retries, drops."""
    kept = [t for t in targets if t.accepted or keep_failed]
    kept_tokens = sum(t.num_tokens for t in kept)
    retries = [t.attempts - 1 for t in targets]
    return {
        "num_examples": len(targets),
        "num_accepted": sum(t.accepted for t in targets),
        "num_dropped": len(targets) - len(kept),
        "num_kept": len(kept),
        "naive_token_share": (sum(t.naive_tokens for t in kept) / kept_tokens) if kept_tokens else 0.0,
        "mean_retries": (sum(retries) / len(retries)) if retries else 0.0,
        "max_retries_used": max(retries, default=0),
        "retries_per_example": retries,
        "mean_completion_tokens": (kept_tokens / len(kept)) if kept else 0.0,
    }
