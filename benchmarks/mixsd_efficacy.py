"""Knowledge injection on the default model: plain SFT vs MixSD, same data, same steps, same optimiser.

Injects the synthetic fictional facts of `make_knowledge_dataset` into `smollm2-135m-instruct` twice, from the
same base weights: once with plain SFT on the gold answers (`SFTTrainer` on prompt/gold-completion rows), once
with `MixSDTrainer` (targets mixed from the base model's naive and expert conditionals). Reports, for the base and
both trained models:
  memorisation  greedy accuracy on the injected questions,
  probe acc.    greedy accuracy on the held-out probe questions (capitals, small additions, ...),
  retention     probe accuracy relative to the base model's,
and the base model's NLL of both kinds of training targets (mean, share of tokens with NLL > 5).
Answers are graded with `lenient_answer_checker` (final-answer match, or the gold value as a word), alike for all.

Example (the command of the committed results; ~15 min on 2 CPU cores):
  python benchmarks/mixsd_efficacy.py --out benchmarks/results/mixsd_efficacy_cpu.json \
      --markdown benchmarks/results/mixsd_efficacy_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from _report import write_report  # benchmarks/ is on sys.path when a script runs


def _train_config(args, output_dir: str, **extra):
    from trl_sdx.mixsd import MixSDConfig

    return MixSDConfig(
        output_dir=output_dir, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup", warmup_steps=args.warmup_steps, weight_decay=0.01,
        adam_beta1=0.9, adam_beta2=0.95, gradient_checkpointing=False, logging_steps=10, seed=args.seed,
        lambda_mix=args.lambda_mix, max_new_tokens=args.max_new_tokens, max_retries=args.max_retries,
        answer_match=args.answer_match,
        generation_batch_size=args.generation_batch_size, mixsd_cache_dir=args.cache_dir, **extra,
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-entities", type=int, default=25, help="2 facts per entity: 25 → 50 facts")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--lambda-mix", type=float, default=0.3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--max-retries", type=int, default=3)
    parser.add_argument("--answer-match", default="boxed", choices=["boxed", "boxed_or_last_number", "lenient"],
                        help="MixSD rejection rule (the official fact-QA rule by default)")
    parser.add_argument("--generation-batch-size", type=int, default=25)
    parser.add_argument("--eval-max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="MixSD target cache (default: a temporary folder)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()

    from trl import SFTTrainer

    from trl_sdx.data import make_knowledge_dataset
    from trl_sdx.mixsd import MixSDTrainer, evaluate_knowledge_injection, gold_sft_dataset, target_nll_stats
    from trl_sdx.models import load_model, load_tokenizer

    tmp = tempfile.mkdtemp(prefix="mixsd_efficacy_")
    args.cache_dir = args.cache_dir or os.path.join(tmp, "cache")
    data = make_knowledge_dataset(args.num_entities, seed=args.seed)
    train, probe = data["train"], data["probe"]
    tokenizer = load_tokenizer(args.model)
    evaluate = lambda model, base_probe=None: evaluate_knowledge_injection(  # noqa: E731
        model, tokenizer, train, probe, base_probe_accuracy=base_probe, max_new_tokens=args.eval_max_new_tokens,
        batch_size=args.generation_batch_size)
    timings = {}

    # MixSD: its trainer builds the targets from the base weights it is given.
    t0 = time.perf_counter()
    mixsd = MixSDTrainer(load_model(args.model), args=_train_config(args, os.path.join(tmp, "mixsd")),
                         train_dataset=train, processing_class=tokenizer)
    timings["mixsd_targets_s"] = time.perf_counter() - t0
    stats = mixsd.mixsd_stats
    targets = mixsd.mixsd_targets
    kept = targets.kept_indices(False)
    questions = [targets.questions[i] for i in kept]

    # Base model metrics, on the still-untrained weights of the MixSD trainer (no extra copy).
    t0 = time.perf_counter()
    base = evaluate(mixsd.model)
    nll = {
        "sft": target_nll_stats(mixsd.model, tokenizer, train["question"], [a.strip() for a in train["answer"]]),
        "mixsd": target_nll_stats(mixsd.model, tokenizer, questions, [targets.targets[i].completion for i in kept]),
    }
    timings["base_eval_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    mixsd.train()
    timings["mixsd_train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mixsd_result = evaluate(mixsd.model, base["probe_accuracy"])
    timings["mixsd_eval_s"] = time.perf_counter() - t0
    mixsd_loss = [e["loss"] for e in mixsd.state.log_history if "loss" in e]
    del mixsd

    # Plain SFT on the gold answers, same optimiser and steps.
    sft_args = _train_config(args, os.path.join(tmp, "sft"))
    t0 = time.perf_counter()
    sft = SFTTrainer(load_model(args.model), args=sft_args, train_dataset=gold_sft_dataset(train),
                     processing_class=tokenizer)
    sft.train()
    timings["sft_train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sft_result = evaluate(sft.model, base["probe_accuracy"])
    timings["sft_eval_s"] = time.perf_counter() - t0
    sft_loss = [e["loss"] for e in sft.state.log_history if "loss" in e]

    result = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "markdown")},
        "threads": torch.get_num_threads(),
        "num_facts": len(train),
        "num_probe": len(probe),
        "base": base,
        "sft": sft_result,
        "mixsd": mixsd_result,
        "mixsd_target_stats": {k: v for k, v in stats.items() if k != "retries_per_example"},
        "target_nll_under_base": nll,
        "train_loss": {"sft": sft_loss, "mixsd": mixsd_loss},
        "example_targets": [
            {"question": targets.questions[i], "gold": targets.gold_answers[i],
             "mixsd": targets.targets[i].completion, "accepted": targets.targets[i].accepted}
            for i in range(min(3, len(targets.targets)))
        ],
        "seconds": {**{k: round(v, 1) for k, v in timings.items()},
                    "total_s": round(time.perf_counter() - started, 1)},
    }
    print(json.dumps(result, indent=2))
    write_report(result, args.out, args.markdown, _markdown)
    return result


def _markdown(r: dict) -> str:
    a = r["args"]
    s = r["mixsd_target_stats"]

    def row(name, m):
        if "retention" not in m:
            retention = "1.00 (reference)"
        else:
            retention = "n/a" if m["retention"] is None else f"{m['retention']:.2f}"
        return f"| {name} | {m['memorisation']:.2f} | {m['probe_accuracy']:.2f} | {retention} |"

    lines = [
        "# MixSD vs plain SFT: knowledge injection on the default model (CPU)",
        "",
        f"Command: `{r['command']}`",
        "",
        f"`{a['model']}`, {r['num_facts']} fictional facts (`make_knowledge_dataset({a['num_entities']})`), "
        f"{r['num_probe']} held-out probe questions. Both runs start from the same base weights and train "
        f"{a['steps']} steps, batch {a['batch_size']}, lr {a['lr']} (constant after {a['warmup_steps']} warm-up "
        f"steps), AdamW wd 0.01, betas (0.9, 0.95), fp32, full fine-tuning. MixSD: λ = {a['lambda_mix']}, T = 0, "
        f"max_new_tokens {a['max_new_tokens']}, max_retries {a['max_retries']}, "
        f"answer_match {a.get('answer_match', 'boxed')}. Greedy evaluation "
        f"({a['eval_max_new_tokens']} new tokens), graded with `lenient_answer_checker`. {r['threads']} threads, "
        f"total {r['seconds']['total_s']:.0f} s.",
        "",
        "| model | memorisation (injected facts) | probe accuracy | retention (probe / base probe) |",
        "|---|---:|---:|---:|",
        row("base", r["base"]),
        row("plain SFT", r["sft"]),
        row(f"MixSD (λ = {a['lambda_mix']})", r["mixsd"]),
        "",
        "Base model's NLL of the training targets (what each method trains on):",
        "",
        "| targets | mean NLL / token | share of tokens with NLL > 5 | tokens |",
        "|---|---:|---:|---:|",
    ]
    for name, key in (("SFT (gold answers)", "sft"), ("MixSD", "mixsd")):
        n = r["target_nll_under_base"][key]
        lines.append(f"| {name} | {n['mean_nll']:.2f} | {n['high_nll_share']:.3f} | {n['num_tokens']} |")
    lines += [
        "",
        f"MixSD targets: {s['num_kept']}/{s['num_examples']} kept ({s['num_dropped']} dropped after "
        f"{a['max_retries']} retries), naive-token share {s['naive_token_share']:.3f} (λ = {a['lambda_mix']}), "
        f"mean retries {s['mean_retries']:.2f}, built in {s.get('generation_seconds', 0):.0f} s.",
        "",
        "Final training loss (last logged): "
        f"SFT {r['train_loss']['sft'][-1] if r['train_loss']['sft'] else float('nan'):.3f}, "
        f"MixSD {r['train_loss']['mixsd'][-1] if r['train_loss']['mixsd'] else float('nan'):.3f}.",
        "",
        "Example targets:",
        "",
    ]
    for ex in r["example_targets"]:
        lines.append(f"- Q: {ex['question']}  \n  gold: {ex['gold']}  \n  MixSD: {ex['mixsd']!r}"
                     f"{'' if ex['accepted'] else ' (rejected)'}")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
