"""Factories of tiny, fully deterministic trainers, shared by the resume and distributed tests.

Each factory builds the same trainer from scratch for a given output directory, so two runs (one interrupted
and resumed, one uninterrupted) or two processes start from identical weights and data.
"""

from __future__ import annotations

from datasets import Dataset

from trl_sdx.testing import make_student_teacher

COMMON = dict(
    per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
    gradient_checkpointing=False, disable_tqdm=True, seed=0, lr_scheduler_type="linear", save_only_model=False,
)


def _prompts(n: int) -> Dataset:
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} + {i + 3}?"}] for i in range(n)]})


def build_entropy_gkd(output_dir, *, max_steps: int, save_steps: int | None = None, **overrides):
    from trl_sdx.entropy_gkd import EntropyAwareGKDConfig, EntropyAwareGKDTrainer

    tokenizer, student, teacher = make_student_teacher(seed=0)
    teacher.lm_head.weight.data.mul_(4.0)  # a sharper teacher: something to distill, so losses move
    args = EntropyAwareGKDConfig(
        output_dir=str(output_dir), max_steps=max_steps, max_completion_length=6,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, **{**COMMON, **overrides},
    )
    return EntropyAwareGKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_prompts(16),
                                  processing_class=tokenizer)


FACTORIES = {"entropy-gkd": build_entropy_gkd}


def logged_losses(trainer) -> dict[int, float]:
    """step -> training loss, from the trainer's log history."""
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
