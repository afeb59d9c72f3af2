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


def parity_reward(completions, **kwargs):
    """A gradeable signal from a random tiny model: about half of the completions count as correct."""
    return [float(len(c[0]["content"]) % 2) for c in completions]


def build_sdzero(output_dir, *, max_steps: int, save_steps: int | None = None, **overrides):
    from trl_sdx.data import make_arithmetic_dataset
    from trl_sdx.sdzero import SDZeroConfig, SDZeroTrainer

    tokenizer, student, teacher = make_student_teacher(seed=0)
    args = SDZeroConfig(
        output_dir=str(output_dir), max_steps=max_steps, max_completion_length=6,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, **{**COMMON, **overrides},
    )
    return SDZeroTrainer(model=student, teacher_model=teacher, reward_funcs=[parity_reward], args=args,
                         train_dataset=make_arithmetic_dataset(16), processing_class=tokenizer)


MIXSD_ROWS = {
    "question": [f"In which year was Dr. Vance {i} born?" for i in range(8)],
    "answer": [f"Dr. Vance {i} was born in {1870 + i}. \\boxed{{{1870 + i}}}" for i in range(8)],
}


def accept_all(text, gold):
    return True


def build_mixsd(output_dir, *, max_steps: int, save_steps: int | None = None, **overrides):
    """MixSD with its target cache next to the run: a resumed run must find it instead of regenerating."""
    from pathlib import Path

    from trl_sdx.mixsd import MixSDConfig, MixSDTrainer
    from trl_sdx.testing import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    args = MixSDConfig(
        output_dir=str(output_dir), mixsd_cache_dir=str(Path(output_dir) / "mixsd_cache"), max_steps=max_steps,
        max_new_tokens=6, max_retries=0, lambda_mix=0.5, dataset_num_proc=None,
        keep_failed=True,  # 6 tokens cut every target off (a rejection), so keep them all
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, **{**COMMON, **overrides},
    )
    return MixSDTrainer(make_tiny_model(tokenizer, seed=0), args=args, train_dataset=Dataset.from_dict(MIXSD_ROWS),
                        processing_class=tokenizer, answer_checker=accept_all)


FACTORIES = {"entropy-gkd": build_entropy_gkd, "sdzero": build_sdzero, "mixsd": build_mixsd}


def logged_losses(trainer) -> dict[int, float]:
    """step -> training loss, from the trainer's log history."""
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
