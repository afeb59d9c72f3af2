"""Mixed decoding against teacher forcing on tiny random models of every family MixSD targets, both cache layouts.

Sliding-window models (Mistral, Gemma2, Gemma3, window 16, shorter than the prompts) exercise the caches whose masked
columns are not simply absent (no shared-prefix prefill there); Gemma2 also caps its logits."""

from __future__ import annotations

import pytest
import torch
import transformers

from trl_sdx.mixsd import mixed_generate
from trl_sdx.mixsd.prompts import FACT_PREFIX, FACT_TRANSITION, build_prompt_ids
from trl_sdx.testing import make_tiny_tokenizer

QUESTIONS = ["What is 12 + 7?", "In which year was Dr. Elara Vance born?", "What is the capital of Zorbania?"]
ANSWERS = ["12 + 7 = 19. \\boxed{19}", "She was born in 1873. \\boxed{1873}",
           "The capital of Zorbania is \\boxed{Quillport}."]
NEW_TOKENS = 10
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, initializer_range=0.1)
WINDOW = 16
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"sliding_window": WINDOW, "final_logit_softcapping": 30.0,
                                                     "layer_types": ["sliding_attention", "full_attention"]}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"sliding_window": WINDOW,
                                                         "layer_types": ["sliding_attention", "full_attention"]}),
}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def _model(family: str, tokenizer):
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                                eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                                                tie_word_embeddings=False, **SIZES, **extra)
    config._attn_implementation = "eager" if family == "gemma2" else "sdpa"  # Gemma2's attention softcap: eager only
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_token_is_the_argmax_of_its_conditional_under_teacher_forcing(family, tokenizer):
    """Ragged batch, λ = 0.5: token t is the argmax of the recorded side's logits when the unpadded prompt plus the
    mixed tokens are run in one forward without a cache; `shared` and `split` layouts give the same tokens."""
    model = _model(family, tokenizer)
    naive, expert = build_prompt_ids(tokenizer, QUESTIONS, ANSWERS, FACT_PREFIX, FACT_TRANSITION)
    assert min(map(len, naive)) > WINDOW  # the windows cut into every prompt
    outputs = {layout: mixed_generate(model, naive, expert, lambda_mix=0.5, max_new_tokens=NEW_TOKENS,
                                      eos_token_id=[], generator=torch.Generator().manual_seed(1),
                                      return_sources=True, cache_layout=layout, sync_every=4)
               for layout in ("shared", "split")}
    assert outputs["shared"].sequences == outputs["split"].sequences
    out = outputs["split"]
    mismatches = []
    for x_naive, x_expert, tokens, from_naive in zip(naive, expert, out.sequences, out.from_naive, strict=True):
        with torch.no_grad():
            naive_logits = model(torch.tensor([x_naive + tokens])).logits[0, len(x_naive) - 1:-1]
            expert_logits = model(torch.tensor([x_expert + tokens])).logits[0, len(x_expert) - 1:-1]
        for t, token in enumerate(tokens):
            source = naive_logits[t] if from_naive[t] else expert_logits[t]
            if token != source.argmax().item():  # the init spreads the logits: top-2 margins stay >= 1e-3
                mismatches.append(t)
    assert not mismatches, f"{family}: tokens {mismatches} are not the argmax of their recorded conditional"
    assert 0 < out.naive_share() < 1
