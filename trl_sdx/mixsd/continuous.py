"""Continuous batching for MixSD rejection sampling: a finished sequence's slot is refilled at once.

`mixed_generate` decodes a fixed batch: sequences leave it as they finish and nobody takes their place, so a long
tail decodes with a few rows while the per-step cost (weight reads) stays nearly that of a full batch. Here up to
`batch_size` sequences are in flight; when one ends it is graded at once and either committed or restarted (its
next attempt), and free slots take the next pending examples. New rows are prefilled on their own and merged into
the running KV cache: the narrower of the two caches is left-padded with masked columns (keys are stored after
RoPE and positions are explicit, so masked padding is exactly absent), and columns no row attends to any more are
trimmed. This needs full-attention KV layers; other caches fall back to `rejection_sample`'s fixed batches.

Each attempt draws its coins (and uniforms) from its example's generator exactly as `mixed_generate` does, so the
targets equal the fixed-batch ones (up to floating-point ties in the argmax).
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .decode_cache import _plain_kv_cache, _prefill, _prefill_shared_prefix
from .mixed_decoding import _forward_parameters, _pad_id, draw_step_randomness, select_mixed_tokens


@dataclass
class _Attempt:
    example: int
    attempt: int
    coins: torch.Tensor
    uniforms: torch.Tensor | None
    tokens: list[int] = field(default_factory=list)
    sources: list[bool] = field(default_factory=list)


def supports_refill(model) -> bool:
    """True when the model's KV cache has full-attention layers only (masked cache columns are then absent)."""
    cache = DynamicCache(config=model.config)
    return _plain_kv_cache(cache)


class _Slots:
    """The running batch: one KV cache holding every side's rows, side-major (side s: rows [s·n, (s+1)·n))."""

    def __init__(self, model, sides: list[str]):
        parameters = _forward_parameters(model)
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        self.cache_name = "cache" if "cache" in parameters else "past_key_values"
        self.model, self.sides, self.pad_id = model, sides, _pad_id(model)
        self.device = model.get_input_embeddings().weight.device
        self.cache = None
        self.mask = self.position = self.logits = None
        self.attempts: list[_Attempt] = []

    def _forward(self, cache):
        return functools.partial(self.model, use_cache=True, **{self.cache_name: cache}, **self.extra)

    def add(self, attempts: list[_Attempt], naive_ids, expert_ids) -> None:
        """Prefill the new attempts and merge them into the running batch."""
        cache = DynamicCache(config=self.model.config)
        forward = self._forward(cache)
        naive = [naive_ids[a.example] for a in attempts]
        expert = [expert_ids[a.example] for a in attempts]
        if len(self.sides) == 2:
            mask, position, logits = _prefill_shared_prefix(forward, cache, naive, expert, self.pad_id, self.device)
        else:
            prompts = naive if self.sides[0] == "naive" else expert
            mask, position, logits = _prefill(forward, [list(p) for p in prompts], self.pad_id, self.device)
        if self.cache is None:
            self.cache, self.mask, self.position, self.logits = cache, mask, position, logits
            self.attempts = list(attempts)
            return
        old, new = len(self.attempts), len(attempts)
        width = max(self.mask.shape[1], mask.shape[1])
        # Side-major order of the concatenation [old rows..., new rows...].
        order = torch.cat([torch.cat([torch.arange(s * old, (s + 1) * old),
                                      len(self.sides) * old + torch.arange(s * new, (s + 1) * new)])
                           for s in range(len(self.sides))]).to(self.device)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            for name in ("keys", "values"):
                a, b = _left_pad(getattr(mine, name), width, dim=2), _left_pad(getattr(theirs, name), width, dim=2)
                setattr(mine, name, torch.cat([a, b]).index_select(0, order))
        self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(mask, width, dim=1)]).index_select(
            0, order)
        self.position = torch.cat([self.position, position]).index_select(0, order)
        self.logits = torch.cat([self.logits, logits]).index_select(0, order)
        self.attempts += attempts

    def select(self, lambda_mix: float, temperature: float, top_k) -> tuple[list[int], list[bool]]:
        """Each row's next token from its own step's coin (rows are at different steps)."""
        n = len(self.attempts)
        naive_logits = self.logits[:n] if self.sides[0] == "naive" else self.logits
        expert_logits = self.logits[-n:]
        steps = [len(a.tokens) for a in self.attempts]
        coins = torch.stack([a.coins[t] for a, t in zip(self.attempts, steps, strict=True)]).to(self.device)
        uniforms = None
        if temperature > 0:
            uniforms = torch.stack([a.uniforms[t] for a, t in zip(self.attempts, steps, strict=True)]).to(self.device)
        tokens, from_naive = select_mixed_tokens(naive_logits, expert_logits, coins, uniforms,
                                                 lambda_mix=lambda_mix, temperature=temperature, top_k=top_k)
        return tokens.tolist(), from_naive.tolist()

    def keep(self, rows: list[int]) -> None:
        """Keep these sequences (indices into `attempts`), dropping the others' rows on every side."""
        n = len(self.attempts)
        self.attempts = [self.attempts[j] for j in rows]
        if not rows:
            self.cache = None
            return
        index = torch.tensor(rows, device=self.device)
        row_index = torch.cat([index + s * n for s in range(len(self.sides))])
        self.cache.batch_select_indices(row_index)
        self.mask, self.position = self.mask[row_index], self.position[row_index]
        first = int(self.mask.any(dim=0).nonzero()[0])  # columns before it are padding for every row
        if first > 0:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.mask = self.mask[:, first:]

    def advance(self, tokens: list[int]) -> None:
        """Feed each remaining sequence's chosen token to all its rows."""
        step_ids = torch.tensor(tokens, device=self.device).repeat(len(self.sides)).unsqueeze(-1)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(step_ids), 1))], dim=-1)
        self.logits = self._forward(self.cache)(input_ids=step_ids, attention_mask=self.mask,
                                                position_ids=self.position).logits[:, -1, :]
        self.position = self.position + 1


def decode_with_refill(model, naive_ids, expert_ids, generators, *, lambda_mix, temperature, top_k, max_new_tokens,
                       stop_ids: set[int], batch_size: int, attempts_allowed: int, on_end) -> None:
    """Run every example's attempts with refilled slots. `on_end(example, attempt, tokens, sources) -> bool` grades
    an attempt that ended (stop token or `max_new_tokens`); a rejected one is retried while attempts are left."""
    sides = [s for s, needed in (("naive", lambda_mix > 0), ("expert", lambda_mix < 1)) if needed]
    slots = _Slots(model, sides)
    pending = deque((i, 1) for i in range(len(generators)))

    def start(example: int, attempt: int) -> _Attempt:
        coins, uniforms = draw_step_randomness(1, max_new_tokens, temperature, [generators[example]])
        return _Attempt(example, attempt, coins[0], uniforms[0] if uniforms is not None else None)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            while pending or slots.attempts:
                free = batch_size - len(slots.attempts)
                if free and pending:
                    new = [start(*pending.popleft()) for _ in range(min(free, len(pending)))]
                    slots.add(new, naive_ids, expert_ids)
                tokens, from_naive = slots.select(lambda_mix, temperature, top_k)
                keep, fed = [], []
                for j, (attempt, token, source) in enumerate(zip(slots.attempts, tokens, from_naive, strict=True)):
                    attempt.tokens.append(token)
                    attempt.sources.append(source)
                    if token not in stop_ids and len(attempt.tokens) < max_new_tokens:
                        keep.append(j)
                        fed.append(token)
                        continue
                    accepted = on_end(attempt.example, attempt.attempt, attempt.tokens, attempt.sources)
                    if not accepted and attempt.attempt < attempts_allowed:
                        pending.appendleft((attempt.example, attempt.attempt + 1))  # its retry goes first
                if len(keep) < len(slots.attempts):
                    slots.keep(keep)
                if slots.attempts:
                    slots.advance(fed)
    finally:
        model.train(was_training)


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
