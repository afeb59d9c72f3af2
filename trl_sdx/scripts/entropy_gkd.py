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
# (`--lora_target_modules all-linear` for the same adapters as the README's Python example)
```

Model names go through `trl_sdx.models.resolve_model_name_or_path`, so the embedded aliases
(`smollm2-135m-instruct`, `<model>:half-depth`) work wherever a path does. With `--heldout_num_prompts N` the
student is measured against the teacher on N held-out prompts before and after training
(`trl_sdx.entropy_gkd.evaluation`); the numbers are printed, saved and drawn in the run's plot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser

from trl_sdx.entropy_gkd import EntropyAwareGKDConfig
from trl_sdx.process_group import end_process_group
from trl_sdx.scripts._prompts import (
    SYNTHETIC_ARITHMETIC,
    PromptScriptArguments,
    load_prompt_datasets,
    train_summarise_save,
)

SUMMARY_METRICS = ("eopd/teacher_entropy", "eopd/gate_fraction", "eopd/fkl_gated", "eopd/rkl_estimate",
                   "eopd/clip_fraction", "entropy")


@dataclass
class EOPDScriptArguments(PromptScriptArguments):
    """The shared prompt-dataset arguments plus the held-out before/after evaluation."""

    heldout_num_prompts: int = field(
        default=0,
        metadata={
            "help": "Held-out prompts on which the student-teacher gap is measured before and after training "
            f"(0 = off). With `{SYNTHETIC_ARITHMETIC}` they are generated after the training prompts (never trained "
            "on); otherwise they are the first N rows of `dataset_test_split`."
        },
    )
    heldout_max_new_tokens: int = field(
        default=64, metadata={"help": "Length of the teacher's greedy reference completion of each held-out prompt."}
    )
    heldout_answer_max_new_tokens: int = field(
        default=0,
        metadata={"help": "> 0: also grade the student's greedy answers (needs an `answer` column), this many tokens."},
    )


def load_heldout(script_args: EOPDScriptArguments):
    """N prompts the run never trains on, or None when `heldout_num_prompts` is 0."""
    n = script_args.heldout_num_prompts
    if n <= 0:
        return None
    if script_args.dataset_name == SYNTHETIC_ARITHMETIC:
        from trl_sdx.data import make_arithmetic_dataset

        # Row i does not depend on the set's size: rows past the training prompts are new problems.
        total = script_args.synthetic_num_prompts + n
        full = make_arithmetic_dataset(total, seed=script_args.synthetic_seed,
                                       difficulty=script_args.synthetic_difficulty)
        return full.select(range(script_args.synthetic_num_prompts, total))
    from datasets import load_dataset

    test = load_dataset(script_args.dataset_name, name=script_args.dataset_config,
                        split=script_args.dataset_test_split)
    if len(test) < n:
        raise ValueError(f"`heldout_num_prompts`={n} but split {script_args.dataset_test_split!r} has {len(test)} rows.")
    return test.select(range(n))


def main(script_args: EOPDScriptArguments, training_args: EntropyAwareGKDConfig, model_args: ModelConfig):
    from trl import get_peft_config, get_quantization_config

    from trl_sdx.callbacks import write_before_after
    from trl_sdx.entropy_gkd import EntropyAwareGKDTrainer
    from trl_sdx.entropy_gkd.evaluation import HeldOutEvaluation
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
    heldout = load_heldout(script_args)
    trainer = EntropyAwareGKDTrainer(
        model=student_path,
        teacher_model=teacher_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    evaluation = before = None
    if heldout is not None and trainer.accelerator.is_main_process:
        evaluation = HeldOutEvaluation(trainer, heldout, script_args.heldout_max_new_tokens,
                                       script_args.heldout_answer_max_new_tokens)
        before = evaluation.measure()
    train_summarise_save(trainer, training_args, script_args.dataset_name, "EOPD metrics", SUMMARY_METRICS,
                         marker="eopd/gate_fraction")
    if evaluation is not None:
        write_before_after(trainer, before, evaluation.measure())


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((EOPDScriptArguments, EntropyAwareGKDConfig, ModelConfig), prog=prog)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
    end_process_group()  # every rank together: a live Gloo group can abort the exit
