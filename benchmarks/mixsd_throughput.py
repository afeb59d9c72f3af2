"""Throughput of MixSD mixed decoding vs plain greedy `model.generate`, same model, same batch.

Mixed decoding runs both conditionals (naive x⁻ and expert x⁺, the expert prompt being longer since it holds the
gold answer) in one KV-cached forward of 2B rows per step; plain generation runs the B naive prompts. Both decode
exactly `--new-tokens` tokens per sequence (EOS disabled), so tokens/s is B * new_tokens / wall time, and the ratio
mixed / plain is the cost of building MixSD targets relative to ordinary sampling. Target: ratio >= 0.5.

Each method is timed `--repeats` times after one warm-up, interleaved (plain, mixed, plain, mixed, ...) so load
from other processes hits both alike; the median time is reported.

Example (the command of the committed results):
  python benchmarks/mixsd_throughput.py --model smollm2-135m-instruct --batch-size 8 --new-tokens 64 \
      --out benchmarks/results/mixsd_throughput_cpu.json --markdown benchmarks/results/mixsd_throughput_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch


def _prompts(tokenizer, batch_size: int):
    from trl_sdx.data import make_knowledge_dataset
    from trl_sdx.mixsd.prompts import FACT_PREFIX, FACT_TRANSITION, build_prompt_ids

    train = make_knowledge_dataset(max(1, (batch_size + 1) // 2), seed=0)["train"].select(range(batch_size))
    return build_prompt_ids(tokenizer, train["question"], train["answer"], FACT_PREFIX, FACT_TRANSITION)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--lambda-mix", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import GenerationConfig

    from trl_sdx.mixsd import mixed_generate
    from trl_sdx.mixsd.mixed_decoding import _left_pad
    from trl_sdx.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model).eval()
    naive, expert = _prompts(tokenizer, args.batch_size)
    input_ids, attention_mask = _left_pad(naive, tokenizer.pad_token_id, "cpu")
    n = args.new_tokens
    plain_config = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                                    pad_token_id=tokenizer.pad_token_id)

    def plain():
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=plain_config)
        return out.shape[0] * (out.shape[1] - input_ids.shape[1])

    def mixed():
        out = mixed_generate(model, naive, expert, lambda_mix=args.lambda_mix, max_new_tokens=n, eos_token_id=[],
                             generator=torch.Generator().manual_seed(0))
        return sum(len(s) for s in out)

    timings = {"plain_generate": [], "mixed_generate": []}
    tokens = {}
    for fn in (plain, mixed):  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in (("plain_generate", plain), ("mixed_generate", mixed)):
            start = time.perf_counter()
            tokens[name] = fn()
            timings[name].append(time.perf_counter() - start)
    assert tokens["plain_generate"] == tokens["mixed_generate"] == args.batch_size * n, tokens
    result = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "model": args.model,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "batch_size": args.batch_size,
        "new_tokens": n,
        "lambda_mix": args.lambda_mix,
        "naive_prompt_tokens_mean": statistics.mean(map(len, naive)),
        "expert_prompt_tokens_mean": statistics.mean(map(len, expert)),
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "seconds": {k: statistics.median(v) for k, v in timings.items()},
        "seconds_all": timings,
    }
    result["tokens_per_second"] = {k: args.batch_size * n / v for k, v in result["seconds"].items()}
    result["ratio_mixed_over_plain"] = (result["tokens_per_second"]["mixed_generate"]
                                        / result["tokens_per_second"]["plain_generate"])
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    if args.markdown:
        tps = result["tokens_per_second"]
        lines = [
            "# MixSD mixed decoding throughput (CPU)",
            "",
            f"Command: `{result['command']}`",
            "",
            f"Model `{args.model}` ({result['num_parameters'] / 1e6:.0f}M parameters, fp32), batch {args.batch_size}, "
            f"{n} new tokens per sequence (EOS disabled), λ = {args.lambda_mix}, {result['threads']} threads; "
            f"prompts: naive {result['naive_prompt_tokens_mean']:.0f} / expert "
            f"{result['expert_prompt_tokens_mean']:.0f} tokens on average. Median of {args.repeats} interleaved runs.",
            "",
            "| method | seconds | tokens/s |",
            "|---|---:|---:|",
            f"| `model.generate` (greedy, naive prompts) | {result['seconds']['plain_generate']:.2f} | "
            f"{tps['plain_generate']:.1f} |",
            f"| `mixed_generate` (both conditionals, one KV cache) | {result['seconds']['mixed_generate']:.2f} | "
            f"{tps['mixed_generate']:.1f} |",
            "",
            f"**Ratio mixed / plain: {result['ratio_mixed_over_plain']:.2f}x** (target >= 0.5x).",
            "",
        ]
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
