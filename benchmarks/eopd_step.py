"""EntropyAwareGKDTrainer step time: the teacher scored once per rollout (default) vs in every loss step (before).

Both variants run the same trainer on the same seed, models and data; the only difference is where the teacher
runs:

    once_per_rollout   default: at rollout time the teacher is scored into compact per-token targets (entropy,
                       log pi_T(y_t), top-k ids and log-probs), stored with the rollout; loss steps run the student.
    every_loss_step    the path before issue #10: the teacher forward and its lm_head run again in every
                       micro-batch pass (the trainer's own fallback, selected by clearing `_teacher_at_rollout`).

Schedules: the paper's (`steps_per_generation=4`, `num_iterations=1`: 4 optimizer steps per rollout, each sample
seen once, so the teacher's total work is the same in both variants and only moves to rollout time) and two
epochs over each rollout (`num_iterations=2`: the old path runs the teacher twice per sample). Models are random
Llamas with SmolLM2's tokenizer and vocabulary (49,152 tokens), untied, fp32; the teacher is wider and deeper than
the student (about 4x its backbone FLOPs, like Qwen3-8B vs 1.7B). Runs alternate between the variants over
`--rounds` (so load from other jobs on this shared machine hits both alike); the first rollout of every run is a
warm-up. Reported: median wall time of an optimizer step that reuses the rollout (no generation), of the step
that generates it, and of a whole rollout cycle, plus the teacher forwards per rollout (counted by a hook).

Command of the committed results:
  python benchmarks/eopd_step.py --out benchmarks/results/eopd_step_cpu.json \\
      --markdown benchmarks/results/eopd_step_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

from _report import write_report  # benchmarks/ is on sys.path when a script runs

VARIANTS = ("every_loss_step", "once_per_rollout")
STEPS_PER_ROLLOUT = 4


def build_models(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trl_sdx.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")

    def model(hidden, layers, seed):
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
            num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), num_key_value_heads=1,
            max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)

    return tokenizer, model(args.student_hidden, args.student_layers, 0), model(args.teacher_hidden,
                                                                                 args.teacher_layers, 1)


def run(variant, num_iterations, tokenizer, student, teacher, args, output_dir):
    import copy

    from transformers import TrainerCallback

    from trl_sdx.data import make_arithmetic_dataset
    from trl_sdx.entropy_gkd import EntropyAwareGKDConfig, EntropyAwareGKDTrainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)

    steps = STEPS_PER_ROLLOUT * num_iterations  # optimizer steps per rollout
    config = EntropyAwareGKDConfig(
        output_dir=output_dir, per_device_train_batch_size=args.batch, steps_per_generation=STEPS_PER_ROLLOUT,
        num_iterations=num_iterations, max_steps=steps * (1 + args.rollouts), max_completion_length=args.completion_len,
        learning_rate=1e-5, logging_steps=steps, save_strategy="no", report_to="none", use_cpu=True,
        bf16=False, gradient_checkpointing=False, disable_tqdm=True, seed=0,
        generation_kwargs={"min_new_tokens": args.completion_len})
    timer = Timer()
    dataset = make_arithmetic_dataset(STEPS_PER_ROLLOUT * args.batch * (2 + args.rollouts), seed=0)
    trainer = EntropyAwareGKDTrainer(copy.deepcopy(student), teacher, args=config, train_dataset=dataset,
                                     processing_class=tokenizer, callbacks=[timer])
    if variant == "every_loss_step":
        trainer._teacher_at_rollout = False
    forwards = [0]
    hook = trainer.accelerator.unwrap_model(trainer.teacher_model).model.register_forward_pre_hook(
        lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    trainer.train()
    hook.remove()
    measured = timer.times[steps:]  # the first rollout is the warm-up
    cycles = [sum(measured[i : i + steps]) for i in range(0, len(measured), steps)]
    return {"rollout_step_s": [measured[i] for i in range(0, len(measured), steps)],
            "reuse_step_s": [t for i, t in enumerate(measured) if i % steps],
            "cycle_s": cycles, "teacher_forwards_per_rollout": forwards[0] / (1 + args.rollouts)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student-hidden", type=int, default=256)
    parser.add_argument("--student-layers", type=int, default=4)
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--teacher-layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="completions per micro-batch (= optimizer step)")
    parser.add_argument("--completion-len", type=int, default=16)
    parser.add_argument("--rollouts", type=int, default=1, help="measured rollouts per run (after 1 warm-up)")
    parser.add_argument("--num-iterations", type=int, nargs="+", default=[1, 2], help="schedules to measure")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch

    torch.set_num_threads(args.threads)
    started = time.time()
    tokenizer, student, teacher = build_models(args)
    names = [f"{variant}/num_iterations={mu}" for mu in args.num_iterations for variant in VARIANTS]
    samples = {name: {"rollout_step_s": [], "reuse_step_s": [], "cycle_s": [], "teacher_forwards_per_rollout": []}
               for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name in names:
                variant, mu = name.split("/num_iterations=")
                out = run(variant, int(mu), tokenizer, student, teacher, args, os.path.join(tmp, variant))
                for key, value in out.items():
                    samples[name][key] += value if isinstance(value, list) else [value]
    summary = {v: {key: statistics.median(values) for key, values in s.items()} for v, s in samples.items()}
    result = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": vars(args) | {"steps_per_rollout": STEPS_PER_ROLLOUT, "vocab": len(tokenizer),
                                  "student_parameters": sum(p.numel() for p in student.parameters()),
                                  "teacher_parameters": sum(p.numel() for p in teacher.parameters())},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "loadavg_at_end": list(os.getloadavg())},
        "wall_time_s": time.time() - started,
        "samples": samples,
        "summary": summary,
        "ratios": {f"{key}_once_over_every/num_iterations={mu}": summary[f"once_per_rollout/num_iterations={mu}"][key]
                   / summary[f"every_loss_step/num_iterations={mu}"][key]
                   for mu in args.num_iterations for key in ("reuse_step_s", "rollout_step_s", "cycle_s")},
    }
    write_report(result, args.out, args.markdown, to_markdown)
    print(to_markdown(result))


def to_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# EOPD step time: teacher once per rollout vs in every loss step (CPU)", "",
        f"Command: `{result['command']}`  ", f"Date: {result['date']}", "",
        f"- Student {s['student_parameters'] / 1e6:.0f}M parameters (hidden {s['student_hidden']}, "
        f"{s['student_layers']} layers), teacher {s['teacher_parameters'] / 1e6:.0f}M (hidden {s['teacher_hidden']}, "
        f"{s['teacher_layers']} layers); random-init Llamas, vocab {s['vocab']}, untied, fp32, fused loss.",
        f"- {s['batch']} completions of exactly {s['completion_len']} tokens per optimizer step, "
        f"steps_per_generation={s['steps_per_rollout']} (x num_iterations optimizer steps per rollout), "
        f"{s['rollouts']} measured rollout(s) per run after one "
        f"warm-up, {s['rounds']} interleaved rounds, {s['threads']} thread(s).",
        f"- Machine: {result['machine']['cpus']} CPUs shared with other jobs (load average at the end "
        f"{[round(x, 2) for x in result['machine']['loadavg_at_end']]}); wall time {result['wall_time_s'] / 60:.1f} "
        "min.", "",
        "| variant | reuse step (s) | generating step (s) | rollout cycle (s) | teacher forwards / rollout |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in result["summary"].items():
        lines.append(f"| {name} | {row['reuse_step_s']:.3f} | {row['rollout_step_s']:.3f} | {row['cycle_s']:.3f} | "
                     f"{row['teacher_forwards_per_rollout']:.0f} |")
    lines += ["", "| ratio (once_per_rollout / every_loss_step) | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in result["ratios"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
