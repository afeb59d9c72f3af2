"""The TRL 1.16 (and transformers / peft) internals SDZeroTrainer and Phase 1 rely on. An upgrade that changes any
of them fails here, by name, instead of silently building a misaligned teacher input or a wrong loss."""

import dataclasses
import inspect

from peft import PeftModel
from peft.tuners import lora
from peft.tuners.lora import LoraLayer, LoraModel
from transformers import TrainerCallback
from trl import DistillationConfig, DistillationTrainer, SFTConfig
from trl.models.utils import _ForwardRedirection

from trl_sdx.data import make_arithmetic_dataset
from trl_sdx.sdzero import SDZeroConfig, SDZeroTrainer
from trl_sdx.testing import make_student_teacher


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_overridden_hook_signatures():
    # We override these two; they must keep the call signature TRL uses.
    assert params(DistillationTrainer._generate_and_score_completions) == ["self", "inputs"]
    assert params(DistillationTrainer.compute_loss) == ["self", "model", "inputs", "return_outputs",
                                                        "num_items_in_batch"]
    for name in ("_generate_and_score_completions", "compute_loss"):
        assert params(getattr(SDZeroTrainer, name)) == params(getattr(DistillationTrainer, name)), name


def test_private_helpers_we_call():
    # The fused path takes the final hidden states exactly like DistillationTrainer's own chunked loss.
    assert params(DistillationTrainer._get_last_hidden_state)[:5] == [
        "self", "unwrapped_model", "input_ids", "attention_mask", "logits_to_keep"]
    assert params(_ForwardRedirection.__call__)[:4] == ["self", "wrapper_module", "original_module", "method"]
    # The rollout is generated once per accumulation window by `_prepare_inputs`, which shuffles and splits every
    # tensor of our batch (teacher ids, loss mask, rewards) along the batch dimension together.
    source = inspect.getsource(DistillationTrainer._prepare_inputs)
    for needle in ("_generate_and_score_completions", "shuffle_sequence_dict", "split_tensor_dict"):
        assert needle in source, needle
    # DistillationTrainer divides by `inputs["num_items_in_batch"]`, which we recompute from our loss mask.
    assert 'inputs.get("num_items_in_batch")' in inspect.getsource(DistillationTrainer.compute_loss)


def test_constructor_arguments_we_forward():
    base = params(DistillationTrainer.__init__)
    for name in ("model", "teacher_model", "args", "train_dataset", "eval_dataset", "processing_class", "callbacks",
                 "optimizers", "quantization_config", "peft_config", "tools"):
        assert name in base, name
    assert [n for n in params(SDZeroTrainer.__init__) if n != "reward_funcs"] == base


def test_loss_is_scaled_for_gradient_accumulation_by_us():
    assert DistillationTrainer.loss_is_scaled_for_ga is True
    assert SDZeroTrainer.loss_is_scaled_for_ga is True


def test_config_fields_we_read_or_extend():
    fields = {f.name: f for f in dataclasses.fields(DistillationConfig)}
    for name in ("teacher_model_name_or_path", "teacher_model_init_kwargs", "model_init_kwargs", "temperature",
                 "max_completion_length", "remove_unused_columns", "top_k"):
        assert name in fields, name
    # `top_k` is the sampling top-k in TRL, hence our separate `distillation_topk`.
    assert fields["top_k"].default == 0
    ours = {f.name for f in dataclasses.fields(SDZeroConfig)} - set(fields)
    assert {"distillation_topk", "kl_type", "mixed_kl_weight", "teacher_mode", "teacher_sync_steps",
            "teacher_max_length", "correct_phrase", "incorrect_phrase", "use_fused_loss"} <= ours
    # Phase 1 relies on SFTTrainer switching completion-only loss on for prompt/completion data by default.
    assert SFTConfig(output_dir="x", use_cpu=True, bf16=False).completion_only_loss is None


def test_peft_and_callback_apis_we_use():
    assert hasattr(PeftModel, "disable_adapter") and hasattr(LoraModel, "merge_and_unload")
    assert hasattr(lora.Linear, "get_delta_weight") and hasattr(lora.Embedding, "get_delta_weight")
    assert hasattr(LoraLayer, "get_base_layer") and issubclass(lora.Linear, LoraLayer)
    assert params(TrainerCallback.on_step_end)[:4] == ["self", "args", "state", "control"]


def test_rollout_batch_keys_we_consume(tmp_path):
    tokenizer, student, teacher = make_student_teacher(seed=0)
    dataset = make_arithmetic_dataset(2)
    args = SDZeroConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_completion_length=4,
                        use_cpu=True, bf16=False, report_to="none")
    trainer = SDZeroTrainer(student, teacher, reward_funcs=[lambda completions, **kw: [1.0] * len(completions)],
                            args=args, train_dataset=dataset, processing_class=tokenizer)
    base_batch = DistillationTrainer._generate_and_score_completions(trainer, [dataset[0], dataset[1]])
    assert {"prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "num_items_in_batch"} <= set(base_batch)
    # layouts build_teacher_inputs assumes: prompts left-padded, completions right-padded
    assert (base_batch["prompt_mask"][:, -1] == 1).all()
    assert (base_batch["completion_mask"][:, 0] == 1).all()
