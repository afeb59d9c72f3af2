"""What `MixSDTrainer` relies on in TRL / transformers / peft. A failure here means an upgrade changed it.

MixSDTrainer overrides no private hook: it builds a conversational prompt/completion dataset and hands it to
`SFTTrainer.__init__`. It relies on that constructor's arguments, on SFT's completion-only handling of such data,
on `create_model_from_path` (to load a model id before SFT wraps it), and on the KV-cache API its decoder uses.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from datasets import Dataset
from transformers import DynamicCache, TrainingArguments
from trl import SFTConfig, SFTTrainer
from trl.trainer.utils import create_model_from_path

from trl_sdx.mixsd import MixSDConfig, MixSDTrainer
from trl_sdx.testing import make_tiny_model, make_tiny_tokenizer


def test_sft_trainer_init_takes_the_arguments_we_forward():
    params = inspect.signature(SFTTrainer.__init__).parameters
    for name in ("model", "args", "data_collator", "train_dataset", "eval_dataset", "processing_class", "callbacks",
                 "optimizers", "peft_config", "quantization_config", "optimizer_cls_and_kwargs", "formatting_func",
                 "compute_metrics", "preprocess_logits_for_metrics"):
        assert name in params, f"SFTTrainer.__init__ lost `{name}`"
    ours = inspect.signature(MixSDTrainer.__init__).parameters
    assert list(ours)[:3] == ["self", "model", "args"]  # positional order matches SFTTrainer's
    assert list(params)[:3] == ["self", "model", "args"]


def test_create_model_from_path_signature():
    params = inspect.signature(create_model_from_path).parameters
    assert list(params)[:2] == ["model_id", "architecture"]
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def test_mixsd_fields_do_not_shadow_sft_fields():
    sft_fields = {f.name for f in dataclasses.fields(SFTConfig)}
    own = {f.name for f in dataclasses.fields(MixSDConfig)} - sft_fields
    expected = {"lambda_mix", "temperature", "top_k", "max_new_tokens", "max_retries", "answer_match", "keep_failed",
                "generation_batch_size", "mixsd_seed", "mixsd_cache_dir", "prompt_template", "expert_prefix",
                "expert_transition", "question_column", "answer_column", "chat_template_kwargs", "mixsd_targets_path",
                "mixsd_use_vllm", "mixsd_vllm_gpu_memory_utilization", "mixsd_vllm_max_model_len"}
    assert own == expected, f"SFTConfig now defines {expected - own}: rename ours"
    for field in dataclasses.fields(MixSDConfig):
        if field.name in expected:
            assert field.metadata.get("help"), f"{field.name} has no help string"


def test_sft_completion_only_loss_on_conversational_prompt_completion(tmp_path):
    """The paper's loss is SFT's default for prompt/completion rows: NLL on the completion only."""
    tokenizer = make_tiny_tokenizer()
    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": "What is 1 + 1?"}]],
        "completion": [[{"role": "assistant", "content": "\\boxed{2}"}]],
    })
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    assert args.completion_only_loss is None  # None = completion-only for prompt/completion data
    trainer = SFTTrainer(make_tiny_model(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer)
    assert trainer.completion_only_loss is True
    prompt = tokenizer.apply_chat_template(dataset[0]["prompt"], add_generation_prompt=True, return_dict=False)
    row = trainer.train_dataset[0]
    assert row["labels"][: len(prompt)] == [-100] * len(prompt)
    assert row["labels"][len(prompt):] == row["input_ids"][len(prompt):]


def test_main_process_first_and_kv_cache_api():
    assert "desc" in inspect.signature(TrainingArguments.main_process_first).parameters
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer)
    forward = inspect.signature(model.forward).parameters
    assert "cache" in forward or "past_key_values" in forward
    assert "logits_to_keep" in forward
    cache = DynamicCache(config=model.config)
    kwarg = "cache" if "cache" in forward else "past_key_values"
    model(input_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]), use_cache=True, **{kwarg: cache})
    assert cache.get_seq_length() == 3  # filled in place
    cache.batch_select_indices(torch.tensor([1]))
    assert cache.layers[0].keys.shape[0] == 1


def test_peft_disable_adapter_is_a_context_manager():
    from peft import LoraConfig, get_peft_model

    tokenizer = make_tiny_tokenizer()
    peft_model = get_peft_model(make_tiny_model(tokenizer), LoraConfig(r=2, target_modules=["q_proj"]))
    with peft_model.disable_adapter():
        pass
