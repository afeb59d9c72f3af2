"""Rejection sampling over mixed decoding: keep a mixed sequence only if it ends and gives the gold answer.

A target passes when it stopped on an end-of-turn token (a target cut off by `max_new_tokens` fails) and the
answer checker accepts it (default: the official fact-QA rule, `answers.boxed_answer_checker`). A failing example is
regenerated with fresh coin flips (and samples at T > 0) up to `max_retries` extra times, unless a retry cannot
differ (T = 0 with λ ∈ {0, 1} is deterministic); an example that never passes is dropped, or kept with
`accepted=False` when the caller asks for it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .answers import boxed_answer_checker
from .continuous import decode_with_refill, supports_refill
from .mixed_decoding import MixedGenerationOutput, _eos_ids, mixed_generate

logger = logging.getLogger(__name__)

AnswerChecker = Callable[[str, str], bool]
"""`checker(completion_text, gold_answer_text) -> bool`: does the completion give the gold answer?"""


@dataclass
class MixedTarget:
    """One example's final mixed sequence (the last attempt) and how it was obtained."""

    completion_ids: list[int]
    completion: str  # decoded without special tokens: the chat template adds the end-of-turn when training
    accepted: bool
    attempts: int
    naive_tokens: int  # tokens taken from the naive conditional
    finish_reason: str = "stop"  # "stop": ended on an end-of-turn token; "length": cut off by max_new_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.completion_ids)

    def to_dict(self) -> dict:
        return asdict(self)


def example_seed(seed: int, index: int) -> int:
    """A per-example seed: example i's draws do not depend on which other examples share its batch."""
    digest = hashlib.sha256(f"mixsd:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def retries_can_differ(lambda_mix: float, temperature: float) -> bool:
    """False when every attempt decodes the same sequence: greedy (T = 0) from one side only (λ = 0 or 1)."""
    return temperature > 0 or 0.0 < lambda_mix < 1.0


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
    max_new_tokens: int = 8192,
    max_retries: int = 100,
    batch_size: int = 16,
    seed: int = 0,
    answer_checker: AnswerChecker | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    example_indices: Sequence[int] | None = None,
    disable_progress: bool = True,
    decoder: Callable[..., MixedGenerationOutput] | None = None,
    refill: bool = False,
) -> list[MixedTarget]:
    """Mixed targets for every example, regenerating failures up to `max_retries` extra attempts.

    A target passes when it ends on one of `eos_token_id` (default: the model's) and `answer_checker(text, gold)`
    accepts its decoded text (default: `boxed_answer_checker`, the official fact-QA rule). Example i draws from its
    own generator seeded by `example_seed(seed, example_indices[i])` across all its attempts (default index: i), so
    its result depends neither on `batch_size` nor on the other examples, nor on which process of a sharded run
    builds it. Returns one `MixedTarget` per example, in order (`accepted=False` for those that never passed: the
    caller decides whether to drop them). `disable_progress=False` shows a tqdm bar over finished examples.
    `decoder(naive_ids, expert_ids, **decoding_kwargs)` replaces the KV-cache decoder `mixed_generate(model, ...)`
    (e.g. `vllm_decoding.VLLMTargetDecoder`); it gets the same arguments and returns a `MixedGenerationOutput`.
    `refill=True` refills a finished sequence's slot at once (`continuous.decode_with_refill`, same targets); off by
    default because the CPU benchmark (`benchmarks/results/mixsd_refill_cpu.md`) shows no gain yet.
    """
    if max_retries < 0:
        raise ValueError(f"`max_retries` must be >= 0 (0 disables retries), got {max_retries}.")
    if batch_size < 1:
        raise ValueError(f"`generation_batch_size` must be >= 1, got {batch_size}.")
    n = len(gold_answers)
    if not (len(naive_input_ids) == len(expert_input_ids) == n):
        raise ValueError("`naive_input_ids`, `expert_input_ids` and `gold_answers` must have the same length.")
    indices = list(range(n)) if example_indices is None else list(example_indices)
    if len(indices) != n:
        raise ValueError(f"`example_indices` has {len(indices)} entries for {n} examples.")
    checker = answer_checker or boxed_answer_checker
    stop_ids = _eos_ids(model, eos_token_id)
    attempts_allowed = 1 + (max_retries if retries_can_differ(lambda_mix, temperature) else 0)
    if attempts_allowed == 1 and max_retries > 0:
        logger.info("MixSD: T = 0 with λ = %s decodes the same sequence every time; retries skipped.", lambda_mix)
    generators = [torch.Generator().manual_seed(example_seed(seed, i)) for i in indices]
    results: list[MixedTarget | None] = [None] * n
    bar = tqdm(total=n, desc="MixSD targets", unit="example", disable=disable_progress)
    accepted = 0

    def grade(i: int, attempt: int, ids: list[int], sources: list[bool]) -> bool:
        nonlocal accepted
        text = tokenizer.decode(ids, skip_special_tokens=True)
        finish = "stop" if ids and ids[-1] in stop_ids else "length"
        ok = finish == "stop" and bool(checker(text, gold_answers[i]))
        results[i] = MixedTarget(list(ids), text, ok, attempt, int(sum(sources)), finish)
        if ok or attempt == attempts_allowed:
            accepted += ok
            bar.update(1)
            bar.set_postfix(attempt=attempt, accepted=accepted, refresh=False)
        return ok

    if refill and decoder is None and supports_refill(model):  # a finished sequence's slot is refilled at once
        decode_with_refill(model, naive_input_ids, expert_input_ids, generators, lambda_mix=lambda_mix,
                           temperature=temperature, top_k=top_k, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                           batch_size=batch_size, attempts_allowed=attempts_allowed, on_end=grade)
        bar.close()
        return results  # type: ignore[return-value]
    decode = decoder or functools.partial(mixed_generate, model, return_sources=True)
    pending = list(range(n))  # fixed batches, one round per attempt
    for attempt in range(1, attempts_allowed + 1):
        failed = []
        for start in range(0, len(pending), batch_size):
            chunk = pending[start:start + batch_size]
            output = decode(
                [naive_input_ids[i] for i in chunk],
                [expert_input_ids[i] for i in chunk],
                lambda_mix=lambda_mix, temperature=temperature, top_k=top_k, max_new_tokens=max_new_tokens,
                eos_token_id=sorted(stop_ids), generator=[generators[i] for i in chunk],
            )
            for i, ids, sources in zip(chunk, output.sequences, output.from_naive, strict=True):
                if not grade(i, attempt, ids, sources) and attempt < attempts_allowed:
                    failed.append(i)
        logger.info("MixSD attempt %d: %d/%d examples still failing", attempt, len(failed), n)
        pending = failed
        if not pending:
            break
    bar.close()
    return results  # type: ignore[return-value]


def summarize_targets(targets: Sequence[MixedTarget], *, keep_failed: bool = False) -> dict:
    """What the paper reports about target construction: naive-token share, retries, drops (which examples)."""
    kept = [t for t in targets if t.accepted or keep_failed]
    kept_tokens = sum(t.num_tokens for t in kept)
    retries = [t.attempts - 1 for t in targets]
    return {
        "num_examples": len(targets),
        "num_accepted": sum(t.accepted for t in targets),
        "num_dropped": len(targets) - len(kept),
        "num_kept": len(kept),
        "num_truncated": sum(t.finish_reason == "length" for t in targets),  # final attempt cut by max_new_tokens
        "dropped_examples": [i for i, t in enumerate(targets) if not (t.accepted or keep_failed)],
        "naive_token_share": (sum(t.naive_tokens for t in kept) / kept_tokens) if kept_tokens else 0.0,
        "mean_retries": (sum(retries) / len(retries)) if retries else 0.0,
        "max_retries_used": max(retries, default=0),
        "retries_per_example": retries,
        "mean_completion_tokens": (kept_tokens / len(kept)) if kept else 0.0,
    }
