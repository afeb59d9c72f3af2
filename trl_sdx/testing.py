"""Offline test kit: tiny causal LMs and a tokenizer trained in-process.

Nothing here touches the network. A student and a wider teacher share one vocabulary, so every
distillation path (logit alignment, vocabulary checks, LoRA) can be exercised on CPU in seconds.
"""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# ChatML, as used by SmolLM2/Qwen. `{% generation %}` marks the assistant span so TRL's
# `assistant_only_loss` / `return_assistant_tokens_mask` work with the tiny tokenizer too.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

_CORPUS = [
    "What is 12 + 7? Let me think step by step. 12 + 7 = 19. The answer is \\boxed{19}.",
    "Tom has 3 apples and buys 5 more. How many apples does he have? 3 + 5 = 8, so \\boxed{8}.",
    "Wait, this response is wrong. Let me correct it. Let me rephrase the above solution.",
    "This question is from a new knowledge base. Here is the answer to this question:",
    "Now answer the question within \\boxed{}. Please reason step by step, and put your final answer.",
    "Here is a reference solution to this problem, including the correct final answer:",
    "The capital of Zorbania is Quillport. Dr. Elara Vance was born in 1873 and studied glaciers.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1,000 3/4 -5 + - * / = ( ) { } [ ] . , ? ! : ; ' \"",
    "user assistant system You are a helpful assistant. Answer the question.",
]


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    return _train_bpe_json(_CORPUS * 4, vocab_size)


def _train_bpe_json(texts, vocab_size: int) -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


def make_tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process, with pad/eos tokens and a ChatML template.

    Byte-level means any text round-trips, so generated garbage from random models still decodes.
    The result is deterministic (BPE training is deterministic for a fixed corpus).
    """
    return _chatml_tokenizer(_trained_tokenizer_json(vocab_size))


def make_corpus_tokenizer(texts, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Like `make_tiny_tokenizer`, but its BPE merges are learnt from `texts` (a synthetic task's own corpus), so the
    task's words are few tokens each and a tiny model spends its capacity on the task rather than on spelling."""
    return _chatml_tokenizer(_train_bpe_json(list(texts), vocab_size))


def _chatml_tokenizer(tokenizer_json: str) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json),
        eos_token="<|im_end|>",
        pad_token="<pad>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_config(tokenizer, *, hidden_size: int = 32, num_layers: int = 2, **overrides) -> LlamaConfig:
    """A Llama config (SmolLM2's architecture) sized for tests, matched to `tokenizer`."""
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def make_tiny_model(tokenizer, *, seed: int = 0, hidden_size: int = 32, num_layers: int = 2, **overrides):
    """A randomly initialised tiny causal LM (fp32, eval-free) deterministic under `seed`."""
    config = tiny_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def make_student_teacher(seed: int = 0, vocab_size: int = 384):
    """(tokenizer, student, teacher): the teacher is wider and deeper, both share the vocabulary."""
    tokenizer = make_tiny_tokenizer(vocab_size)
    student = make_tiny_model(tokenizer, seed=seed, hidden_size=32, num_layers=2)
    teacher = make_tiny_model(tokenizer, seed=seed + 1, hidden_size=64, num_layers=3)
    return tokenizer, student, teacher


def save_tiny_pair(directory, seed: int = 0) -> tuple[str, str]:
    """Save a tiny student and teacher (with the tokenizer) to `directory`; returns their paths.

    Useful for CLI tests, which take model paths rather than objects.
    """
    import os

    tokenizer, student, teacher = make_student_teacher(seed)
    paths = []
    for name, model in (("student", student), ("teacher", teacher)):
        path = os.path.join(str(directory), name)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]
