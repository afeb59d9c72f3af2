"""MixSD mixed contextual decoding: each token comes from the naive or the expert conditional of one model.

Both conditionals are the *same* frozen model, prompted two ways, and both see the same generated prefix:

    naive  π(· | x⁻, y_<t)   x⁻ = the question alone
    expert π(· | x⁺, y_<t)   x⁺ = the question with the gold answer in context

Per step a coin u_t ~ U(0, 1) picks the source: u_t < λ → naive, else expert. The decoder keeps one KV cache
holding both conditionals' rows (rows [0, B) naive, [B, 2B) expert, each left-padded), so every step is a single
forward of 2B one-token rows, the chosen token is appended to both rows of a sequence, and finished sequences are
dropped from the cache. The prefill computes the prompts' shared beginning (system turn, user header, question)
once: the naive rows start as masked copies of the expert rows' cache (see `_prefill_shared_prefix`).

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
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..validation import check_range, check_top_k


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


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def _plain_kv_cache(cache) -> bool:
    """Full-attention KV layers only: masked-out cache columns are then exactly as if absent (not so for sliding
    windows or recurrent states), which the shared-prefix prefill relies on."""
    return len(cache.layers) > 0 and all(type(layer) is DynamicLayer for layer in cache.layers)


def _prefill(forward, rows: list[list[int]], pad_id: int, device):
    """Left-padded prefill of every row; returns (attention mask, next position per row, last logits)."""
    input_ids, attention_mask = _left_pad(rows, pad_id, device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return attention_mask, attention_mask.sum(-1, keepdim=True), logits[:, -1, :]


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _prefill_shared_prefix(forward, cache, naive, expert, pad_id: int, device):
    """Prefill rows [naive..., expert...] computing the prompts' shared beginning once.

    x⁻ and x⁺ share their first tokens (system turn, user header, question): key/values there depend only on those
    tokens and their positions, so the naive rows start as copies of the expert rows' cache with every column past
    the shared prefix masked out, and only the naive remainder (the end-of-turn and assistant header) is computed.
    The expert rows get masked filler tokens in that second forward, so one cache keeps all 2B rows aligned.
    """
    batch = len(naive)
    mask_e, next_e, expert_logits = _prefill(forward, [list(p) for p in expert], pad_id, device)
    # Recompute at least the last naive token: its logits are the naive conditional's first prediction.
    common = [min(_common_prefix_length(n, e), len(n) - 1) for n, e in zip(naive, expert)]
    index = torch.arange(batch, device=device)
    cache.batch_select_indices(torch.cat([index, index]))  # rows [0, B) become the naive copies
    width = mask_e.shape[1]
    mask_n = mask_e.clone()
    for i, c in enumerate(common):
        pad = width - len(expert[i])
        mask_n[i, pad + c:] = 0  # hide the expert-only columns from the naive row
    suffix_ids, suffix_mask = _left_pad([list(n[c:]) for n, c in zip(naive, common)], pad_id, device)
    suffix_positions = torch.tensor(common, device=device).unsqueeze(-1) + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
    filler = torch.full_like(suffix_ids, pad_id)
    attention_mask = torch.cat([
        torch.cat([mask_n, suffix_mask], dim=-1),
        torch.cat([mask_e, torch.zeros_like(suffix_mask)], dim=-1),
    ])
    logits = forward(input_ids=torch.cat([suffix_ids, filler]), attention_mask=attention_mask,
                     position_ids=torch.cat([suffix_positions, torch.zeros_like(suffix_positions)])).logits
    naive_next = torch.tensor([len(n) for n in naive], device=device).unsqueeze(-1)
    return attention_mask, torch.cat([naive_next, next_e]), torch.cat([logits[:batch, -1, :], expert_logits])


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

    batch_size = len(naive_input_ids)
    coins, uniforms = draw_step_randomness(batch_size, max_new_tokens, temperature, generator)
    sequences: list[list[int]] = [[] for _ in range(batch_size)]
    sources: list[list[bool]] = [[] for _ in range(batch_size)]
    if batch_size == 0:
        return MixedGenerationOutput(sequences, sources) if return_sources else sequences

    # λ = 0 never reads the naive side, λ = 1 never reads the expert side: skip computing them (same result).
    sides = [s for s, needed in (("naive", lambda_mix > 0), ("expert", lambda_mix < 1)) if needed]
    device = model.get_input_embeddings().weight.device
    eos_ids = _eos_ids(model, eos_token_id)
    parameters = _forward_parameters(model)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    # transformers >= 5.2x names the KV-cache argument `cache` (`past_key_values` is deprecated); it is filled in place.
    cache = DynamicCache(config=model.config)
    cache_kwarg = {"cache" if "cache" in parameters else "past_key_values": cache}
    forward = functools.partial(model, use_cache=True, **cache_kwarg, **extra)
    pad_id = _pad_id(model)

    was_training = model.training
    model.eval()
    try:
        if len(sides) == 2 and _plain_kv_cache(cache):
            attention_mask, next_position, last_logits = _prefill_shared_prefix(
                forward, cache, naive_input_ids, expert_input_ids, pad_id, device)
        else:
            prompts = {"naive": naive_input_ids, "expert": expert_input_ids}
            attention_mask, next_position, last_logits = _prefill(
                forward, [list(p) for side in sides for p in prompts[side]], pad_id, device)
        # The pre-drawn randomness goes to the device once, not one copy per step.
        coins = coins.to(device)
        uniforms = uniforms.to(device) if uniforms is not None else None
        active = torch.arange(batch_size)  # original indices of the sequences still decoding
        rows = active.to(device)  # the same, as an index of `coins` / `uniforms`
        for step in range(max_new_tokens):
            n = len(active)
            naive_logits = last_logits[:n] if sides[0] == "naive" else last_logits
            expert_logits = last_logits[-n:]  # == naive_logits when only one side is computed
            tokens, from_naive = select_mixed_tokens(
                naive_logits, expert_logits, coins[rows, step],
                uniforms[rows, step] if uniforms is not None else None,
                lambda_mix=lambda_mix, temperature=temperature, top_k=top_k,
            )
            tokens_list, from_naive_list = tokens.tolist(), from_naive.tolist()
            keep = []
            for j, index in enumerate(active.tolist()):
                sequences[index].append(tokens_list[j])
                sources[index].append(from_naive_list[j])
                if tokens_list[j] not in eos_ids:
                    keep.append(j)
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < n:  # finished sequences leave the batch (their rows on every side)
                keep_t = torch.tensor(keep, device=device)
                row_index = torch.cat([keep_t + k * n for k in range(len(sides))])
                cache.batch_select_indices(row_index)
                attention_mask = attention_mask[row_index]
                next_position = next_position[row_index]
                tokens = tokens[keep_t]
                active = active[torch.tensor(keep)]
                rows = rows[keep_t]
            step_ids = tokens.repeat(len(sides)).unsqueeze(-1)  # the chosen token feeds every side
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(step_ids), 1))], dim=-1)
            last_logits = forward(input_ids=step_ids, attention_mask=attention_mask,
                                  position_ids=next_position).logits[:, -1, :]
            next_position = next_position + 1
    finally:
        model.train(was_training)
    return MixedGenerationOutput(sequences, sources) if return_sources else sequences
