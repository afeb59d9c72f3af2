"""KV-cache layouts of MixSD mixed decoding: where the naive and the expert rows live, and how they are prefilled.

Both conditionals see the same generated prefix, so every step feeds the chosen token to one naive and one expert row
per sequence. Two layouts:

- `shared`: one cache, rows [0, B) naive and [B, 2B) expert, one forward of 2B rows per step. The cache is as wide as
  the longest *expert* prompt, so the naive rows carry (masked) expert-only columns: KV memory and attention reads of
  B · (W⁺ − W⁻) columns per layer that they never use.
- `split`: two caches, each padded to its own side's width, two forwards of B rows per step. Nothing is wasted, but
  every step reads the weights twice.

`choose_cache_layout` picks per batch (`auto`): `split` when the naive rows' wasted KV bytes reach the weights' bytes,

    B · (W⁺ − W⁻) · (KV bytes per token)  ≥  bytes of the parameters,

because at decode time a forward is bound by the memory it reads (weights + KV cache): the second forward of
`split` costs one more read of the weights, `shared` costs the waste. Measured in
`benchmarks/results/mixsd_throughput_cpu.md`; the GPU suite measures both layouts on a long expert context.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

CACHE_LAYOUTS = ("auto", "shared", "split")


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


def _shared_lengths(naive, expert) -> list[int]:
    # Recompute at least the last naive token: its logits are the naive conditional's first prediction.
    return [min(_common_prefix_length(n, e), len(n) - 1) for n, e in zip(naive, expert)]


def _prefill_suffix(forward, naive, common: list[int], prefix_mask: torch.Tensor, pad_id: int, device,
                    filler_mask: torch.Tensor | None = None):
    """Forward the naive remainders `naive[i][common[i]:]` after a cache whose columns `prefix_mask` marks.
    `filler_mask` (shared layout): the expert rows below them, fed masked filler tokens to keep the cache aligned."""
    suffix_ids, suffix_mask = _left_pad([list(n[c:]) for n, c in zip(naive, common)], pad_id, device)
    suffix_positions = torch.tensor(common, device=device).unsqueeze(-1) + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
    attention_mask = torch.cat([prefix_mask, suffix_mask], dim=-1)
    input_ids, position_ids = suffix_ids, suffix_positions
    if filler_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.cat([filler_mask, torch.zeros_like(suffix_mask)], -1)])
        input_ids = torch.cat([suffix_ids, torch.full_like(suffix_ids, pad_id)])
        position_ids = torch.cat([suffix_positions, torch.zeros_like(suffix_positions)])
    logits = forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return attention_mask, logits[:, -1, :]


def _prefill_shared_prefix(forward, cache, naive, expert, pad_id: int, device):
    """Shared layout: prefill rows [naive..., expert...] computing the prompts' shared beginning once.

    x⁻ and x⁺ share their first tokens (system turn, user header, question): key/values there depend only on those
    tokens and their positions, so the naive rows start as copies of the expert rows' cache with every column past
    the shared prefix masked out, and only the naive remainder (the end-of-turn and assistant header) is computed.
    The expert rows get masked filler tokens in that second forward, so one cache keeps all 2B rows aligned.
    """
    batch = len(naive)
    mask_e, next_e, expert_logits = _prefill(forward, [list(p) for p in expert], pad_id, device)
    common = _shared_lengths(naive, expert)
    index = torch.arange(batch, device=device)
    cache.batch_select_indices(torch.cat([index, index]))  # rows [0, B) become the naive copies
    width = mask_e.shape[1]
    mask_n = mask_e.clone()
    for i, c in enumerate(common):
        mask_n[i, width - len(expert[i]) + c:] = 0  # hide the expert-only columns from the naive row
    attention_mask, logits = _prefill_suffix(forward, naive, common, mask_n, pad_id, device, filler_mask=mask_e)
    naive_next = torch.tensor([len(n) for n in naive], device=device).unsqueeze(-1)
    return attention_mask, torch.cat([naive_next, next_e]), torch.cat([logits[:batch], expert_logits])


def _prefill_naive_from_expert(forward, cache, expert_cache, naive, expert, pad_id: int, device):
    """Split layout: the naive cache starts from the expert cache's shared-prefix columns, at its own width.

    Naive row i takes its c_i shared columns from expert row i, right-aligned in a cache of P = max c_i columns
    (left-padded, masked), then its remainder is computed. The naive cache is P + max(|x⁻_i| − c_i) wide: the naive
    prompt width whenever the remainders (end-of-turn + assistant header) have one length, as chat templates make them.
    """
    common = _shared_lengths(naive, expert)
    prefix = max(common)
    if prefix == 0:  # nothing shared: a plain prefill
        return _prefill(forward, [list(p) for p in naive], pad_id, device)
    width_e = expert_cache.layers[0].keys.shape[2]
    shortfall = prefix - torch.tensor(common, device=device).unsqueeze(-1)  # leading padding columns per row
    starts = torch.tensor([width_e - len(e) for e in expert], device=device).unsqueeze(-1) - shortfall
    columns = (starts + torch.arange(prefix, device=device)).clamp(min=0)  # [B, P] expert column per naive column
    prefix_mask = (torch.arange(prefix, device=device) >= shortfall).long()
    for layer, source in zip(cache.layers, expert_cache.layers, strict=True):
        index = columns[:, None, :, None].expand(-1, source.keys.shape[1], -1, source.keys.shape[3])
        layer.update(source.keys.gather(2, index), source.values.gather(2, index))
    attention_mask, logits = _prefill_suffix(forward, naive, common, prefix_mask, pad_id, device)
    return attention_mask, torch.tensor([len(n) for n in naive], device=device).unsqueeze(-1), logits


def choose_cache_layout(model, naive, expert, cache_layout: str = "auto") -> str:
    """`shared` or `split` for this batch (see the module docstring for the rule and why)."""
    if cache_layout not in CACHE_LAYOUTS:
        raise ValueError(f"`cache_layout` must be one of {CACHE_LAYOUTS}, got {cache_layout!r}.")
    if cache_layout != "auto":
        return cache_layout
    text = model.config.get_text_config()
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    layers = getattr(text, "num_hidden_layers", None)
    if not (kv_heads and head_dim and layers):
        return "shared"  # no estimate for this architecture: the layout of one forward per step
    element = model.get_input_embeddings().weight.element_size()  # the compute dtype the KV cache is kept in
    kv_bytes_per_token = 2 * layers * kv_heads * head_dim * element
    waste = len(naive) * (max(map(len, expert)) - max(map(len, naive))) * kv_bytes_per_token
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return "split" if waste >= weights else "shared"


@dataclass
class CacheRows:
    """One KV cache and the sides whose rows it holds, side-major (side s: rows [s·n, (s+1)·n) of n sequences)."""

    sides: list[str]
    cache: DynamicCache
    forward: functools.partial
    mask: torch.Tensor
    position: torch.Tensor
    logits: torch.Tensor

    def side_logits(self, side: str) -> torch.Tensor:
        n = self.logits.shape[0] // len(self.sides)
        s = self.sides.index(side)
        return self.logits[s * n:(s + 1) * n]

    def keep(self, index: torch.Tensor, n: int) -> None:
        """Keep the sequences `index` (of the n now decoding), on every side."""
        row_index = torch.cat([index + s * n for s in range(len(self.sides))])
        self.cache.batch_select_indices(row_index)
        self.mask, self.position = self.mask[row_index], self.position[row_index]

    def advance(self, tokens: torch.Tensor) -> None:
        """Feed each sequence's chosen token to all its rows."""
        step_ids = tokens.repeat(len(self.sides)).unsqueeze(-1)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(step_ids), 1))], dim=-1)
        self.logits = self.forward(input_ids=step_ids, attention_mask=self.mask,
                                   position_ids=self.position).logits[:, -1, :]
        self.position = self.position + 1


def prefill_caches(model, make_forward, sides: list[str], layout: str, naive, expert, pad_id: int,
                   device) -> list[CacheRows]:
    """Prefill the prompts of `sides` in `layout`; `make_forward(cache)` is the model's forward on that cache."""
    def new():
        cache = DynamicCache(config=model.config)
        return cache, make_forward(cache)

    prompts = {"naive": naive, "expert": expert}
    if len(sides) == 1:
        cache, forward = new()
        return [CacheRows(sides, cache, forward, *_prefill(forward, [list(p) for p in prompts[sides[0]]], pad_id,
                                                             device))]
    cache, forward = new()
    plain = _plain_kv_cache(cache)
    if layout == "shared":
        if plain:
            state = _prefill_shared_prefix(forward, cache, naive, expert, pad_id, device)
        else:
            state = _prefill(forward, [list(p) for side in sides for p in prompts[side]], pad_id, device)
        return [CacheRows(sides, cache, forward, *state)]
    expert_rows = CacheRows(["expert"], cache, forward, *_prefill(forward, [list(p) for p in expert], pad_id, device))
    cache_n, forward_n = new()
    if plain:
        state = _prefill_naive_from_expert(forward_n, cache_n, cache, naive, expert, pad_id, device)
    else:
        state = _prefill(forward_n, [list(p) for p in naive], pad_id, device)
    return [CacheRows(["naive"], cache_n, forward_n, *state), expert_rows]
