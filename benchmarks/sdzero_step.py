"""SD-Zero Phase 2 step time and peak memory vs TRL's experimental `SDPOTrainer`, on CPU, at equal batch and lengths.

Models: randomly initialised Llamas with SmolLM2's tokenizer and vocabulary (49,152 tokens), untied embeddings, fp32.
The time group uses `--hidden`/`--layers` (default 768/8, 125M parameters). The memory group uses a wider, shallower
`--memory-hidden`/`--memory-layers` (default 2560/6, 663M parameters, 2.5 GiB per copy): peak memory is
baseline (~0.55 GiB of Python/torch/TRL imports) + weights x (1 or 2) + activations (which grow with
width x depth x tokens), and the adapter-disabled saving is about weights, so the comparison needs weights to
dominate. Every configuration runs in a fresh subprocess (clean peak RSS) and trains `--warmup` + measured
optimizer steps; the step time is the median of the measured steps (generation + teacher forward + student
forward/backward + optimizer). Memory is reported three ways: the process's peak RSS (`ru_maxrss`, the target's
measure), the same net of the RSS after imports, and the peak of the training phase alone (VmHWM reset at
`on_train_begin`, so model-loading transients are excluded).

Equal work: B completions per step in both trainers, every completion exactly `--completion-len` tokens
(`min_new_tokens`), top-k 64 distillation only (SDPO: `distillation_weight=1`, `distillation_mode='topk_logits'`,
frozen `teacher_model_kind='base'` copy, 2 generations per prompt with every rollout rewarded so every sample gets
a peer-solution teacher prompt; SD-Zero: 1 generation per prompt, frozen copy teacher, reward 1). Both teacher
inputs hold the prompt, one completion-sized context and the scored completion.

Configurations:
  time group (interleaved over `--rounds`, so load from other processes hits each alike):
    sdpo_full            SDPOTrainer, full fine-tuning, frozen copy teacher               (time baseline)
    sdzero_full          SDZeroTrainer, full fine-tuning, frozen copy teacher, fused loss  (target: <= 1.15x sdpo_full)
    sdzero_full_plain    same with the plain full-logits loss                              (opt-in, information)
  memory group:
    sdzero_lora_copy     SDZeroTrainer, LoRA, separate frozen copy teacher                 (memory baseline)
    sdzero_lora_disable  SDZeroTrainer, LoRA, adapter-disabled teacher                     (target: <= 0.6x lora_copy)

Command of the committed results (1 thread: on a shared 2-core machine, 2 OpenMP threads spin against other jobs):
  python benchmarks/sdzero_step.py --out benchmarks/results/sdzero_step_cpu.json \\
      --markdown benchmarks/results/sdzero_step_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from _report import write_report  # benchmarks/ is on sys.path when a script runs

CONFIGS = ("sdpo_full", "sdzero_full", "sdzero_full_plain", "sdzero_lora_copy", "sdzero_lora_disable")
TIME_GROUP = ("sdpo_full", "sdzero_full", "sdzero_full_plain")
MEMORY_GROUP = ("sdzero_lora_copy", "sdzero_lora_disable")


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mib() -> float:
    return _status_mib("VmRSS")


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM, so the training phase's own peak can be read afterwards."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build_model(directory: str, hidden: int, layers: int, seed: int) -> dict:
    """Random-init Llama with SmolLM2's tokenizer, saved to `directory`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trl_sdx.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return {"parameters": sum(p.numel() for p in model.parameters()), "hidden": hidden, "layers": layers,
            "vocab": len(tokenizer)}


class _StepTimer:
    """Wall time of each optimizer step, and the peak RSS of the training phase alone (TrainerCallback interface)."""

    def __init__(self):
        self.times, self._start, self.train_peak_reset = [], None, False

    def on_train_begin(self, *args, **kwargs):
        self.train_peak_reset = _reset_peak_rss()

    def on_step_begin(self, *args, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def worker(name: str, model_dir: str, batch: int, completion_len: int, steps: int, warmup: int, threads: int,
           output_dir: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback

    from trl_sdx.data import make_arithmetic_dataset

    baseline = _rss_mib()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    total_steps = warmup + steps
    timer = type("StepTimer", (_StepTimer, TrainerCallback), {})()
    common = dict(output_dir=output_dir, per_device_train_batch_size=batch, max_steps=total_steps,
                  max_completion_length=completion_len, generation_kwargs={"min_new_tokens": completion_len},
                  bf16=False, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, seed=0,
                  disable_tqdm=True, learning_rate=1e-5)
    always_right = lambda completions, **kwargs: [1.0] * len(completions)  # noqa: E731
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"], lora_dropout=0.0)

    if name == "sdpo_full":
        from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

        dataset = make_arithmetic_dataset(batch * total_steps)
        args = SDPOConfig(**common, num_generations=2, distillation_mode="topk_logits", distillation_topk=64,
                          distillation_weight=1.0, teacher_model_kind="base")
        trainer = SDPOTrainer(model_dir, reward_funcs=[always_right], args=args, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer])
    else:
        from trl_sdx.sdzero import SDZeroConfig, SDZeroTrainer

        dataset = make_arithmetic_dataset(batch * total_steps)
        mode = "disable_adapter" if name == "sdzero_lora_disable" else "copy"
        args = SDZeroConfig(**common, teacher_mode=mode, use_fused_loss=name != "sdzero_full_plain")
        trainer = SDZeroTrainer(model_dir, reward_funcs=[always_right], args=args, train_dataset=dataset,
                                processing_class=tokenizer, callbacks=[timer],
                                peft_config=lora if "lora" in name else None)
    trainer.train()
    measured = timer.times[warmup:]
    return {
        "config": name,
        "step_time_s_median": statistics.median(measured),
        "step_times_s": timer.times,
        "peak_rss_mib": _peak_rss_mib(),
        "baseline_rss_mib": baseline,
        "peak_rss_above_baseline_mib": _peak_rss_mib() - baseline,
        "train_phase_peak_rss_mib": _status_mib("VmHWM") if timer.train_peak_reset else None,
        "threads": threads,
    }


def _run(name: str, args, model_dir: str, steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--worker", name, "--model-dir", model_dir, "--batch", str(args.batch),
               "--completion-len", str(args.completion_len), "--steps", str(steps), "--warmup", str(warmup),
               "--threads", str(args.threads), "--worker-out", os.path.join(out, "r.json")]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        with open(os.path.join(out, "r.json")) as f:
            result = json.load(f)
    print(f"  {name:<22} step {result['step_time_s_median']:7.2f}s  peak RSS {result['peak_rss_mib']:8.0f} MiB "
          f"(+{result['peak_rss_above_baseline_mib']:.0f} over baseline, training phase "
          f"{result['train_phase_peak_rss_mib'] or float('nan'):.0f})", flush=True)
    return result


def _ratio(summary: dict, key: str, num: str, den: str) -> float | None:
    if num not in summary or den not in summary or summary[num][key] is None or summary[den][key] is None:
        return None
    return summary[num][key] / summary[den][key]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768, help="time-group model width")
    parser.add_argument("--layers", type=int, default=8, help="time-group model depth")
    parser.add_argument("--memory-hidden", type=int, default=2560, help="memory-group model width")
    parser.add_argument("--memory-layers", type=int, default=6, help="memory-group model depth")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--completion-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="measured optimizer steps per time-group run")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured first steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repeats of the time group")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--configs", nargs="+", default=[c for c in CONFIGS if c != "sdzero_full_plain"],
                        choices=CONFIGS)
    parser.add_argument("--out", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        with tempfile.TemporaryDirectory() as out:
            result = worker(args.worker, args.model_dir, args.batch, args.completion_len, args.steps, args.warmup,
                            args.threads, out)
        with open(args.worker_out, "w") as f:
            json.dump(result, f)
        return result

    started = time.time()
    runs: dict[str, list[dict]] = {name: [] for name in args.configs}
    models = {}
    groups = (("time", TIME_GROUP, args.hidden, args.layers, args.rounds, args.steps),
              ("memory", MEMORY_GROUP, args.memory_hidden, args.memory_layers, 1, 1))
    for group, members, hidden, layers, rounds, steps in groups:
        members = [c for c in members if c in args.configs]
        if not members:
            continue
        with tempfile.TemporaryDirectory() as model_dir:
            models[group] = build_model(model_dir, hidden, layers, seed=0)
            print(f"{group} model: {models[group]}", flush=True)
            for _ in range(rounds):  # interleaved, so load from other processes hits every config alike
                for name in members:
                    runs[name].append(_run(name, args, model_dir, steps, args.warmup))

    summary = {}
    for name, rs in runs.items():
        if rs:
            phase = [r["train_phase_peak_rss_mib"] for r in rs if r["train_phase_peak_rss_mib"] is not None]
            summary[name] = {"step_time_s": statistics.median(r["step_time_s_median"] for r in rs),
                             "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                             "peak_rss_above_baseline_mib": max(r["peak_rss_above_baseline_mib"] for r in rs),
                             "train_phase_peak_rss_mib": max(phase) if phase else None}
    ratios = {
        "time_sdzero_full_over_sdpo_full": _ratio(summary, "step_time_s", "sdzero_full", "sdpo_full"),
        "peak_rss_sdzero_full_over_sdpo_full": _ratio(summary, "peak_rss_mib", "sdzero_full", "sdpo_full"),
        "time_fused_over_plain": _ratio(summary, "step_time_s", "sdzero_full", "sdzero_full_plain"),
        "peak_rss_disable_adapter_over_copy": _ratio(summary, "peak_rss_mib", "sdzero_lora_disable",
                                                     "sdzero_lora_copy"),
        "peak_rss_above_baseline_disable_adapter_over_copy": _ratio(
            summary, "peak_rss_above_baseline_mib", "sdzero_lora_disable", "sdzero_lora_copy"),
        "train_phase_peak_rss_disable_adapter_over_copy": _ratio(
            summary, "train_phase_peak_rss_mib", "sdzero_lora_disable", "sdzero_lora_copy"),
    }
    ratios = {k: v for k, v in ratios.items() if v is not None}
    targets = {
        f"{key} <= {bound}": ratios[key] <= bound
        for key, bound in (("time_sdzero_full_over_sdpo_full", 1.15), ("peak_rss_disable_adapter_over_copy", 0.6))
        if key in ratios
    }
    result = {
        "benchmark": "sdzero_step",
        "command": "python benchmarks/sdzero_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: getattr(args, k) for k in ("batch", "completion_len", "steps", "warmup", "rounds", "threads")},
        "models": models,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
        "runs": runs,
        "summary": summary,
        "ratios": ratios,
        "targets_met": targets,
        "wall_time_s": time.time() - started,
    }
    print(json.dumps({"summary": summary, "ratios": ratios, "targets_met": targets}, indent=2))
    write_report(result, args.out, args.markdown, to_markdown)
    return result


def _describe(model: dict) -> str:
    return (f"random-init Llama, {model['parameters'] / 1e6:.0f}M parameters (hidden {model['hidden']}, "
            f"{model['layers']} layers, vocab {model['vocab']}, untied, fp32 = {model['parameters'] * 4 / 2**20:.0f} "
            "MiB per copy)")


def to_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# SD-Zero Phase 2 step vs TRL SDPOTrainer (CPU)",
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    for group, model in result["models"].items():
        lines.append(f"- {group} group model: {_describe(model)}")
    lines += [
        f"- Batch {s['batch']} completions per step, every completion {s['completion_len']} tokens, top-k 64, "
        f"{s['threads']} thread(s). Time group: median of {s['steps']} measured steps after {s['warmup']} warm-up, "
        f"interleaved over {s['rounds']} rounds. Memory group: {s['warmup']} + 1 steps. Every run is a fresh process.",
        f"- Machine: {result['machine']['cpus']} CPUs, shared with other jobs (load average at the end "
        f"{[round(x, 2) for x in result['machine']['loadavg_at_end']]}); wall time {result['wall_time_s'] / 60:.1f} "
        "min.",
        "",
        "| config | step time (s) | peak RSS (MiB) | peak RSS above import baseline (MiB) | "
        "training-phase peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in result["summary"].items():
        phase = row["train_phase_peak_rss_mib"]
        lines.append(f"| {name} | {row['step_time_s']:.2f} | {row['peak_rss_mib']:.0f} | "
                     f"{row['peak_rss_above_baseline_mib']:.0f} | {'n/a' if phase is None else f'{phase:.0f}'} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in result["ratios"].items()]
    lines += ["", "| target | met |", "|---|---|"]
    lines += [f"| {k} | {'yes' if v else 'NO'} |" for k, v in result["targets_met"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
