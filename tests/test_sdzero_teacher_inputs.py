"""SD-Zero's teacher input: exact token layout, the loss mask on the second copy of y, and the truncation rule."""

import pytest
import torch

from trl_sdx.sdzero import build_teacher_inputs, control_text, truncated_length
from trl_sdx.sdzero.sdzero_config import CORRECT_PHRASE, INCORRECT_PHRASE
from trl_sdx.testing import make_tiny_model, make_tiny_tokenizer

PAD = 0
EOS = 99


def _batch(prompts, completions):
    """Left-padded prompts and right-padded completions, as DistillationTrainer lays them out."""
    p_width = max(map(len, prompts))
    c_width = max(map(len, completions))
    prompt_ids = torch.tensor([[PAD] * (p_width - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (p_width - len(p)) + [1] * len(p) for p in prompts])
    completion_ids = torch.tensor([c + [PAD] * (c_width - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (c_width - len(c)) for c in completions])
    return prompt_ids, prompt_mask, completion_ids, completion_mask


DELIMS = {1: [71, 72], 0: [81, 82, 83]}


def _row(ids, mask):
    return ids[mask.bool()].tolist()


def test_hand_built_example_is_the_exact_concatenation():
    x0, y0 = [1, 2, 3], [10, 11, 12, EOS]  # finished answer, graded wrong
    x1, y1 = [4, 5], [20, 21]  # cut by max_completion_length, graded right
    out = build_teacher_inputs(*_batch([x0, x1], [y0, y1]), torch.tensor([0, 1]), DELIMS, None,
                               pad_token_id=PAD, eos_token_ids=[EOS])

    # The spec's layout: chat(x) ids + y ids + ids(delim(P_r)) + y ids, y with its EOS in both copies
    assert _row(out.input_ids[0], out.attention_mask[0]) == x0 + y0 + DELIMS[0] + y0
    assert _row(out.input_ids[1], out.attention_mask[1]) == x1 + y1 + DELIMS[1] + y1
    # padding: prefixes left-padded to one width, the second copy occupies the last T = 4 columns
    prefix_width = out.input_ids.shape[1] - 4
    assert out.input_ids[1].tolist() == [PAD] * (prefix_width - 6) + x1 + y1 + DELIMS[1] + y1 + [PAD, PAD]
    # loss mask = exactly the second copy of y, in the student's completion positions
    assert out.loss_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    for i, y in enumerate([y0, y1]):
        assert out.input_ids[i][out.second_copy_mask[i]].tolist() == y
        assert out.second_copy_mask[i].nonzero().flatten().tolist() == list(range(prefix_width, prefix_width + len(y)))
    assert out.truncated.tolist() == [False, False]
    assert out.sample_weight.tolist() == [1.0, 1.0]
    assert out.completion_lengths.tolist() == [4, 2]


def test_dropping_eos_from_the_first_copy_matches_phase_1_text():
    x, y = [1, 2], [10, EOS]
    out = build_teacher_inputs(*_batch([x], [y]), [1], DELIMS, None, pad_token_id=PAD, eos_token_ids=[EOS],
                               keep_eos_in_first_copy=False)
    assert _row(out.input_ids[0], out.attention_mask[0]) == x + [10] + DELIMS[1] + y


@pytest.mark.parametrize(
    "x, y, d, max_length, expected",
    [
        (10, 5, 4, None, 5),  # no limit
        (10, 5, 4, 24, 5),  # |x| + 2|y| + |d| == max: fits
        (10, 5, 4, 23, 4),  # one over: (23 - 10 - 4) // 2 = 4
        (10, 50, 4, 30, 8),  # (30 - 14) // 2
        (10, 5, 4, 15, 0),  # (15 - 14) // 2 = 0 -> zero weight
        (20, 5, 4, 10, 0),  # negative -> zero weight
    ],
)
def test_truncation_rule(x, y, d, max_length, expected):
    assert truncated_length(x, y, d, max_length) == expected


def test_truncation_cuts_both_copies_and_zero_weight_samples_score_nothing():
    x0, y0 = [1, 2, 3], [10, 11, 12, 13, 14, EOS]  # 3 + 12 + 2 = 17 > 12 -> |y'| = (12 - 3 - 2) // 2 = 3
    x1, y1 = list(range(30, 41)), [20, 21]  # 11 + 2 > 12 -> (12 - 11 - 2) // 2 < 0 -> weight 0
    x2, y2 = [5], [15, EOS]  # 1 + 4 + 2 = 7 <= 12 -> whole
    out = build_teacher_inputs(*_batch([x0, x1, x2], [y0, y1, y2]), [1, 1, 1], DELIMS, 12, pad_token_id=PAD,
                               eos_token_ids=[EOS])
    assert _row(out.input_ids[0], out.attention_mask[0]) == x0 + [10, 11, 12] + DELIMS[1] + [10, 11, 12]
    assert out.loss_mask[0].tolist() == [1, 1, 1, 0, 0, 0]
    assert out.input_ids[0][out.second_copy_mask[0]].tolist() == [10, 11, 12]
    assert out.attention_mask[0].sum() <= 12
    assert out.loss_mask[1].sum() == 0 and out.sample_weight[1] == 0 and not out.second_copy_mask[1].any()
    assert _row(out.input_ids[1], out.attention_mask[1]) == x1  # prompt only: nothing of it is scored
    assert _row(out.input_ids[2], out.attention_mask[2]) == x2 + y2 + DELIMS[1] + y2
    assert out.truncated.tolist() == [True, True, False]
    assert out.sample_weight.tolist() == [1.0, 0.0, 1.0]


def test_rewards_must_be_binary():
    with pytest.raises(ValueError, match="binary"):
        build_teacher_inputs(*_batch([[1]], [[2]]), [2], DELIMS, None, pad_token_id=PAD)


def test_control_text_and_default_phrases():
    assert control_text("P") == "\n\nP\n\n"
    assert CORRECT_PHRASE == "Let me rephrase the above solution."
    assert INCORRECT_PHRASE == "Wait, this response is wrong. Let me correct it."


def test_batched_teacher_logits_match_the_unpadded_sequence():
    """The index map holds through padding: with `logits_to_keep = T`, column t of the padded teacher batch is the
    teacher's prediction of y_t in the second copy of the single, unpadded sequence."""
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer, seed=3).eval()
    eos = tokenizer.eos_token_id
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for c in ("What is 2 + 3?", "Hi")]
    ys = [tokenizer("So 5. \\boxed{5}", add_special_tokens=False)["input_ids"] + [eos],
          tokenizer("7", add_special_tokens=False)["input_ids"]]
    delims = {r: tokenizer(control_text(p), add_special_tokens=False)["input_ids"]
              for r, p in ((1, CORRECT_PHRASE), (0, INCORRECT_PHRASE))}
    batch = _batch(chat, ys)
    out = build_teacher_inputs(*batch, [1, 0], delims, None, pad_token_id=tokenizer.pad_token_id,
                               eos_token_ids=[eos])
    width = batch[2].shape[1]
    with torch.no_grad():
        logits = model(input_ids=out.input_ids, attention_mask=out.attention_mask).logits[:, :-1][:, -width:]
        for i, (x, y, r) in enumerate(zip(chat, ys, [1, 0])):
            single = torch.tensor([x + y + delims[r] + y])  # the spec's layout: y (with its EOS) twice
            expected = model(input_ids=single).logits[0, -len(y) - 1 : -1]
            torch.testing.assert_close(logits[i, : len(y)], expected, atol=1e-5, rtol=1e-4)
