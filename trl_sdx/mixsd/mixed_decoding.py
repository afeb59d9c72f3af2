"""MixSD mixed contextual decoding: each token comes from the naive or the expert conditional of one model.

Both conditionals are the *same* frozen model, prompted two ways, and both see the same generated prefix:

    naive  π(· | x⁻, y_<t)   x⁻ = the question alone
    expert π(· | x⁺, y_<t)   x⁺ = the question with the gold answer in context

Per step a coin u_t ~ U(0, 1) picks the source: u_t < λ → naive, else expert. Each sequence has a naive and an
expert row in a KV cache (`decode_cache`: one cache of 2B rows, or one per side at its own width, chosen per batch),
the chosen token is appended to both rows, and finished sequences are dropped from the cache. The prefill computes
the prompts' shared beginning (system turn, user header, question) once: the naive rows start from the expert rows'
cached columns. Tokens stay on the device; the host checks for finished sequences every `sync_every` steps and reads
the tokens once at the end.

Randomness is drawn per sequence *before* decoding: sequence i takes `max_new_tokens` coins (and, at T > 0,
`max_new_tokens` sampling uniforms) from its generator, in batch order, whatever its length. A batch therefore
consumes a shared generator exactly as running its sequences one at a time, in order, with that generator; and a
list of per-sequence generators makes each result independent of the batch it ran in.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..validation import check_range, check_top_k
from .decode_cache import choose_cache_layout, prefill_caches

DEFAULT_SYNC_EVERY = 16
"""Steps between the host's reads of "which sequences have finished" (see `mixed_generate`'s `sync_every`)."""


def select_mixed_tokens(
    naive_logits: torch.Tensor,
    expert_logits: torch.Tensor,
    coins: torch.Tensor,
    uniforms: torch.Tensor | None,
    *,
    lambda_mix: float,
    temperature: float = 0.0,
    top_k: int | None = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One MixSD decoding step (paper: token-level mixing of the naive and expert conditionals).

        y_t = pick(π(· | x⁻, y_<t))  if u_t < λ        (naive)
              pick(π(· | x⁺, y_<t))  otherwise         (expert)

        pick(ℓ) = argmax_v ℓ_v                                       if T = 0
                  v ~ softmax(top-k(ℓ) / T), drawn by inverse CDF     if T > 0

    Args:
        naive_logits, expert_logits: `[B, V]` next-token logits of the two conditionals (same prefix y_<t).
        coins: `[B]` u_t ~ U(0, 1); `u_t < lambda_mix` selects the naive conditional.
        uniforms: `[B]` U(0, 1) draws for the inverse-CDF sample (ignored, may be None, at T = 0).
        lambda_mix: λ ∈ [0, 1], the probability of taking a token from the naive conditional.
        temperature: T ≥ 0; 0 means greedy.
        top_k: k, the number of highest logits kept before sampling at T > 0 (None: full vocabulary).

    Returns:
        `(tokens [B] long, from_naive [B] bool)`.
    """
    from_naive = coins < lambda_mix
    logits = torch.where(from_naive.unsqueeze(-1), naive_logits, expert_logits).float()
    if temperature == 0:
        return logits.argmax(dim=-1), from_naive
    k = logits.shape[-1] if top_k is None else min(int(top_k), logits.shape[-1])
    top_values, top_indices = logits.topk(k, dim=-1)  # sorted descending
    probs = torch.softmax(top_values / temperature, dim=-1)
    cdf = probs.cumsum(dim=-1)
    # Inverse CDF with a pre-drawn uniform: deterministic given the draw, so batch and single runs agree.
    position = (cdf < uniforms.to(cdf.device, cdf.dtype).unsqueeze(-1) * cdf[:, -1:]).sum(dim=-1)
    position = position.clamp(max=k - 1)
    return top_indices.gather(-1, position.unsqueeze(-1)).squeeze(-1), from_naive


@dataclass
class MixedGenerationOutput:
    """Generated ids (prompt excluded, EOS kept when produced) and, per token, whether it came from the naive side."""

    sequences: list[list[int]]
    from_naive: list[list[bool]]

    def naive_share(self) -> float:
        """Share of all generated tokens taken from the naive conditional (≈ λ in expectation)."""
        total = sum(len(s) for s in self.from_naive)
        return sum(sum(s) for s in self.from_naive) / total if total else 0.0


def draw_step_randomness(
    batch_size: int,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | Sequence[torch.Generator] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Coins `[B, N]` and (T > 0) sampling uniforms `[B, N]`, drawn sequence by sequence (see module docstring)."""
    if generator is None or isinstance(generator, torch.Generator):
        generators = [generator] * batch_size
    else:
        generators = list(generator)
        if len(generators) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generators)} generators for {batch_size} sequences; pass one per "
                "sequence, or a single torch.Generator."
            )
    coins, uniforms = [], []
    for gen in generators:
        coins.append(torch.rand(max_new_tokens, generator=gen))
        if temperature > 0:
            uniforms.append(torch.rand(max_new_tokens, generator=gen))
    coins_t = torch.stack(coins) if coins else torch.empty(0, max_new_tokens)
    uniforms_t = torch.stack(uniforms) if uniforms else None
    return coins_t, uniforms_t


def _eos_ids(model, eos_token_id) -> set[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id}


def _pad_id(model) -> int:
    """Any id works as padding (it is masked out); prefer the configured pad, then EOS, then 0."""
    for source in (getattr(model, "generation_config", None), model.config):
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(source, name, None)
            if value is not None:
                return int(value if isinstance(value, int) else list(value)[0])
    return 0


def _forward_parameters(model) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


@torch.no_grad()
def mixed_generate(
    model,
    naive_input_ids: Sequence[Sequence[int]],
    expert_input_ids: Sequence[Sequence[int]],
    *,
    lambda_mix: float = 0.3,
    temperature: float = 0.0,
    top_k: int | None = 64,
    max_new_tokens: int = 256,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    return_sources: bool = False,
    cache_layout: str = "auto",
    sync_every: int = DEFAULT_SYNC_EVERY,
) -> list[list[int]] | MixedGenerationOutput:
    """Decode one mixed sequence per (naive prompt, expert prompt) pair with the frozen `model`.

    Args:
        model: a causal LM (a `PeftModel` is used as is: disable its adapters first to decode with the base).
        naive_input_ids: chat-templated x⁻ token ids, one list per sequence (ragged).
        expert_input_ids: chat-templated x⁺ token ids, same number of sequences.
        lambda_mix: λ, probability of taking a token from the naive conditional (0: greedy expert, 1: greedy naive
            at T = 0).
        temperature: T; 0 = argmax, > 0 = sample from softmax(top-k logits / T).
        top_k: k for T > 0 sampling (None: full vocabulary).
        max_new_tokens: generation budget per sequence.
        eos_token_id: id(s) that end a sequence; defaults to the model's generation config.
        generator: one `torch.Generator` for the batch, one per sequence, or None (global RNG).
        return_sources: also return, per token, whether it came from the naive conditional.
        cache_layout: `"shared"` (one cache and one forward of 2B rows per step, padded to the expert width),
            `"split"` (a cache per side, each at its own width, two forwards per step) or `"auto"` (default: split
            when the naive rows' wasted KV bytes reach the weights' bytes; `decode_cache.choose_cache_layout`).
            Same tokens either way.
        sync_every: k, the steps between the host's checks for finished sequences (default 16). Tokens stay on the
            device and are read once at the end; a finished sequence keeps its rows (decoding ignored tokens) until
            the next check, so k trades at most k − 1 wasted steps per sequence for k − 1 fewer device-to-host
            reads. Same tokens for any k.

    Returns:
        A list of generated id lists (prompt excluded, EOS included when produced), or a `MixedGenerationOutput`
        when `return_sources=True`.
    """
    if len(naive_input_ids) != len(expert_input_ids):
        raise ValueError(
            f"`naive_input_ids` has {len(naive_input_ids)} prompts but `expert_input_ids` has "
            f"{len(expert_input_ids)}; pass one expert prompt per naive prompt."
        )
    if any(len(p) == 0 for p in naive_input_ids) or any(len(p) == 0 for p in expert_input_ids):
        raise ValueError("Every prompt in `naive_input_ids` / `expert_input_ids` needs at least one token.")
    check_range("lambda_mix", lambda_mix, low=0.0, high=1.0)
    check_range("temperature", temperature, low=0.0)
    check_top_k("top_k", top_k, model.config.get_text_config().vocab_size)
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be a positive integer, got {max_new_tokens}.")
    if int(sync_every) != sync_every or sync_every < 1:
        raise ValueError(f"`sync_every` must be a positive integer (1: check every step), got {sync_every}.")
    layout = choose_cache_layout(model, naive_input_ids, expert_input_ids, cache_layout)

    batch_size = len(naive_input_ids)
    coins, uniforms = draw_step_randomness(batch_size, max_new_tokens, temperature, generator)
    if batch_size == 0:
        return MixedGenerationOutput([], []) if return_sources else []

    # λ = 0 never reads the naive side, λ = 1 never reads the expert side: skip computing them (same result).
    sides = [s for s, needed in (("naive", lambda_mix > 0), ("expert", lambda_mix < 1)) if needed]
    device = model.get_input_embeddings().weight.device
    eos_ids = _eos_ids(model, eos_token_id)
    parameters = _forward_parameters(model)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    # transformers >= 5.2x names the KV-cache argument `cache` (`past_key_values` is deprecated); it is filled in place.
    cache_name = "cache" if "cache" in parameters else "past_key_values"

    def make_forward(cache):
        return functools.partial(model, use_cache=True, **{cache_name: cache}, **extra)

    was_training = model.training
    model.eval()
    try:
        caches = prefill_caches(model, make_forward, sides, layout, naive_input_ids, expert_input_ids,
                                _pad_id(model), device)
        holder = {side: rows for rows in caches for side in rows.sides}
        # Everything per step stays on the device; the host reads `finished` every `sync_every` steps.
        coins = coins.to(device)
        uniforms = uniforms.to(device) if uniforms is not None else None
        stops = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
        tokens_out = torch.zeros((batch_size, max_new_tokens), dtype=torch.long, device=device)
        naive_out = torch.zeros((batch_size, max_new_tokens), dtype=torch.bool, device=device)
        lengths = torch.full((batch_size,), max_new_tokens, dtype=torch.long, device=device)
        finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        rows = torch.arange(batch_size, device=device)  # original indices of the sequences still decoding
        for step in range(max_new_tokens):
            tokens, from_naive = select_mixed_tokens(
                holder[sides[0]].side_logits(sides[0]), holder[sides[-1]].side_logits(sides[-1]),
                coins[rows, step], uniforms[rows, step] if uniforms is not None else None,
                lambda_mix=lambda_mix, temperature=temperature, top_k=top_k,
            )  # one side only: its logits are both arguments, the coins still give the recorded sources
            tokens_out[rows, step] = tokens
            naive_out[rows, step] = from_naive
            was_finished = finished[rows]
            ends = torch.isin(tokens, stops) & ~was_finished
            lengths[rows] = torch.where(ends, step + 1, lengths[rows])
            finished[rows] = was_finished | ends
            if step == max_new_tokens - 1:
                break
            if eos_ids and (step + 1) % sync_every == 0:  # the host's one read per k steps
                keep = [j for j, done in enumerate(finished[rows].tolist()) if not done]
                if not keep:
                    break
                if len(keep) < len(rows):  # finished sequences leave the batch (their rows on every side)
                    keep_t = torch.tensor(keep, device=device)
                    for cache_rows in caches:
                        cache_rows.keep(keep_t, len(rows))
                    rows, tokens = rows[keep_t], tokens[keep_t]
            for cache_rows in caches:
                cache_rows.advance(tokens)
        # One read of everything generated.
        packed = torch.cat([lengths.unsqueeze(-1), tokens_out, naive_out.long()], dim=-1).tolist()
    finally:
        model.train(was_training)
    sequences = [row[1:1 + row[0]] for row in packed]
    if not return_sources:
        return sequences
    sources = [[bool(b) for b in row[1 + max_new_tokens:1 + max_new_tokens + row[0]]] for row in packed]
    return MixedGenerationOutput(sequences, sources)
