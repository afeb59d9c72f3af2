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

from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser

from trl_sdx.entropy_gkd import EntropyAwareGKDConfig

SYNTHETIC_ARITHMETIC = "synthetic-arithmetic"
SUMMARY_METRICS = ("eopd/teacher_entropy", "eopd/gate_fraction", "eopd/fkl_gated", "eopd/rkl_estimate",
                   "eopd/clip_fraction", "entropy")


@dataclass
class EntropyGKDScriptArguments(ScriptArguments):
    """TRL's `ScriptArguments` plus the size of the built-in synthetic dataset."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": f"Dataset to train on: a hub name or local path loaded with `datasets.load_dataset` (it needs a "
            f"`prompt` column), or `{SYNTHETIC_ARITHMETIC}` for generated arithmetic word problems (offline)."
        },
    )
    synthetic_num_prompts: int = field(
        default=256, metadata={"help": f"Number of prompts of `{SYNTHETIC_ARITHMETIC}`."}
    )
    synthetic_difficulty: int = field(
        default=1, metadata={"help": f"Difficulty of `{SYNTHETIC_ARITHMETIC}` (1 = two-digit additions)."}
    )
    synthetic_seed: int = field(default=0, metadata={"help": f"Seed of `{SYNTHETIC_ARITHMETIC}`."})


def load_datasets(script_args: EntropyGKDScriptArguments, want_eval: bool):
    """(train, eval or None): the synthetic set built in-process, anything else through `load_dataset`."""
    if script_args.dataset_name is None:
        raise ValueError(
            f"`--dataset_name` is required: a hub dataset / local path with a `prompt` column, or "
            f"`{SYNTHETIC_ARITHMETIC}`."
        )
    if script_args.dataset_name == SYNTHETIC_ARITHMETIC:
        from trl_sdx.data import make_arithmetic_dataset

        dataset = make_arithmetic_dataset(
            script_args.synthetic_num_prompts, seed=script_args.synthetic_seed,
            difficulty=script_args.synthetic_difficulty,
        )
        if not want_eval:
            return dataset, None
        split = dataset.train_test_split(test_size=0.1, seed=script_args.synthetic_seed)
        return split["train"], split["test"]
    from datasets import load_dataset

    dataset = load_dataset(
        script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
    )
    eval_dataset = dataset[script_args.dataset_test_split] if want_eval else None
    return dataset[script_args.dataset_train_split], eval_dataset


def print_summary(trainer) -> None:
    """The EOPD metrics of the first and the last logged step, for a quick look at a run."""
    logged = [entry for entry in trainer.state.log_history if "eopd/gate_fraction" in entry]
    if not logged or not trainer.accelerator.is_main_process:
        return
    print("EOPD metrics (first -> last logged step):")
    for name in SUMMARY_METRICS:
        first, last = logged[0].get(name), logged[-1].get(name)
        if first is not None and last is not None:
            print(f"  {name:<22} {first:8.4f} -> {last:8.4f}")


def main(script_args: EntropyGKDScriptArguments, training_args: EntropyAwareGKDConfig, model_args: ModelConfig):
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

    train_dataset, eval_dataset = load_datasets(script_args, want_eval=training_args.eval_strategy != "no")
    trainer = EntropyAwareGKDTrainer(
        model=student_path,
        teacher_model=teacher_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    print_summary(trainer)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((EntropyGKDScriptArguments, EntropyAwareGKDConfig, ModelConfig), prog=prog)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
