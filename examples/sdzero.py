"""Self-Distillation Zero, both phases, in a plain Python script: copy it and swap in your model and data.

Runs offline on a CPU in about 8 minutes: SmolLM2-135M-Instruct on "What is a + b?" with single digits (binary
reward: the final answer equals the reference). That tiny model solves about 1 in 5; harder data such as
`trl_sdx.data.make_arithmetic_dataset` works the same way with a stronger model. For the paper's set-up
(Qwen3-4B-Instruct-2507, math + code, 6K revision traces) see docs/sdzero.md.

    python examples/sdzero.py

Phase 1 (`run_srt`) teaches the model to revise its own answers and saves theta_SRT; Phase 2 (`SDZeroTrainer`)
starts the student at theta_SRT and distils the frozen reviser theta_SRT into it on-policy.
"""

import torch

from trl_sdx.models import load_tokenizer
from trl_sdx.rewards import lenient_answer_reward
from trl_sdx.sdzero import SDZeroConfig, SDZeroTrainer
from trl_sdx.sdzero.demo_data import make_single_digit_dataset
from trl_sdx.sdzero.srt import SRTConfig, run_srt

MODEL = "smollm2-135m-instruct"  # embedded alias (converted once); any hub id or local path works
on_gpu = torch.cuda.is_available()
common = dict(bf16=on_gpu, use_cpu=not on_gpu, activation_checkpointing=on_gpu, logging_steps=1, save_strategy="no",
              report_to="none", seed=0)
tokenizer = load_tokenizer(MODEL, padding_side="left")  # on-policy generation pads prompts on the left

# The 135M model does not box its answers, so the strict default checks (last \boxed{}; math-verify in Phase 2)
# would grade everything wrong; this demo grades with the lenient check (last number). Keep the defaults for real
# models: the lenient check also credits cut-off answers.
reward = [lenient_answer_reward]

# ---- Phase 1: Self-Revision Training ---------------------------------------------------------------------------
# Unset fields are the released recipe (3 x 3 samples, 16384 tokens, stage-2 quota 1000, 3 epochs, ...); only what a
# CPU and a 135M model need is changed here.
srt_config = SRTConfig(
    output_dir="outputs/sdzero_example/srt",
    num_init_samples=2,  # y_init per problem (released: 3)
    num_revisions=2,  # y_revised per y_init, after "\n\n" + P_r + "\n\n" (released: 3)
    revise_correct=True,  # rephrase correct answers too (paper); False = revise incorrect ones only (released)
    init_max_new_tokens=64,
    revision_max_new_tokens=64,
    collection_batch_size=8,
    stage2_size=8,  # stage-2 quota (released: 1000); stage 1 gets the remaining incorrect-init tuples
    num_train_epochs=1,  # released: 3 epochs per SFT stage, lr 5e-6, cosine
    learning_rate=1e-5,
    per_device_train_batch_size=4,
    max_length=1024,  # longer rows are dropped and counted, never cut
    **common,
)
theta_srt = run_srt(MODEL, tokenizer, make_single_digit_dataset(32, seed=0), srt_config, reward_funcs=reward)
print(f"theta_SRT: {theta_srt}")

# ---- Phase 2: on-policy self-distillation --------------------------------------------------------------------
args = SDZeroConfig(
    output_dir="outputs/sdzero_example/phase2",
    teacher_mode="copy",  # frozen copy of theta_SRT as reviser (the paper loads the same checkpoint twice)
    kl_type="mixed",  # w * FKL + (1 - w) * RKL on the teacher's top-k, both renormalised (released defaults)
    mixed_kl_weight=0.5,
    distillation_topk=64,
    teacher_max_length=1024,  # |x| + 2|y| + |delim| above this cuts y for student and teacher
    per_device_train_batch_size=4,  # 1 completion per prompt
    max_completion_length=64,
    temperature=1.0,
    max_steps=8,
    learning_rate=5e-6,
    **common,
)
trainer = SDZeroTrainer(
    model=theta_srt,  # the control phrases come with it (sdzero_control_phrases.json)
    reward_funcs=reward,
    args=args,
    train_dataset=make_single_digit_dataset(64, seed=1),  # `prompt` + `answer` columns
    processing_class=tokenizer,
)
trainer.train()
for entry in trainer.state.log_history:
    if "sdzero/reward_mean" in entry:
        print({k: round(v, 4) for k, v in entry.items() if k.startswith("sdzero/") and v is not None})
trainer.save_model(args.output_dir)
