"""Entropy-aware on-policy distillation (EOPD) in a plain Python script: copy it and swap in your models/data.

Runs offline on a CPU in a few minutes: SmolLM2-135M-Instruct teaches its own half-depth copy to solve synthetic
arithmetic word problems. For the paper's set-up (Qwen3-8B -> Qwen3-1.7B-Base on MATH) see docs/entropy_gkd.md.

    python examples/entropy_gkd.py

In an existing TRL script, the change from `DistillationTrainer` is the two class names:

    from trl import DistillationConfig, DistillationTrainer                    # before
    from trl_sdx.entropy_gkd import EntropyAwareGKDConfig, EntropyAwareGKDTrainer  # after
"""

import torch

from trl_sdx.data import make_arithmetic_dataset
from trl_sdx.entropy_gkd import EntropyAwareGKDConfig, EntropyAwareGKDTrainer
from trl_sdx.models import load_model, load_tokenizer

# Embedded model aliases (resolved to local folders, converted once). Any hub id or local path works here too,
# e.g. "Qwen/Qwen3-1.7B-Base" and "Qwen/Qwen3-8B": student and teacher must share a tokenizer.
TEACHER = "smollm2-135m-instruct"
STUDENT = "smollm2-135m-instruct:half-depth"
on_gpu = torch.cuda.is_available()

tokenizer = load_tokenizer(STUDENT, padding_side="left")  # on-policy generation pads prompts on the left
student = load_model(STUDENT, dtype=torch.bfloat16 if on_gpu else torch.float32)
teacher = load_model(TEACHER, dtype=torch.bfloat16 if on_gpu else torch.float32)

# Any dataset with a "prompt" column (conversational or plain text) works.
train_dataset = make_arithmetic_dataset(64, seed=0)

args = EntropyAwareGKDConfig(
    output_dir="outputs/entropy_gkd_example",
    # EOPD objective, the paper's values (these are the defaults)
    tau=0.8,  # τ, nats: add the forward KL on tokens whose teacher entropy is >= τ
    alpha=1.0,  # α: weight of that forward KL
    fkl_top_k=16,  # k: forward KL over the teacher's top-16 tokens
    clip_eps=0.2,  # ε: PPO clip of π_θ/π_old
    # Rollouts: 4 prompts each, split into 2 optimizer steps (the paper: 128 prompts, 4 steps of 32)
    per_device_train_batch_size=2,
    steps_per_generation=2,
    max_completion_length=32,
    max_steps=8,
    learning_rate=2e-5,
    lr_scheduler_type="constant",
    logging_steps=1,
    # bf16 is left unset: bf16 on a GPU that supports it, fp32 on a CPU (trl_sdx.precision)
    use_cpu=not on_gpu,
    activation_checkpointing=on_gpu,
    save_strategy="no",  # no checkpoints; metrics.jsonl, trainer_state.json and the plot are still written
    report_to="none",
)

trainer = EntropyAwareGKDTrainer(
    model=student,
    teacher_model=teacher,
    args=args,
    train_dataset=train_dataset,
    processing_class=tokenizer,
    # peft_config=peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),  # LoRA on the student only
)
trainer.train()
trainer.save_model(args.output_dir)

last = [entry for entry in trainer.state.log_history if "eopd/gate_fraction" in entry][-1]
print({key: round(value, 4) for key, value in last.items() if key.startswith("eopd/") or key == "entropy"})
