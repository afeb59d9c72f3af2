"""Entropy-aware on-policy distillation (EOPD) from the command line, shaped like `trl distillation`.

```bash
# The offline demo (SmolLM2-135M-Instruct teacher, its half-depth copy as student, synthetic arithmetic):
trl-sdx entropy-gkd --config examples/configs/entropy_gkd_demo.yaml

# Any TRL-style run: a hub dataset or local path with a "prompt" column
trl-sdx entropy-gkd \
    --model_name_or_path Qwen/Qwen3-1.7B-Base --teacher_model_name_or_path Qwen/Qwen3-8B \
    --dataset_name my/math-prompts --generation_batch_size 128 --per_device_train_batch_size 32 \
    --output_dir Qwen3-1.7B-EOPD

# LoRA on the student (the teacher stays frozen): add --use_peft --lora_r 32 --lora_alpha 16
```

Model names go through `trl_sdx.models.resolve_model_name_or_path`, so the embedded aliases
(`smollm2-135m-instruct`, `<model>:half-depth`) work wherever a path does.
"""

from __future__ import annotations

from trl import ModelConfig, TrlParser

from trl_sdx.entropy_gkd import EntropyAwareGKDConfig
from trl_sdx.scripts._prompts import PromptScriptArguments, load_prompt_datasets, train_summarise_save

SUMMARY_METRICS = ("eopd/teacher_entropy", "eopd/gate_fraction", "eopd/fkl_gated", "eopd/rkl_estimate",
                   "eopd/clip_fraction", "entropy")


def main(script_args: PromptScriptArguments, training_args: EntropyAwareGKDConfig, model_args: ModelConfig):
    from trl import get_peft_config, get_quantization_config

    from trl_sdx.entropy_gkd import EntropyAwareGKDTrainer
    from trl_sdx.models import resolve_model_name_or_path

    if model_args.model_name_or_path is None:
        raise ValueError("`--model_name_or_path` (the student) is required.")
    if training_args.teacher_model_name_or_path is None:
        raise ValueError("`--teacher_model_name_or_path` is required: EOPD distils a teacher into the student.")
    student_path = resolve_model_name_or_path(model_args.model_name_or_path)
    teacher_path = resolve_model_name_or_path(training_args.teacher_model_name_or_path)

    # As in TRL's distillation script: model flags apply to both models, the config's own kwargs win.
    model_init_kwargs = dict(revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
                             attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    teacher_init_kwargs = dict(revision=training_args.teacher_model_revision,
                               trust_remote_code=training_args.trust_remote_code,
                               attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
    training_args.teacher_model_init_kwargs = {**teacher_init_kwargs,
                                               **(training_args.teacher_model_init_kwargs or {})}

    train_dataset, eval_dataset = load_prompt_datasets(script_args, want_eval=training_args.eval_strategy != "no")
    trainer = EntropyAwareGKDTrainer(
        model=student_path,
        teacher_model=teacher_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    train_summarise_save(trainer, training_args, script_args.dataset_name, "EOPD metrics", SUMMARY_METRICS,
                         marker="eopd/gate_fraction")


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((PromptScriptArguments, EntropyAwareGKDConfig, ModelConfig), prog=prog)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
