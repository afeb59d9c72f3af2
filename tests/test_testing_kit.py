import time

import torch

from trl_sdx.testing import make_student_teacher, make_tiny_model, make_tiny_tokenizer, save_tiny_pair


def test_tokenizer_has_pad_eos_and_chat_templates():
    tok = make_tiny_tokenizer()
    assert tok.pad_token == "<pad>" and tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id != tok.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    # Byte-level: arbitrary text round-trips.
    sample = "Zorbania ✓ \\boxed{3/4} 1,000"
    assert tok.decode(tok(sample)["input_ids"]) == sample


def test_generation_markers_give_assistant_mask():
    tok = make_tiny_tokenizer()
    out = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\boxed{5}"}],
        tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
    )
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == "\\boxed{5}<|im_end|>"


def test_student_and_teacher_share_vocab_and_differ_in_size():
    tok, student, teacher = make_student_teacher(seed=0)
    assert student.config.vocab_size == teacher.config.vocab_size == len(tok)
    assert teacher.config.hidden_size > student.config.hidden_size
    n_s = sum(p.numel() for p in student.parameters())
    n_t = sum(p.numel() for p in teacher.parameters())
    assert n_t > 2 * n_s


def test_deterministic_under_seed_and_fast():
    start = time.perf_counter()
    tok = make_tiny_tokenizer()
    a, b, c = make_tiny_model(tok, seed=3), make_tiny_model(tok, seed=3), make_tiny_model(tok, seed=4)
    elapsed = time.perf_counter() - start
    ids = torch.tensor([[1, 5, 9, 11]])
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert not torch.equal(a(ids).logits, c(ids).logits)
    assert elapsed < 10  # the kit's budget is ~2 s; generous bound against a loaded CI machine


def test_save_tiny_pair_roundtrip(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s_path, t_path = save_tiny_pair(tmp_path)
    tok = AutoTokenizer.from_pretrained(s_path)
    assert tok.chat_template and tok.pad_token == "<pad>"
    teacher = AutoModelForCausalLM.from_pretrained(t_path)
    assert teacher.config.hidden_size == 64
