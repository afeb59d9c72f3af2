"""Mixed decoding (`mixed_generate`) and rejection sampling, on a tiny random Llama (CPU, offline)."""

from __future__ import annotations

import zlib

import pytest
import torch

from trl_sdx.mixsd import mixed_generate, rejection_sample, select_mixed_tokens, summarize_targets
from trl_sdx.mixsd.prompts import FACT_PREFIX, FACT_TRANSITION, build_prompt_ids
from trl_sdx.testing import make_tiny_model, make_tiny_tokenizer

QUESTIONS = [
    "What is 12 + 7?",
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
    "In which year was Dr. Elara Vance born?",
    "What is the capital of Zorbania?",
]
ANSWERS = ["12 + 7 = 19. \\boxed{19}", "3 + 5 = 8, so \\boxed{8}.", "She was born in 1873. \\boxed{1873}",
           "The capital of Zorbania is \\boxed{Quillport}."]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    # A wider init than the default spreads the logits: the top-2 margins (~1e-3) stay far above fp32 noise
    # (~1e-6) between padded-batch and single runs, so argmax comparisons are exact rather than lucky.
    return make_tiny_model(tokenizer, seed=3, hidden_size=64, initializer_range=0.1).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    naive, expert = build_prompt_ids(tokenizer, QUESTIONS, ANSWERS, FACT_PREFIX, FACT_TRANSITION)
    assert len({len(p) for p in naive}) > 1 and len({len(p) for p in expert}) > 1  # ragged on both sides
    return naive, expert


def _greedy_reference(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("lambda_mix, side", [(0.0, "expert"), (1.0, "naive")])
def test_extreme_lambda_is_greedy_decoding_of_one_prompt(model, prompts, lambda_mix, side):
    naive, expert = prompts
    generated = mixed_generate(model, naive, expert, lambda_mix=lambda_mix, max_new_tokens=NEW_TOKENS,
                               eos_token_id=[], generator=torch.Generator().manual_seed(0))
    reference_prompts = expert if side == "expert" else naive
    for prompt, tokens in zip(reference_prompts, generated, strict=True):
        assert tokens == _greedy_reference(model, prompt, NEW_TOKENS)
    # The two prompts must actually lead to different continuations, or the test proves nothing.
    other = mixed_generate(model, naive, expert, lambda_mix=1.0 - lambda_mix, max_new_tokens=NEW_TOKENS,
                           eos_token_id=[])
    assert other != generated


def test_every_token_is_the_argmax_of_its_recorded_conditional(model, prompts):
    naive, expert = prompts
    out = mixed_generate(model, naive, expert, lambda_mix=0.5, max_new_tokens=NEW_TOKENS, eos_token_id=[],
                         generator=torch.Generator().manual_seed(1), return_sources=True)
    shares = []
    for x_naive, x_expert, tokens, from_naive in zip(naive, expert, out.sequences, out.from_naive, strict=True):
        assert len(tokens) == NEW_TOKENS
        # Teacher-force the mixed sequence after each prompt: logits at the position before token t are the
        # conditional given the shared prefix y_<t.
        with torch.no_grad():
            naive_logits = model(torch.tensor([x_naive + tokens])).logits[0, len(x_naive) - 1:-1]
            expert_logits = model(torch.tensor([x_expert + tokens])).logits[0, len(x_expert) - 1:-1]
        for t, token in enumerate(tokens):
            source = naive_logits[t] if from_naive[t] else expert_logits[t]
            assert token == source.argmax().item(), f"token {t} is not the argmax of its recorded source"
        shares.append(sum(from_naive) / len(from_naive))
    assert 0 < out.naive_share() < 1
    assert out.naive_share() == pytest.approx(sum(shares) / len(shares))
    # The two conditionals disagree somewhere, so the mixing is doing something.
    assert any(
        (mixed_generate(model, [n], [e], lambda_mix=0.0, max_new_tokens=NEW_TOKENS, eos_token_id=[])[0] != s)
        for n, e, s in zip(naive, expert, out.sequences, strict=True)
    )


def test_coins_follow_the_generator_and_lambda(model, prompts):
    naive, expert = prompts
    out = mixed_generate(model, naive, expert, lambda_mix=0.3, max_new_tokens=NEW_TOKENS, eos_token_id=[],
                         generator=torch.Generator().manual_seed(7), return_sources=True)
    replay = torch.Generator().manual_seed(7)  # sequence i draws its NEW_TOKENS coins after sequence i-1's
    for from_naive in out.from_naive:
        coins = torch.rand(NEW_TOKENS, generator=replay)
        assert from_naive == (coins < 0.3).tolist()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_ragged_batch_equals_one_at_a_time(model, prompts, temperature):
    naive, expert = prompts
    kwargs = dict(lambda_mix=0.5, temperature=temperature, top_k=8, max_new_tokens=NEW_TOKENS)
    # An EOS that sequence 0 produces mid-way: sequences finish at different steps and leave the batch.
    probe = mixed_generate(model, naive[:1], expert[:1], eos_token_id=[],
                           generator=torch.Generator().manual_seed(5), **kwargs)[0]
    eos = probe[3]
    batch = mixed_generate(model, naive, expert, eos_token_id=eos, generator=torch.Generator().manual_seed(5),
                           return_sources=True, **kwargs)
    shared = torch.Generator().manual_seed(5)  # one generator consumed in batch order
    singles = [mixed_generate(model, [n], [e], eos_token_id=eos, generator=shared, return_sources=True, **kwargs)
               for n, e in zip(naive, expert, strict=True)]
    assert batch.sequences == [s.sequences[0] for s in singles]
    assert batch.from_naive == [s.from_naive[0] for s in singles]
    assert batch.sequences[0] == probe[: probe.index(eos) + 1]  # stopped at, and kept, the EOS
    assert len({len(s) for s in batch.sequences}) > 1
    # Per-sequence generators: any batch composition / order gives the same per-sequence result.
    per_seq = [torch.Generator().manual_seed(100 + i) for i in range(len(naive))]
    forward = mixed_generate(model, naive, expert, eos_token_id=eos, generator=per_seq, **kwargs)
    reversed_gens = [torch.Generator().manual_seed(100 + i) for i in reversed(range(len(naive)))]
    backward = mixed_generate(model, naive[::-1], expert[::-1], eos_token_id=eos, generator=reversed_gens, **kwargs)
    assert forward == backward[::-1]


def test_sampling_stays_in_top_k_and_follows_the_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]]).repeat(20000, 1)
    coins = torch.ones(20000)  # never naive: the expert logits decide
    uniforms = torch.rand(20000)
    tokens, from_naive = select_mixed_tokens(torch.zeros_like(logits), logits, coins, uniforms,
                                             lambda_mix=0.3, temperature=0.5, top_k=3)
    assert not from_naive.any()
    assert set(tokens.tolist()) <= {4, 0, 1}  # the top-3 logits only
    expected = torch.softmax(torch.tensor([3.0, 2.0, 1.0]) / 0.5, dim=0)
    observed = torch.stack([(tokens == i).float().mean() for i in (4, 0, 1)])
    assert torch.allclose(observed, expected, atol=0.015)
    greedy, _ = select_mixed_tokens(logits[:2], -logits[:2], torch.tensor([0.1, 0.9]), None,
                                    lambda_mix=0.5, temperature=0.0, top_k=3)
    assert greedy.tolist() == [4, 3]  # naive argmax, then the expert (negated) argmax


def test_bad_arguments_are_rejected(model, prompts):
    naive, expert = prompts
    with pytest.raises(ValueError, match="lambda_mix"):
        mixed_generate(model, naive, expert, lambda_mix=1.5)
    with pytest.raises(ValueError, match="top_k"):
        mixed_generate(model, naive, expert, top_k=0)
    with pytest.raises(ValueError, match="top_k"):
        mixed_generate(model, naive, expert, top_k=10**6)
    with pytest.raises(ValueError, match="expert prompt"):
        mixed_generate(model, naive, expert[:2])
    with pytest.raises(ValueError, match="generator"):
        mixed_generate(model, naive, expert, generator=[torch.Generator()])


def _crc_checker(calls):
    """Accepts about half of all completions, deterministically, and records every call."""
    def checker(text, gold):
        calls.append((gold, text))
        return zlib.crc32(text.encode()) % 2 == 0
    return checker


def test_rejection_sampling_retries_and_drops(model, tokenizer, prompts):
    naive, expert = prompts
    calls = []
    # Many stop ids: most attempts end within a few tokens (cut-off ones fail without asking the checker).
    kwargs = dict(lambda_mix=0.5, temperature=1.0, top_k=16, max_new_tokens=6, max_retries=3,
                  eos_token_id=[tokenizer.eos_token_id] + list(range(0, len(tokenizer), 5)))
    targets = rejection_sample(model, tokenizer, naive, expert, ANSWERS, batch_size=3, seed=11,
                               answer_checker=_crc_checker(calls), **kwargs)
    assert len(targets) == len(ANSWERS)
    for gold, target in zip(ANSWERS, targets, strict=True):
        checked = [text for g, text in calls if g == gold]
        assert len(checked) <= target.attempts  # one checker call per attempt that ended on a stop token
        if target.accepted:
            assert target.finish_reason == "stop" and checked[-1] == target.completion
            assert zlib.crc32(target.completion.encode()) % 2 == 0
            checked = checked[:-1]
        else:
            assert target.attempts == 4  # 1 + max_retries
        assert all(zlib.crc32(t.encode()) % 2 == 1 for t in checked)  # retried only after a failure
        assert 0 <= target.naive_tokens <= target.num_tokens
    assert any(t.attempts > 1 for t in targets), "the checker never rejected anything: the test proves nothing"
    assert any(t.accepted for t in targets), "nothing was accepted: the test proves nothing"
    assert len({text for _, text in calls}) > len(ANSWERS)  # retries drew new coin flips / samples
    # Batch-size invariant: each example draws from its own generator.
    again = rejection_sample(model, tokenizer, naive, expert, ANSWERS, batch_size=1, seed=11,
                             answer_checker=_crc_checker([]), **kwargs)
    assert [t.to_dict() for t in again] == [t.to_dict() for t in targets]
    stats = summarize_targets(targets)
    assert stats["num_dropped"] == sum(not t.accepted for t in targets)
    assert stats["dropped_examples"] == [i for i, t in enumerate(targets) if not t.accepted]
    assert stats["retries_per_example"] == [t.attempts - 1 for t in targets]
    assert summarize_targets(targets, keep_failed=True)["num_dropped"] == 0
    # max_retries=0: one attempt each, and the failures are reported.
    single = rejection_sample(model, tokenizer, naive, expert, ANSWERS, seed=11, answer_checker=lambda t, g: False,
                              **{**kwargs, "max_retries": 0})
    assert [t.attempts for t in single] == [1] * len(ANSWERS)
    assert summarize_targets(single)["num_dropped"] == len(ANSWERS)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_refilled_slots_give_the_fixed_batch_targets(model, tokenizer, prompts, temperature, monkeypatch):
    """Continuous batching (a finished sequence's slot is refilled at once, with a retry or a pending example)
    builds exactly the targets of fixed batches decoded by `mixed_generate`, one round per attempt."""
    import functools

    import trl_sdx.mixsd.continuous as continuous

    merges = []
    original_add = continuous._Slots.add

    def counting_add(self, attempts, *args):
        if self.attempts:  # new rows joining sequences that are mid-way
            merges.append((len(self.attempts), self.mask.shape[1]))
        return original_add(self, attempts, *args)

    monkeypatch.setattr(continuous._Slots, "add", counting_add)
    naive, expert = prompts
    kwargs = dict(lambda_mix=0.5, temperature=temperature, top_k=16, max_new_tokens=12, max_retries=3, seed=5,
                  eos_token_id=[tokenizer.eos_token_id] + list(range(0, len(tokenizer), 4)),
                  answer_checker=_crc_checker([]))
    refilled = rejection_sample(model, tokenizer, naive, expert, ANSWERS, batch_size=2, refill=True, **kwargs)
    fixed = rejection_sample(model, tokenizer, naive, expert, ANSWERS, batch_size=2,
                             decoder=functools.partial(mixed_generate, model, return_sources=True), **kwargs)
    assert [t.to_dict() for t in refilled] == [t.to_dict() for t in fixed]
    assert any(t.attempts > 1 for t in fixed) and len({t.num_tokens for t in fixed}) > 1  # retried, ragged
    assert merges, "no slot was refilled while another sequence was running: the test proves nothing"
