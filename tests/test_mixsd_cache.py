"""The MixSD target cache key: each ingredient the targets depend on invalidates it; weights are hashed exactly."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from datasets import Dataset

import trl_sdx.mixsd.cache as cache_module
import trl_sdx.mixsd.targets as targets_module
from trl_sdx.mixsd import MixSDConfig, build_mixsd_targets
from trl_sdx.mixsd.cache import cache_key, model_fingerprint
from trl_sdx.mixsd.targets import target_cache_inputs
from trl_sdx.testing import make_tiny_model, make_tiny_tokenizer

QUESTIONS = ["What is 12 + 7?", "What is 3 + 5?"]
ANSWERS = ["\\boxed{19}", "\\boxed{8}"]


def accept_all(text, gold):
    return True


def _args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_new_tokens=4,
                  max_retries=0, disable_tqdm=True)
    return MixSDConfig(**{**kwargs, **overrides})


def _key(model, tokenizer, args, checker=accept_all):
    return cache_key(target_cache_inputs(model, tokenizer, QUESTIONS, ANSWERS, args, checker))


def _same_name(fn):
    fn.__module__, fn.__qualname__ = accept_all.__module__, accept_all.__qualname__
    return fn


def test_every_ingredient_changes_the_key(tmp_path, monkeypatch):
    tokenizer, args = make_tiny_tokenizer(), _args(tmp_path)
    model = make_tiny_model(tokenizer, seed=0)
    base = _key(model, tokenizer, args)
    assert _key(make_tiny_model(tokenizer, seed=0), tokenizer, args) == base  # deterministic: same inputs, same key

    changed = {}
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight[3, 5] += 1e-3  # one weight
    changed["weights"] = _key(other, tokenizer, args)
    changed["dtype"] = _key(copy.deepcopy(model).to(torch.bfloat16), tokenizer, args)
    other = copy.deepcopy(model)
    other.config._attn_implementation = "eager"
    changed["attn_implementation"] = _key(other, tokenizer, args)
    other = copy.deepcopy(model)
    other.generation_config.eos_token_id = [tokenizer.eos_token_id, 5]
    changed["generation eos"] = _key(other, tokenizer, args)
    changed["chat_template_kwargs"] = _key(model, tokenizer, _args(tmp_path, chat_template_kwargs={"x": 1}))
    swapped = make_tiny_tokenizer()  # same size, two tokens' ids exchanged
    vocab = swapped.get_vocab()
    a, b = "a", "b"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    monkeypatch.setattr(swapped, "get_vocab", lambda: vocab)
    changed["vocabulary"] = _key(model, swapped, args)

    def edited(text, gold):  # same name as accept_all, other body
        return len(text) > 0
    changed["checker body"] = _key(model, tokenizer, args, _same_name(edited))

    def make_checker(flag):
        def checker(text, gold):
            return flag
        return checker
    changed["checker closure"] = _key(model, tokenizer, args, make_checker(False))
    assert _key(model, tokenizer, args, make_checker(True)) == _key(model, tokenizer, args, make_checker(True))
    for name, value in [("lambda_mix", 0.4), ("temperature", 0.7), ("top_k", 8), ("max_new_tokens", 5),
                        ("max_retries", 1), ("mixsd_seed", 1), ("prompt_template", "reasoning")]:
        changed[name] = _key(model, tokenizer, _args(tmp_path, **{name: value}))
    monkeypatch.setattr(cache_module, "TARGETS_CODE_VERSION", "next")
    changed["code version"] = _key(model, tokenizer, args)

    same = [name for name, key in changed.items() if key == base]
    assert not same, f"these changes did not invalidate the cache: {same}"
    assert len(set(changed.values())) == len(changed)


def test_weights_are_hashed_exactly_in_chunks_without_float64_copies(monkeypatch):
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer).to(torch.bfloat16)

    def no_double(*args, **kwargs):
        raise AssertionError("the fingerprint must not copy weights to float64")

    monkeypatch.setattr(torch.Tensor, "double", no_double)
    whole = model_fingerprint(model)
    monkeypatch.setattr(cache_module, "_CHUNK_BYTES", 100)  # many chunks per tensor
    assert model_fingerprint(model) == whole
    # Each tensor's digest is the sha256 of its raw bytes (computed here independently, in one piece).
    weight = model.model.embed_tokens.weight
    expected = hashlib.sha256(weight.detach().view(torch.int16).numpy().tobytes()).hexdigest()
    assert cache_module._tensor_digest(weight) == expected


def test_only_the_main_process_writes_and_a_racing_writer_keeps_the_first_entry(tmp_path):
    from trl_sdx.mixsd.rejection import MixedTarget

    targets = [MixedTarget([1, 2], "a", True, 1, 1)]
    metadata = {"stats": {"num_examples": 1}, "writer": "first"}
    entry = cache_module.save_targets(tmp_path / "key", targets, metadata)
    again = cache_module.save_targets(tmp_path / "key", targets, {**metadata, "writer": "second"})
    assert again == entry and json.loads((entry / "metadata.json").read_text())["writer"] == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]  # no temporary folders left behind
    (entry / "targets.jsonl").write_text("")  # a truncated entry is replaced
    cache_module.save_targets(tmp_path / "key", targets, {**metadata, "writer": "third"})
    assert json.loads((entry / "metadata.json").read_text())["writer"] == "third"


def test_sharded_weights_are_refused_and_a_prebuilt_entry_is_used(tmp_path, monkeypatch):
    tokenizer = make_tiny_tokenizer()
    dataset = Dataset.from_dict({"question": QUESTIONS, "answer": ANSWERS})
    model = make_tiny_model(tokenizer)
    model.generation_config.eos_token_id = list(range(len(tokenizer)))
    built = build_mixsd_targets(model, tokenizer, dataset, _args(tmp_path), answer_checker=accept_all)

    meta = make_tiny_model(tokenizer)
    meta.lm_head.weight = torch.nn.Parameter(torch.empty_like(meta.lm_head.weight, device="meta"))
    with pytest.raises(ValueError, match="sharded.*mixsd_targets_path"):
        build_mixsd_targets(meta, tokenizer, dataset, _args(tmp_path), answer_checker=accept_all)

    monkeypatch.setattr(targets_module, "rejection_sample", None)  # nothing may be decoded
    prebuilt = build_mixsd_targets(meta, tokenizer, dataset, _args(tmp_path, mixsd_targets_path=built.cache_entry))
    assert [t.to_dict() for t in prebuilt.targets] == [t.to_dict() for t in built.targets] and prebuilt.from_cache
    with pytest.raises(ValueError, match="lambda_mix"):
        build_mixsd_targets(meta, tokenizer, dataset,
                            _args(tmp_path, mixsd_targets_path=built.cache_entry, lambda_mix=0.9))
