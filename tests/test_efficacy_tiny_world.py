"""The efficacy benchmarks' in-process base models: the tokenizer learns the task's corpus, pre-training learns the
assistant turns (and only those)."""

import torch
from efficacy_modules import efficacy_module

from trl_sdx.testing import make_tiny_model

tiny_world = efficacy_module("tiny_world")

CHATS = [[{"role": "user", "content": f"code {name}?"}, {"role": "assistant", "content": f"\\boxed{{{answer}}}"}]
         for name, answer in [("alpha", "17"), ("beta", "42"), ("gamma", "5"), ("delta", "88")]]


def test_assistant_mask_covers_the_answer_and_end_of_turn_only():
    tokenizer = tiny_world.train_chat_tokenizer([c[0]["content"] + c[1]["content"] for c in CHATS], vocab_size=300)
    (ids, mask), *_ = tiny_world.encode_chats(tokenizer, CHATS[:1])
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert trained == "\\boxed{17}<|im_end|>"  # not the user turn, not the generation prompt


def test_pretraining_learns_each_answer_from_its_question():
    tokenizer = tiny_world.train_chat_tokenizer([c[0]["content"] + c[1]["content"] for c in CHATS], vocab_size=300)
    model = make_tiny_model(tokenizer, hidden_size=64, num_layers=2)
    losses = tiny_world.pretrain_on_chats(model, tokenizer, CHATS, steps=150, lr=3e-3, batch_size=8, seed=0)
    assert losses[-1] < 0.05 < losses[0]
    for chat in CHATS:
        prompt = tokenizer.apply_chat_template(chat[:1], add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
        completion = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        assert completion == chat[1]["content"]
