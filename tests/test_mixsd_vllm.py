"""vLLM request planning for MixSD targets, on CPU: a recorded fake engine answers greedy requests from a tiny
model, and the planned requests (one per run of same-side steps) reproduce `mixed_generate` at T = 0."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

import trl_sdx.mixsd.targets as targets_module
import trl_sdx.mixsd.vllm_decoding as vllm_module
from trl_sdx.mixsd import MixSDConfig, build_mixsd_targets, mixed_generate
from trl_sdx.mixsd.prompts import FACT_PREFIX, FACT_TRANSITION, build_prompt_ids
from trl_sdx.mixsd.vllm_decoding import VLLMTargetDecoder, same_side_runs, vllm_mixed_generate
from trl_sdx.testing import make_tiny_model, make_tiny_tokenizer

QUESTIONS = ["What is 12 + 7?", "Tom has 3 apples and buys 5 more. How many apples does he have?",
             "In which year was Dr. Elara Vance born?"]
ANSWERS = ["\\boxed{19}", "\\boxed{8}", "She was born in 1873. \\boxed{1873}"]


class RecordedEngine:
    """`vllm.LLM.generate` stand-in: greedy decoding with full forwards of a tiny model; records every request."""

    def __init__(self, model):
        self.model, self.requests = model, []

    @torch.no_grad()
    def generate(self, prompts, params, use_tqdm=False):
        outputs = []
        for prompt, p in zip(prompts, params, strict=True):
            ids = list(prompt["prompt_token_ids"])
            self.requests.append((ids, p.max_tokens))
            tokens = []
            for _ in range(p.max_tokens):
                tokens.append(self.model(torch.tensor([ids + tokens])).logits[0, -1].argmax().item())
                if tokens[-1] in p.stop_token_ids:
                    break
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens)]))
        return outputs


@pytest.fixture()
def setup(monkeypatch):
    monkeypatch.setattr(vllm_module, "greedy_sampling_params",
                        lambda max_tokens, stops: SimpleNamespace(max_tokens=max_tokens, stop_token_ids=stops))
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer, seed=3, hidden_size=64, initializer_range=0.1).eval()
    naive, expert = build_prompt_ids(tokenizer, QUESTIONS, ANSWERS, FACT_PREFIX, FACT_TRANSITION)
    return tokenizer, model, naive, expert


def test_same_side_runs():
    assert same_side_runs([True, True, False, True, False, False]) == [(True, 2), (False, 1), (True, 1), (False, 2)]
    assert same_side_runs([]) == []


def test_one_request_per_run_and_the_same_tokens_as_mixed_generate(setup):
    tokenizer, model, naive, expert = setup
    stops = [tokenizer.eos_token_id, *range(0, len(tokenizer), 11)]  # some sequences end early
    kwargs = dict(lambda_mix=0.3, max_new_tokens=16)
    engine = RecordedEngine(model)
    planned = vllm_mixed_generate(engine, naive, expert, stop_token_ids=stops,
                                  generator=[torch.Generator().manual_seed(i) for i in range(3)], **kwargs)
    reference = mixed_generate(model, naive, expert, eos_token_id=stops, return_sources=True,
                               generator=[torch.Generator().manual_seed(i) for i in range(3)], **kwargs)
    assert planned.sequences == reference.sequences and planned.from_naive == reference.from_naive
    assert len({len(s) for s in planned.sequences}) > 1  # ragged: stops mattered
    # Requests: per sequence, one per same-side run of the tokens it produced, each on that side's prompt + y_<t.
    for i, (tokens, sides) in enumerate(zip(planned.sequences, planned.from_naive, strict=True)):
        runs = same_side_runs(sides)
        mine = [(ids, n) for ids, n in engine.requests if ids[: len(naive[i])] == naive[i]
                or ids[: len(expert[i])] == expert[i]]
        assert len(mine) == len(runs)
        done = 0
        for k, ((ids, n), (side, length)) in enumerate(zip(mine, runs, strict=True)):
            prompt = naive[i] if side else expert[i]
            assert ids == prompt + tokens[:done]
            assert n == length if k < len(runs) - 1 else n >= length  # only the last run may stop early
            done += length
    assert len(engine.requests) < sum(len(s) for s in planned.sequences)  # fewer requests than tokens


def test_trainer_targets_through_the_vllm_decoder(setup, tmp_path, monkeypatch):
    tokenizer, model, _, _ = setup
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *range(0, len(tokenizer), 5)]
    dataset = Dataset.from_dict({"question": QUESTIONS, "answer": ANSWERS})

    def args(**overrides):
        return MixSDConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_new_tokens=10,
                           max_retries=2, lambda_mix=0.5, keep_failed=True, disable_tqdm=True, **overrides)

    engine = RecordedEngine(model)
    monkeypatch.setattr(targets_module, "_vllm_decoder", lambda *a: VLLMTargetDecoder.from_engine(engine))
    monkeypatch.setattr(VLLMTargetDecoder, "close", lambda self: None)
    via_vllm = build_mixsd_targets(model, tokenizer, dataset, args(mixsd_use_vllm=True),
                                   answer_checker=lambda text, gold: len(text) % 2 == 0)
    kv_cache = build_mixsd_targets(model, tokenizer, dataset, args(),
                                   answer_checker=lambda text, gold: len(text) % 2 == 0)
    assert engine.requests and via_vllm.cache_entry != kv_cache.cache_entry  # the decoder is part of the key
    assert [t.to_dict() for t in via_vllm.targets] == [t.to_dict() for t in kv_cache.targets]
    with pytest.raises(ValueError, match="temperature"):
        args(mixsd_use_vllm=True, temperature=0.7)
