"""Tiny chat models trained in-process for the efficacy benchmarks' synthetic tasks.

The efficacy rule "the base model must be able to do the part the method relies on" is met here by building the base
model: a tokenizer learnt from the task's corpus (`train_chat_tokenizer`) and a tiny Llama pre-trained on the task's
conversations (`pretrain_on_chats`). Both are deterministic under their seed, so a base model is rebuilt rather than
stored.

`pretrain_on_chats` is ordinary supervised training on the assistant turns (loss on the tokens the chat template
marks with `{% generation %}`), with AdamW, a linear warm-up and a cosine decay. Batches are right-padded: a Llama
forward without explicit position ids counts positions from the first column, so left padding would shift them in
training while generation (which derives positions from the attention mask) would not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from trl_sdx.testing import make_corpus_tokenizer


def train_chat_tokenizer(texts: Sequence[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer learnt from `texts`, with the ChatML template of `trl_sdx.testing` (eos
    `<|im_end|>`, pad `<pad>`, padding side left for generation)."""
    return make_corpus_tokenizer(texts, vocab_size)


def encode_chats(tokenizer, chats: Sequence[list[dict]], chat_template_kwargs: dict | None = None
                 ) -> list[tuple[list[int], list[int]]]:
    """(input ids, assistant mask) per conversation, rendered by the tokenizer's chat template."""
    encoded = []
    for messages in chats:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True, **(chat_template_kwargs or {}))
        mask = out["assistant_masks"]
        if not any(mask):
            raise ValueError(f"a conversation has no assistant tokens to train on: {messages!r}.")
        encoded.append((list(out["input_ids"]), list(mask)))
    return encoded


def _right_padded_batch(rows: list[tuple[list[int], list[int]]], pad_id: int):
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids)
        attention[i, :n] = 1
        labels[i, :n] = torch.where(torch.tensor(mask, dtype=torch.bool), torch.tensor(ids), -100)
    return input_ids, attention, labels


def pretrain_on_chats(model, tokenizer, chats: Sequence[list[dict]], *, steps: int, lr: float = 3e-3,
                      batch_size: int = 64, seed: int = 0, warmup_fraction: float = 0.05, weight_decay: float = 0.0,
                      chat_template_kwargs: dict | None = None, log: Callable[[str], None] | None = None,
                      log_every: int = 100) -> list[float]:
    """Train `model` in place on the assistant turns of `chats`; returns the loss of every step.

    Each step draws `batch_size` conversations uniformly with replacement (a seeded generator, so the run is
    reproducible); the loss is the token mean over the batch's assistant tokens.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps = {steps}, batch_size = {batch_size}.")
    encoded = encode_chats(tokenizer, chats, chat_template_kwargs)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    warmup = max(1, int(warmup_fraction * steps))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    losses = []
    for step in range(steps):
        picks = torch.randint(0, len(encoded), (batch_size,), generator=generator).tolist()
        input_ids, attention, labels = _right_padded_batch([encoded[i] for i in picks], tokenizer.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log is not None and (step + 1) % log_every == 0:
            log(f"[pretrain] step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.4f}")
    model.eval()
    return losses
