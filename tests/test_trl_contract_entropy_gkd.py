"""The TRL 1.16 internals EntropyAwareGKDTrainer relies on. A TRL upgrade that changes any of them fails here,
by name, instead of silently training on a wrong rollout schedule or a misaligned loss."""

import dataclasses
import inspect

import pytest
import torch
from datasets import Dataset
from trl import DistillationConfig, DistillationTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer import utils as trl_utils
from transformers import Trainer

from trl_sdx.entropy_gkd import EntropyAwareGKDConfig, EntropyAwareGKDTrainer
from trl_sdx.testing import make_student_teacher


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def tiny_trainer(tmp_path, **overrides):
    tokenizer, student, teacher = make_student_teacher(seed=0)
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, max_completion_length=4,
                  logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                  gradient_checkpointing=False, disable_tqdm=True)
    kwargs.update(overrides)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{i} + 1 ="}] for i in range(4)]})
    return EntropyAwareGKDTrainer(student, teacher, args=EntropyAwareGKDConfig(**kwargs), train_dataset=dataset,
                                  processing_class=tokenizer)


# --- hooks we override: same name and call signature as the TRL method they replace ------------------------------


def test_overridden_hook_signatures():
    assert params(DistillationTrainer.get_train_dataloader) == ["self"]
    assert params(DistillationTrainer._get_train_sampler) == ["self", "dataset"]
    assert params(DistillationTrainer._prepare_inputs) == ["self", "generation_batch"]
    assert params(DistillationTrainer._generate_and_score_completions) == ["self", "inputs"]
    assert params(DistillationTrainer.compute_loss) == ["self", "model", "inputs", "return_outputs",
                                                        "num_items_in_batch"]
    # `log` reads the loss statistics kept on the device, then hands over to DistillationTrainer.log
    assert params(DistillationTrainer.log) == ["self", "logs", "start_time"]
    for name in ("get_train_dataloader", "_get_train_sampler", "_prepare_inputs", "_generate_and_score_completions",
                 "compute_loss", "log"):
        assert params(getattr(EntropyAwareGKDTrainer, name)) == params(getattr(DistillationTrainer, name)), name


def test_constructor_arguments_we_forward():
    base = params(DistillationTrainer.__init__)
    for name in ("model", "teacher_model", "args", "train_dataset", "eval_dataset", "processing_class", "callbacks",
                 "optimizers", "quantization_config", "peft_config", "tools"):
        assert name in base, name
    ours = params(EntropyAwareGKDTrainer.__init__)
    assert [n for n in ours if n != "teacher_processing_class"] == base


def test_compute_loss_is_scaled_for_gradient_accumulation_by_the_trainer():
    # Our compute_loss divides by the optimizer step's token count itself; transformers must not divide again.
    assert DistillationTrainer.loss_is_scaled_for_ga is True


# --- TRL internals we call -----------------------------------------------------------------------------------------


def test_internal_helpers_we_call():
    assert params(DistillationTrainer._get_last_hidden_state)[:5] == [
        "self", "unwrapped_model", "input_ids", "attention_mask", "logits_to_keep"]
    assert {"dataset", "description", "batch_size", "sampler_fn", "is_training"} <= set(
        params(Trainer._get_dataloader))
    assert params(trl_utils.RepeatSampler.__init__) == [
        "self", "data_source", "mini_repeat_count", "batch_size", "repeat_count", "shuffle", "seed"]
    assert params(trl_utils.repeat_iterable_dataset)[:4] == ["dataset", "mini_repeat_count", "batch_size",
                                                             "repeat_count"]
    assert params(trl_utils.split_tensor_dict) == ["tensor_dict", "num_chunks"]
    assert params(trl_utils.shuffle_sequence_dict) == ["seq_dict"]
    assert params(trl_utils.selective_log_softmax)[:3] == ["logits", "index", "temperature"]
    assert params(disable_gradient_checkpointing) == ["model", "gradient_checkpointing_kwargs"]


def test_config_fields_we_read():
    names = {f.name for f in dataclasses.fields(DistillationConfig)}
    assert {"temperature", "teacher_model_name_or_path", "teacher_model_revision", "teacher_model_init_kwargs",
            "model_init_kwargs", "trust_remote_code", "max_completion_length", "shuffle_dataset"} <= names
    # The rollout-reuse knobs are ours (GRPO's names): a future DistillationConfig defining them must be reconciled.
    assert not {"steps_per_generation", "generation_batch_size", "num_iterations"} & names


def test_state_the_base_constructor_sets_up(tmp_path):
    trainer = tiny_trainer(tmp_path)
    assert trainer._step == 0 and trainer._buffered_inputs is None
    assert set(trainer._metrics) == {"train", "eval"}
    assert callable(trainer._forward_redirection)
    assert "input_ids" in trainer.model_kwarg_keys
    assert trainer.temperature == trainer.args.temperature
    assert trainer._tokenizer is trainer.processing_class and trainer.teacher_model is not None


def test_rollout_dict_keys_and_hidden_state_alignment(tmp_path):
    trainer = tiny_trainer(tmp_path)
    trainer.model.train()
    rollout = DistillationTrainer._generate_and_score_completions(
        trainer, [{"prompt": [{"role": "user", "content": "1 + 1 ="}]}, {"prompt": [{"role": "user", "content": "hi"}]}]
    )
    assert {"prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "num_items_in_batch"} <= set(rollout)
    assert rollout["completion_ids"].shape == rollout["completion_mask"].shape
    assert rollout["num_items_in_batch"].item() == rollout["completion_mask"].sum().item()
    # `_get_last_hidden_state` returns the final-norm states of the positions predicting the completion tokens.
    model = trainer.model
    input_ids = torch.cat([rollout["prompt_ids"], rollout["completion_ids"]], dim=1)
    attention_mask = torch.cat([rollout["prompt_mask"], rollout["completion_mask"]], dim=1)
    t = rollout["completion_ids"].size(1)
    with torch.no_grad():
        hidden = trainer._get_last_hidden_state(model, input_ids, attention_mask, t)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -t - 1 : -1]
    torch.testing.assert_close(hidden @ model.get_output_embeddings().weight.t(), logits, atol=1e-5, rtol=1e-5)


def test_training_step_advances_step_and_log_averages_metrics(tmp_path):
    trainer = tiny_trainer(tmp_path)
    trainer.train()
    assert trainer._step == 2  # DistillationTrainer.training_step counts micro-steps; our buffer indexes by it
    assert not trainer._metrics["train"]  # DistillationTrainer.log averages then clears what we append
    assert "eopd/gate_fraction" in trainer.state.log_history[0]
