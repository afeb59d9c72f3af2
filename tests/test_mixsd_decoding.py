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


LAYOUTS = ["shared", "split"]  # one cache of 2B rows at the expert width / a cache per side at its own width


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


@pytest.mark.parametrize("cache_layout", LAYOUTS)
def test_every_token_is_the_argmax_of_its_recorded_conditional(model, prompts, cache_layout):
    naive, expert = prompts
    out = mixed_generate(model, naive, expert, lambda_mix=0.5, max_new_tokens=NEW_TOKENS, eos_token_id=[],
                         generator=torch.Generator().manual_seed(1), return_sources=True, cache_layout=cache_layout)
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


@pytest.mark.parametrize("temperature, cache_layout, sync_every",
                         [(0.0, "shared", 1), (1.0, "shared", 16), (0.0, "split", 3), (1.0, "split", 1)])
def test_ragged_batch_equals_one_at_a_time(model, prompts, temperature, cache_layout, sync_every):
    """Sequences stop at different steps; a batch gives each the tokens it gets alone, whatever the cache layout
    and however often the host checks for finished sequences (the singles check every step, in one cache)."""
    naive, expert = prompts
    kwargs = dict(lambda_mix=0.5, temperature=temperature, top_k=8, max_new_tokens=NEW_TOKENS)
    # An EOS that sequence 0 produces mid-way: sequences finish at different steps and leave the batch.
    probe = mixed_generate(model, naive[:1], expert[:1], eos_token_id=[],
                           generator=torch.Generator().manual_seed(5), **kwargs)[0]
    eos = probe[3]
    batch = mixed_generate(model, naive, expert, eos_token_id=eos, generator=torch.Generator().manual_seed(5),
                           return_sources=True, cache_layout=cache_layout, sync_every=sync_every, **kwargs)
    shared = torch.Generator().manual_seed(5)  # one generator consumed in batch order
    singles = [mixed_generate(model, [n], [e], eos_token_id=eos, generator=shared, return_sources=True,
                              cache_layout="shared", sync_every=1, **kwargs)
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
    with pytest.raises(ValueError, match="cache_layout"):
        mixed_generate(model, naive, expert, cache_layout="packed")
    with pytest.raises(ValueError, match="sync_every"):
        mixed_generate(model, naive, expert, sync_every=0)


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


def _decode_step_widths(model, run):
    """Run `run()` and return, per KV cache that took one-token (decode-step) forwards, (rows, cache width at its
    first decode step)."""
    first = {}

    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if kwargs["input_ids"].shape[1] == 1 and id(cache) not in first:
            first[id(cache)] = (kwargs["input_ids"].shape[0], cache.get_seq_length())

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return sorted(first.values())


def test_split_layout_keeps_the_naive_cache_at_the_naive_width(model, prompts):
    """`split`: the naive rows' cache is as wide as the longest naive prompt (not the expert one), the expert rows'
    as wide as the longest expert prompt; `shared`: one cache of 2B rows, at least the expert width (plus the naive
    remainder's columns, computed after the shared prefix). Same tokens."""
    naive, expert = prompts
    batch, width_n, width_e = len(naive), max(map(len, naive)), max(map(len, expert))
    assert width_e > width_n
    outputs = {}
    kwargs = dict(lambda_mix=0.5, max_new_tokens=4, eos_token_id=[])
    for layout in LAYOUTS:
        widths = _decode_step_widths(model, lambda: outputs.__setitem__(layout, mixed_generate(
            model, naive, expert, cache_layout=layout, generator=torch.Generator().manual_seed(4), **kwargs)))
        if layout == "split":
            assert widths == [(batch, width_n), (batch, width_e)]
        else:
            assert len(widths) == 1 and widths[0][0] == 2 * batch and widths[0][1] >= width_e
    assert outputs["split"] == outputs["shared"]


def test_auto_layout_splits_when_the_wasted_kv_outweighs_the_weights(model, prompts):
    """The rule: split iff B · (W⁺ − W⁻) · (KV bytes per token) ≥ bytes of the weights, from the config's sizes."""
    from trl_sdx.mixsd.decode_cache import choose_cache_layout

    naive, expert = prompts
    config = model.config
    kv_bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4  # fp32
    weights = 4 * sum(p.numel() for p in model.parameters())
    width_n = max(map(len, naive))
    # The longest expert prompt that keeps `shared`, and one token more.
    last_shared = width_n + (weights - 1) // (len(naive) * kv_bytes_per_token)
    assert last_shared > max(map(len, expert))  # the test prompts are `shared` ...
    assert choose_cache_layout(model, naive, expert) == "shared"
    longer = [list(e) + [5] * (last_shared - len(e)) for e in expert]
    assert choose_cache_layout(model, naive, longer) == "shared"
    longer[0] = longer[0] + [5]  # ... and one more column of waste per naive row tips it
    assert choose_cache_layout(model, naive, longer) == "split"
    assert choose_cache_layout(model, naive, longer, "shared") == "shared"


HOST_READS = ("__bool__", "item", "tolist", "__int__", "__float__", "cpu", "numpy")


def _count_host_reads_by_trl_sdx(run) -> int:
    """Device-to-host reads (`bool()`, `.item()`, `.tolist()`, `int()`, `float()`, `.cpu()`, `.numpy()`) that
    trl_sdx's own code makes while `run()` runs (those inside transformers' forward are not ours to remove)."""
    import sys

    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    count = 0

    def counting(name):
        def method(self, *args, **kwargs):
            nonlocal count
            if "trl_sdx" in sys._getframe(1).f_code.co_filename:
                count += 1
            return saved[name](self, *args, **kwargs)
        return method

    for name in HOST_READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        run()
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
    return count


@pytest.mark.parametrize("cache_layout", LAYOUTS)
def test_the_host_reads_the_device_every_k_steps_not_every_step(model, prompts, cache_layout):
    """One read of "who has finished" per `sync_every` steps and one of the tokens at the end; the tokens equal
    those of checking every step."""
    naive, expert = prompts
    steps = 24
    kwargs = dict(lambda_mix=0.5, max_new_tokens=steps, cache_layout=cache_layout)
    probe = mixed_generate(model, naive[:1], expert[:1], eos_token_id=[], generator=torch.Generator().manual_seed(2),
                           **kwargs)[0]
    eos = probe[5]  # sequence 0 ends mid-way, so the batch does shrink at a check
    outputs = {}

    def run(k):
        outputs[k] = mixed_generate(model, naive, expert, eos_token_id=eos, sync_every=k,
                                    generator=torch.Generator().manual_seed(2), **kwargs)

    reads_k8 = _count_host_reads_by_trl_sdx(lambda: run(8))
    reads_every = _count_host_reads_by_trl_sdx(lambda: run(1))
    assert outputs[8] == outputs[1]
    assert outputs[8][0] == probe[:probe.index(eos) + 1] and len({len(s) for s in outputs[8]}) > 1
    assert reads_every >= steps - 1  # the counter sees the per-step check: it can fail
    assert reads_k8 <= steps // 8 + 1, f"{reads_k8} host reads in {steps} steps with sync_every=8"
