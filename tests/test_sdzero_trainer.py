"""SDZeroTrainer: construction errors, a few steps with each teacher option, teacher sync, fused == plain."""

import copy
import json
import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from trl_sdx.data import make_arithmetic_dataset
from trl_sdx.sdzero import SDZeroConfig, SDZeroTrainer, control_text, truncated_length
from trl_sdx.testing import make_student_teacher, make_tiny_model, make_tiny_tokenizer


def parity_reward(completions, answer, **kwargs):
    """A gradeable signal from a random tiny model: about half of the completions count as correct."""
    return [float(len(c[0]["content"]) % 2) for c in completions]


def _args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, max_completion_length=8,
                  bf16=False, use_cpu=True, report_to="none", logging_steps=1, save_strategy="no", seed=0)
    kwargs.update(overrides)
    return SDZeroConfig(**kwargs)


def _lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


@pytest.fixture
def pair():
    return make_student_teacher(seed=0)


@pytest.fixture(scope="module")
def dataset():
    return make_arithmetic_dataset(8)


# ------------------------------------------------------------------------------------------------ construction errors
def test_dataset_without_answer_column_is_rejected_for_the_default_reward(tmp_path, pair):
    tokenizer, student, teacher = pair
    no_answer = Dataset.from_dict({"prompt": [[{"role": "user", "content": "1 + 1?"}]]})
    with pytest.raises(ValueError, match="answer"):
        SDZeroTrainer(student, teacher, args=_args(tmp_path), train_dataset=no_answer, processing_class=tokenizer)


def test_dataset_without_prompt_column_is_rejected(tmp_path, pair):
    tokenizer, student, teacher = pair
    bad = Dataset.from_dict({"question": ["1 + 1?"], "answer": ["2"]})
    with pytest.raises(ValueError, match="prompt"):
        SDZeroTrainer(student, teacher, args=_args(tmp_path), train_dataset=bad, processing_class=tokenizer)


def test_tokenizer_without_chat_template_is_rejected(tmp_path, pair, dataset):
    tokenizer, student, teacher = pair
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        SDZeroTrainer(student, teacher, args=_args(tmp_path), train_dataset=dataset, processing_class=tokenizer)


def test_teacher_with_another_vocabulary_is_rejected(tmp_path, pair, dataset):
    tokenizer, student, _ = pair
    other = make_tiny_model(tokenizer, vocab_size=len(tokenizer) + 16)
    with pytest.raises(ValueError, match="vocab"):
        SDZeroTrainer(student, other, args=_args(tmp_path), train_dataset=dataset, processing_class=tokenizer)


@pytest.mark.parametrize(
    "mode, give_teacher, peft, match",
    [
        ("disable_adapter", False, False, "peft_config"),
        ("separate", False, False, "needs a teacher"),
        ("copy", True, False, "also given"),
        ("disable_adapter", True, True, "also given"),
    ],
)
def test_impossible_teacher_combinations(tmp_path, pair, dataset, mode, give_teacher, peft, match):
    tokenizer, student, teacher = pair
    with pytest.raises(ValueError, match=match):
        SDZeroTrainer(student, teacher if give_teacher else None, args=_args(tmp_path, teacher_mode=mode),
                      train_dataset=dataset, processing_class=tokenizer, peft_config=_lora() if peft else None)


def test_sync_needs_a_teacher_with_the_students_architecture(tmp_path, pair, dataset):
    tokenizer, student, teacher = pair  # teacher is wider and deeper
    with pytest.raises(ValueError, match="architectures differ"):
        SDZeroTrainer(student, teacher, args=_args(tmp_path, teacher_sync_steps=1), train_dataset=dataset,
                      processing_class=tokenizer)


def test_reward_weights_must_match_the_reward_functions(tmp_path, pair, dataset):
    tokenizer, student, teacher = pair
    with pytest.raises(ValueError, match="reward_weights"):
        SDZeroTrainer(student, teacher, reward_funcs=[parity_reward], train_dataset=dataset, processing_class=tokenizer,
                      args=_args(tmp_path, reward_weights=[1.0, 2.0]))


def test_reward_models_are_rejected(tmp_path, pair, dataset):
    tokenizer, student, teacher = pair
    with pytest.raises(ValueError, match="not a reward function"):
        SDZeroTrainer(student, teacher, reward_funcs=[teacher], train_dataset=dataset, processing_class=tokenizer,
                      args=_args(tmp_path))


@pytest.mark.parametrize("bad", [dict(kl_type="jsd"), dict(mixed_kl_weight=1.5), dict(teacher_mode="ema"),
                                 dict(teacher_sync_steps=-1), dict(distillation_topk=0),
                                 dict(correct_phrase="same", incorrect_phrase="same")])
def test_config_rejects_bad_values(tmp_path, bad):
    with pytest.raises(ValueError):
        _args(tmp_path, **bad)


# ------------------------------------------------------------------------------------------------------ training runs
def _logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if entry.get(key) is not None]


def test_separate_teacher_trains_and_logs_the_metrics(tmp_path, pair, dataset):
    tokenizer, student, teacher = pair
    teacher_before = copy.deepcopy(teacher.state_dict())
    student_before = copy.deepcopy(student.state_dict())
    trainer = SDZeroTrainer(student, teacher, reward_funcs=[parity_reward], train_dataset=dataset,
                            args=_args(tmp_path, learning_rate=1e-3), processing_class=tokenizer)
    assert trainer.teacher_mode == "separate" and trainer.use_fused_loss
    trainer.train()

    losses = _logged(trainer, "loss")
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    for key in ("sdzero/reward_mean", "sdzero/kl", "completions/mean_length", "sdzero/truncated_fraction",
                "rewards/parity_reward/mean"):
        assert _logged(trainer, key), key
    # KL split by reward class: both classes occur with the parity reward over 2 steps x 4 samples (seed 0)
    for key in ("sdzero/kl_correct", "sdzero/kl_incorrect"):
        assert any(math.isfinite(v) and v > 0 for v in _logged(trainer, key)), (key, _logged(trainer, key))
    # the teacher stays frozen, the student moves
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_before.items())
    assert any(not torch.equal(student.state_dict()[k], v) for k, v in student_before.items())


@pytest.mark.parametrize("keep_eos", [True, False])
def test_rollout_batch_holds_the_reward_conditioned_teacher_input(tmp_path, pair, dataset, keep_eos):
    tokenizer, student, teacher = pair
    # every completion ends with the end-of-turn token (forced at the last position), so the EOS rule is exercised
    args = _args(tmp_path, keep_eos_in_first_copy=keep_eos,
                 generation_kwargs={"forced_eos_token_id": tokenizer.eos_token_id})
    trainer = SDZeroTrainer(student, teacher, reward_funcs=[parity_reward], train_dataset=dataset, args=args,
                            processing_class=tokenizer)
    rows = [dataset[i] for i in range(4)]
    batch = trainer._generate_and_score_completions(rows)
    delims = {r: tokenizer(control_text(p), add_special_tokens=False)["input_ids"]
              for r, p in ((1, trainer.args.correct_phrase), (0, trainer.args.incorrect_phrase))}
    width = batch["completion_ids"].shape[1]
    for i in range(4):
        x = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist()
        y = batch["completion_ids"][i][batch["completion_mask"][i].bool()].tolist()
        assert y[-1] == tokenizer.eos_token_id
        first = y if keep_eos else y[:-1]  # default: y's ids as generated, EOS included (spec's token layout)
        r = int(batch["sdzero_rewards"][i])
        assert r == int(parity_reward([[{"content": tokenizer.decode(y, skip_special_tokens=True)}]], None)[0])
        teacher_row = batch["teacher_input_ids"][i][batch["teacher_attention_mask"][i].bool()].tolist()
        assert teacher_row == x + first + delims[r] + y
        assert batch["teacher_input_ids"][i, -width:][: len(y)].tolist() == y  # aligned with the student's y
    assert torch.equal(batch["loss_mask"], batch["completion_mask"])  # nothing truncated here
    assert batch["num_items_in_batch"] == batch["loss_mask"].sum()


def test_fused_and_plain_losses_agree(tmp_path, pair, dataset):
    tokenizer, student, teacher = pair
    trainer = SDZeroTrainer(student, teacher, reward_funcs=[parity_reward], train_dataset=dataset,
                            args=_args(tmp_path), processing_class=tokenizer)
    batch = trainer._generate_and_score_completions([dataset[i] for i in range(4)])
    results = []
    for fused in (True, False):
        trainer.use_fused_loss = fused
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_micro_batches_add_up_to_the_generation_batch_token_mean(tmp_path, pair, dataset):
    """Gradient accumulation: the micro-batch losses sum to the token mean over the whole generation batch."""
    from trl.trainer.utils import split_tensor_dict

    tokenizer, student, teacher = pair
    trainer = SDZeroTrainer(student, teacher, reward_funcs=[parity_reward], train_dataset=dataset,
                            args=_args(tmp_path, gradient_accumulation_steps=2), processing_class=tokenizer)
    trainer.model.train()
    batch = trainer._generate_and_score_completions([dataset[i] for i in range(4)])
    whole = trainer.compute_loss(trainer.model, batch)
    parts = sum(trainer.compute_loss(trainer.model, part) for part in split_tensor_dict(batch, 2))
    torch.testing.assert_close(parts, whole, atol=1e-6, rtol=1e-5)
    per_token = trainer._sdzero_loss(trainer.model, batch, None)[1]
    torch.testing.assert_close(whole, per_token.sum() / batch["loss_mask"].sum(), atol=1e-6, rtol=1e-5)

    # the KL split by reward class is the token mean over the samples of that class
    trainer._metrics["train"].clear()
    batch["sdzero_rewards"] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    trainer._log_kl_by_reward(per_token, batch)
    mask = batch["loss_mask"].float()
    for key, rows in (("sdzero/kl_correct", [0, 2]), ("sdzero/kl_incorrect", [1, 3])):
        expected = (per_token[rows] * mask[rows]).sum() / mask[rows].sum()
        assert trainer._metrics["train"][key] == [pytest.approx(expected.item(), rel=1e-5)]


def test_truncation_applies_in_training(tmp_path, pair, dataset):
    tokenizer, student, teacher = pair
    trainer = SDZeroTrainer(student, teacher, reward_funcs=[parity_reward], train_dataset=dataset,
                            args=_args(tmp_path, max_steps=1), processing_class=tokenizer)
    batch = trainer._generate_and_score_completions([dataset[i] for i in range(4)])
    x_len = int(batch["prompt_mask"].sum(1).max())
    delim_len = max(len(v) for v in trainer._delimiter_ids.values())
    trainer.teacher_max_length = x_len + delim_len + 2 * 3  # room for 3 tokens of y at least
    batch = trainer._generate_and_score_completions([dataset[i] for i in range(4)])
    for i in range(4):
        x = int(batch["prompt_mask"][i].sum())
        y = int(batch["completion_mask"][i].sum())
        d = len(trainer._delimiter_ids[int(batch["sdzero_rewards"][i])])
        assert int(batch["loss_mask"][i].sum()) == truncated_length(x, y, d, trainer.teacher_max_length)
        assert int(batch["teacher_attention_mask"][i].sum()) <= trainer.teacher_max_length
    assert batch["loss_mask"].sum() < batch["completion_mask"].sum()  # something was cut
    assert batch["num_items_in_batch"] == batch["loss_mask"].sum()
    loss = trainer.compute_loss(trainer.model, batch)
    assert torch.isfinite(loss) and loss > 0


def test_adapter_disabled_teacher_is_the_frozen_base(tmp_path, dataset):
    tokenizer = make_tiny_tokenizer()
    student = make_tiny_model(tokenizer, seed=0)
    base = copy.deepcopy(student)
    trainer = SDZeroTrainer(student, reward_funcs=[parity_reward], train_dataset=dataset, processing_class=tokenizer,
                            args=_args(tmp_path, learning_rate=1e-2), peft_config=_lora())
    assert trainer.teacher_mode == "disable_adapter" and trainer.teacher_model is None  # one copy of the weights
    trainer.train()
    assert all(loss > 0 for loss in _logged(trainer, "loss"))

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model = trainer.model
    with torch.no_grad():
        with trainer._teacher_context():
            teacher_logits = model(input_ids=ids).logits
        student_logits = model(input_ids=ids).logits
        base_logits = base(input_ids=ids).logits
    torch.testing.assert_close(teacher_logits, base_logits)  # the teacher is theta_SRT, untouched
    assert not torch.allclose(student_logits, base_logits)  # while the LoRA student has moved


def test_sync_copies_the_student_into_the_teacher(tmp_path, dataset):
    tokenizer = make_tiny_tokenizer()
    student = make_tiny_model(tokenizer, seed=0)
    trainer = SDZeroTrainer(student, reward_funcs=[parity_reward], train_dataset=dataset, processing_class=tokenizer,
                            args=_args(tmp_path, learning_rate=1e-2, teacher_sync_steps=1))
    assert trainer.teacher_mode == "copy"
    initial = copy.deepcopy(trainer.teacher_model.state_dict())
    trainer.train()
    teacher = trainer.teacher_model.state_dict()
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(teacher[name], value, atol=0, rtol=0)
    assert any(not torch.equal(teacher[k], v) for k, v in initial.items())


def test_sync_with_the_adapter_disabled_teacher_merges_and_resets_lora(tmp_path, dataset):
    tokenizer = make_tiny_tokenizer()
    student = make_tiny_model(tokenizer, seed=0)
    base = copy.deepcopy(student)
    trainer = SDZeroTrainer(student, reward_funcs=[parity_reward], train_dataset=dataset, processing_class=tokenizer,
                            args=_args(tmp_path, learning_rate=1e-2, teacher_sync_steps=2), peft_config=_lora())
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    trainer.train()  # 2 steps: the sync fires after the second
    model = trainer.model
    with torch.no_grad():
        with trainer._teacher_context():
            teacher_logits = model(input_ids=ids).logits
        student_logits = model(input_ids=ids).logits
    torch.testing.assert_close(teacher_logits, student_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(teacher_logits, base(input_ids=ids).logits)  # the teacher moved to the student
    assert all(not m.weight.any() for n, m in model.named_modules() if n.endswith("lora_B.default"))


def test_lora_with_a_separate_teacher_syncs_the_merged_student(tmp_path, dataset):
    tokenizer = make_tiny_tokenizer()
    student = make_tiny_model(tokenizer, seed=0)
    trainer = SDZeroTrainer(student, reward_funcs=[parity_reward], train_dataset=dataset, processing_class=tokenizer,
                            args=_args(tmp_path, learning_rate=1e-2, teacher_sync_steps=1, teacher_mode="copy",
                                       max_steps=1), peft_config=_lora())
    trainer.train()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(trainer.teacher_model(input_ids=ids).logits, trainer.model(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_teacher_context_equal_to_the_students_gives_exactly_zero_loss(tmp_path, dataset, fused):
    """With the student's own context as teacher input and the student's weights as teacher, nothing is left to
    distil: the alignment of the teacher's positions with the student's must make every token's KL exactly 0."""
    tokenizer = make_tiny_tokenizer()
    trainer = SDZeroTrainer(make_tiny_model(tokenizer, seed=0), reward_funcs=[parity_reward], train_dataset=dataset,
                            args=_args(tmp_path, teacher_mode="copy", use_fused_loss=fused),
                            processing_class=tokenizer)
    batch = trainer._generate_and_score_completions([dataset[i] for i in range(4)])
    batch["teacher_input_ids"] = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    batch["teacher_attention_mask"] = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    assert trainer.use_fused_loss == fused and batch["loss_mask"].sum() > 0
    loss, per_token = trainer._sdzero_loss(trainer.model, batch, None)
    assert loss.item() == 0.0 and not per_token.any()
    # the reward-conditioned teacher input on the same batch is not zero: the test can tell
    rebuilt = trainer._generate_and_score_completions([dataset[i] for i in range(4)])
    assert trainer._sdzero_loss(trainer.model, rebuilt, None)[0].item() > 0


# ------------------------------------------------------------------------------------------ Phase 1 -> Phase 2 hand-off
def _theta_srt(tmp_path, phrases):
    from trl_sdx.sdzero.control_phrases import save_control_phrases
    from trl_sdx.testing import save_tiny_pair

    student, _ = save_tiny_pair(tmp_path / "models")
    save_control_phrases(student, *phrases)
    return student


def test_phase2_uses_the_phrases_saved_with_theta_srt(tmp_path, dataset):
    from trl_sdx.sdzero import OLMO_INCORRECT_PHRASE

    path = _theta_srt(tmp_path, ("Let me rephrase the above solution.", OLMO_INCORRECT_PHRASE))
    trainer = SDZeroTrainer(path, reward_funcs=[parity_reward], train_dataset=dataset, args=_args(tmp_path))
    assert trainer.args.incorrect_phrase == OLMO_INCORRECT_PHRASE  # chosen from the record, not the path's name
    assert trainer._delimiter_ids[0] == trainer.processing_class(
        control_text(OLMO_INCORRECT_PHRASE), add_special_tokens=False)["input_ids"]
    # without a record: the released pair
    tokenizer, student, teacher = make_student_teacher(seed=0)
    plain = SDZeroTrainer(student, teacher, reward_funcs=[parity_reward], train_dataset=dataset,
                          args=_args(tmp_path), processing_class=tokenizer)
    assert plain.args.incorrect_phrase == "Wait, this response is wrong. Let me correct it."


def test_explicit_phrases_that_differ_from_the_record_are_warned_about(tmp_path, dataset, caplog):
    from trl_sdx.sdzero import OLMO_INCORRECT_PHRASE

    path = _theta_srt(tmp_path, ("Let me rephrase the above solution.", OLMO_INCORRECT_PHRASE))
    explicit = "Wait, this response is wrong. Let me correct it."
    with caplog.at_level("WARNING", logger="trl_sdx.sdzero.control_phrases"):
        trainer = SDZeroTrainer(path, reward_funcs=[parity_reward], train_dataset=dataset,
                                args=_args(tmp_path, incorrect_phrase=explicit))
    assert trainer.args.incorrect_phrase == explicit  # the user's choice is kept ...
    assert "`incorrect_phrase`" in caplog.text and OLMO_INCORRECT_PHRASE in caplog.text  # ... and flagged
    assert "correct_phrase`=" not in caplog.text.replace("incorrect_phrase`=", "")  # P_1 matches: no warning
    record = json.loads((tmp_path / "models" / "student" / "sdzero_control_phrases.json").read_text())
    assert record["incorrect_phrase"] == OLMO_INCORRECT_PHRASE
