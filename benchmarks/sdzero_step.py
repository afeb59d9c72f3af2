"""SD-Zero Phase 2 step time and peak memory vs TRL's experimental `SDPOTrainer`, on CPU, at equal batch and lengths.

Model: a randomly initialised Llama (SmolLM2's tokenizer and vocabulary, 49,152 tokens) of ~`--layers`/`--hidden`
size (default ~176M parameters, untied embeddings) so memory is dominated by weights. Every configuration runs in a
fresh subprocess (clean peak RSS) and trains `--warmup + --steps` optimizer steps; the step time is the median of
the measured steps (generation + teacher + student forward/backward + optimizer), the peak memory is the process's
peak RSS (`ru_maxrss`), reported also net of the RSS after imports (the Python/torch baseline).

Equal work: B completions per step in both trainers, every completion exactly `--completion-len` tokens
(`min_new_tokens`), top-k 64 distillation only (SDPO: `distillation_weight=1`, `distillation_mode='topk_logits'`,
frozen `teacher_model_kind='base'` copy, 2 generations per prompt with every rollout rewarded so every sample gets
a peer-solution teacher prompt; SD-Zero: 1 generation per prompt, frozen copy teacher, reward 1). Both teacher
inputs hold the prompt, one completion-sized context and the scored completion.

Configurations:
  sdpo_full            SDPOTrainer, full fine-tuning, frozen copy teacher               (time baseline)
  sdzero_full          SDZeroTrainer, full fine-tuning, frozen copy teacher, fused loss  (time: <= 1.15x sdpo_full)
  sdzero_full_plain    same with the plain full-logits loss                              (information)
  sdzero_lora_copy     SDZeroTrainer, LoRA, separate frozen copy teacher                 (memory baseline)
  sdzero_lora_disable  SDZeroTrainer, LoRA, adapter-disabled teacher                     (memory: <= 0.6x lora_copy)

The time pair (sdpo_full, sdzero_full) runs `--rounds` times interleaved, so load from other processes hits both
alike; ratios use the median over rounds.

Command of the committed results:
  python benchmarks/sdzero_step.py --out benchmarks/results/sdzero_step_cpu.json \
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

CONFIGS = ("sdpo_full", "sdzero_full", "sdzero_full_plain", "sdzero_lora_copy", "sdzero_lora_disable")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


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
    """Wall time of each optimizer step (TrainerCallback interface, imported lazily)."""

    def __init__(self):
        self.times, self._start = [], None

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
        "threads": threads,
    }


def _run(name: str, args, model_dir: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--worker", name, "--model-dir", model_dir, "--batch", str(args.batch),
               "--completion-len", str(args.completion_len), "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--threads", str(args.threads), "--worker-out", os.path.join(out, "r.json")]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        with open(os.path.join(out, "r.json")) as f:
            result = json.load(f)
    print(f"  {name:<22} step {result['step_time_s_median']:7.2f}s  peak RSS {result['peak_rss_mib']:8.0f} MiB "
          f"(+{result['peak_rss_above_baseline_mib']:.0f} over baseline)", flush=True)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--completion-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="measured optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured first steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repeats of the time pair")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
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
    with tempfile.TemporaryDirectory() as model_dir:
        model_info = build_model(model_dir, args.hidden, args.layers, seed=0)
        print(f"model: {model_info}", flush=True)
        runs: dict[str, list[dict]] = {name: [] for name in args.configs}
        time_pair = [c for c in ("sdpo_full", "sdzero_full") if c in args.configs]
        for _ in range(args.rounds):
            for name in time_pair:
                runs[name].append(_run(name, args, model_dir))
        for name in args.configs:
            if name not in time_pair:
                runs[name].append(_run(name, args, model_dir))

    summary = {name: {"step_time_s": statistics.median(r["step_time_s_median"] for r in rs),
                      "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                      "peak_rss_above_baseline_mib": max(r["peak_rss_above_baseline_mib"] for r in rs)}
               for name, rs in runs.items() if rs}
    ratios = {}
    if {"sdpo_full", "sdzero_full"} <= set(summary):
        ratios["time_sdzero_full_over_sdpo_full"] = (summary["sdzero_full"]["step_time_s"]
                                                     / summary["sdpo_full"]["step_time_s"])
        ratios["peak_rss_sdzero_full_over_sdpo_full"] = (summary["sdzero_full"]["peak_rss_mib"]
                                                         / summary["sdpo_full"]["peak_rss_mib"])
    if {"sdzero_full", "sdzero_full_plain"} <= set(summary):
        ratios["time_fused_over_plain"] = (summary["sdzero_full"]["step_time_s"]
                                           / summary["sdzero_full_plain"]["step_time_s"])
    if {"sdzero_lora_copy", "sdzero_lora_disable"} <= set(summary):
        ratios["peak_rss_disable_adapter_over_copy"] = (summary["sdzero_lora_disable"]["peak_rss_mib"]
                                                        / summary["sdzero_lora_copy"]["peak_rss_mib"])
        ratios["peak_rss_above_baseline_disable_adapter_over_copy"] = (
            summary["sdzero_lora_disable"]["peak_rss_above_baseline_mib"]
            / summary["sdzero_lora_copy"]["peak_rss_above_baseline_mib"])
    targets = {
        f"{key} <= {bound}": ratios.get(key, float("inf")) <= bound
        for key, bound in (("time_sdzero_full_over_sdpo_full", 1.15), ("peak_rss_disable_adapter_over_copy", 0.6))
    }
    result = {
        "benchmark": "sdzero_step",
        "command": "python benchmarks/sdzero_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: getattr(args, k) for k in ("batch", "completion_len", "steps", "warmup", "rounds", "threads")},
        "model": model_info,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
        "runs": runs,
        "summary": summary,
        "ratios": ratios,
        "targets_met": targets,
        "wall_time_s": time.time() - started,
    }
    print(json.dumps({"summary": summary, "ratios": ratios, "targets_met": targets}, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(to_markdown(result))
    return result


def to_markdown(result: dict) -> str:
    s, m = result["settings"], result["model"]
    lines = [
        "# SD-Zero Phase 2 step vs TRL SDPOTrainer (CPU)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Model: random-init Llama, {m['parameters'] / 1e6:.0f}M parameters (hidden {m['hidden']}, {m['layers']} "
        f"layers, vocab {m['vocab']}, fp32). Batch {s['batch']} completions/step, every completion "
        f"{s['completion_len']} tokens, top-k 64, {s['threads']} threads; median of {s['steps']} measured steps after "
        f"{s['warmup']} warm-up, time pair interleaved over {s['rounds']} rounds, each run in a fresh process. "
        f"Machine: {result['machine']['cpus']} CPUs, load average at the end {result['machine']['loadavg_at_end']} "
        "(shared machine).",
        "",
        "| config | step time (s) | peak RSS (MiB) | peak RSS above import baseline (MiB) |",
        "|---|---:|---:|---:|",
    ]
    for name, row in result["summary"].items():
        lines.append(f"| {name} | {row['step_time_s']:.2f} | {row['peak_rss_mib']:.0f} | "
                     f"{row['peak_rss_above_baseline_mib']:.0f} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in result["ratios"].items()]
    lines += ["", "| target | met |", "|---|---|"]
    lines += [f"| {k} | {'yes' if v else 'NO'} |" for k, v in result["targets_met"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
