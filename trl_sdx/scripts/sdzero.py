"""SD-Zero Phase 2 (on-policy self-distillation) from the command line, shaped like `trl distillation`.

```bash
# Offline CPU demo (after Phase 1: `trl-sdx sdzero-srt --config examples/configs/sdzero_srt_demo.yaml`)
trl-sdx sdzero --config examples/configs/sdzero_demo.yaml

# The paper's setting: student and frozen teacher both start from the Phase 1 checkpoint theta_SRT
trl-sdx sdzero \
    --model_name_or_path outputs/srt/stage2_revision --teacher_model_name_or_path outputs/srt/stage2_revision \
    --dataset_name my/math-prompts-with-answers --per_device_train_batch_size 16 --gradient_accumulation_steps 8 \
    --max_completion_length 8192 --use_vllm --output_dir Qwen3-4B-SDZero

# LoRA with the adapter-disabled teacher (one copy of the weights): --use_peft --teacher_mode disable_adapter
```

The dataset needs a `prompt` column and, for the default reward (`trl_sdx.rewards.math_verify_reward`), an `answer`
column; `--reward_funcs my_pkg.my_module.my_reward` swaps the reward. Model names go through
`trl_sdx.models.resolve_model_name_or_path` (the `smollm2-135m-instruct` alias works offline).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser

from trl_sdx.process_group import end_process_group
from trl_sdx.scripts._prompts import (
    SYNTHETIC_ARITHMETIC,
    PromptScriptArguments,
    load_prompt_datasets,
    train_summarise_save,
)
from trl_sdx.sdzero.sdzero_config import SDZeroConfig

# Single-digit additions (`trl_sdx.sdzero.demo_data`): what the CPU demo model can sometimes solve.
SYNTHETIC_SINGLE_DIGIT = "synthetic-single-digit"
SUMMARY_METRICS = ("sdzero/reward_mean", "sdzero/kl", "sdzero/kl_correct", "sdzero/kl_incorrect",
                   "completions/mean_length", "sdzero/truncated_fraction")


@dataclass
class SDZeroScriptArguments(PromptScriptArguments):
    """The shared prompt-dataset arguments, the single-digit demo task, and the reward functions (both phases)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": f"Dataset: a hub name or local path loaded with `datasets.load_dataset` (columns `prompt` and, "
            f"for the default reward, `answer`), `{SYNTHETIC_ARITHMETIC}` for generated word problems, or "
            f"`{SYNTHETIC_SINGLE_DIGIT}` for 'What is a + b?' with single digits (both offline; "
            "`synthetic_num_prompts` and `synthetic_seed` apply to both)."
        },
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions as import paths ('package.module.function'), TRL's reward-function form. "
            "Default (strict: an unboxed answer is wrong): Phase 1 `trl_sdx.rewards.boxed_answer_reward` (last "
            "\\boxed{} by math equivalence), Phase 2 `trl_sdx.rewards.math_verify_reward` (math-verify against "
            "\\boxed{answer}), both on the `answer` column. `trl_sdx.rewards.lenient_answer_reward` falls back to "
            "the last number; WARNING: it credits cut-off and unboxed answers."
        },
    )


def load_datasets(script_args: SDZeroScriptArguments, want_eval: bool):
    """(train, eval or None): the single-digit demo task here, everything else through `load_prompt_datasets`."""
    if script_args.dataset_name != SYNTHETIC_SINGLE_DIGIT:
        return load_prompt_datasets(script_args, want_eval)
    from trl_sdx.sdzero.demo_data import make_single_digit_dataset

    dataset = make_single_digit_dataset(script_args.synthetic_num_prompts, seed=script_args.synthetic_seed)
    if not want_eval:
        return dataset, None
    split = dataset.train_test_split(test_size=0.1, seed=script_args.synthetic_seed)
    return split["train"], split["test"]


def model_init_kwargs(model_args: ModelConfig, trust_remote_code: bool, revision: str | None) -> dict:
    return dict(revision=revision, trust_remote_code=trust_remote_code,
                attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)


def main(script_args: SDZeroScriptArguments, training_args: SDZeroConfig, model_args: ModelConfig):
    from trl import get_peft_config, get_quantization_config

    from trl_sdx.models import load_tokenizer, resolve_model_name_or_path
    from trl_sdx.sdzero import SDZeroTrainer

    if model_args.model_name_or_path is None:
        raise ValueError("`--model_name_or_path` (the student, normally the Phase 1 checkpoint) is required.")
    student_path = resolve_model_name_or_path(model_args.model_name_or_path)
    training_args.teacher_model_name_or_path = resolve_model_name_or_path(training_args.teacher_model_name_or_path)

    # As in TRL's distillation script: model flags apply to both models, the config's own kwargs win.
    training_args.model_init_kwargs = {
        **model_init_kwargs(model_args, training_args.trust_remote_code, model_args.model_revision),
        **(training_args.model_init_kwargs or {}),
    }
    training_args.teacher_model_init_kwargs = {
        **model_init_kwargs(model_args, training_args.trust_remote_code, training_args.teacher_model_revision),
        **(training_args.teacher_model_init_kwargs or {}),
    }
    tokenizer = load_tokenizer(student_path, padding_side="left", trust_remote_code=training_args.trust_remote_code)
    train_dataset, eval_dataset = load_datasets(script_args, want_eval=training_args.eval_strategy != "no")
    trainer = SDZeroTrainer(
        model=student_path,
        reward_funcs=script_args.reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    train_summarise_save(trainer, training_args, script_args.dataset_name, "SD-Zero metrics", SUMMARY_METRICS,
                         marker="sdzero/reward_mean")


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((SDZeroScriptArguments, SDZeroConfig, ModelConfig), prog=prog)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
    end_process_group()  # every rank together: a live Gloo group can abort the exit
