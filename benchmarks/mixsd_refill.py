"""MixSD rejection sampling with refilled slots (continuous batching) vs fixed batches, same model, same targets.

Both build the targets of the same facts with `rejection_sample` (λ, T = 0, retries, the official `boxed` rule):
the peer decodes fixed batches with `mixed_generate` (a batch shrinks as sequences finish, retries wait for the next
round, the default); `refill=True` refills a finished sequence's slot at once. The targets must be identical (checked); the ratio
of wall times is the gain. Interleaved repeats, median reported.

Example (the command of the committed results):
  python benchmarks/mixsd_refill.py --num-entities 4 --max-new-tokens 24 --batch-size 4 --max-retries 1 --repeats 3 \
      --threads 1 --out benchmarks/results/mixsd_refill_cpu.json --markdown benchmarks/results/mixsd_refill_cpu.md
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import torch
from _report import write_report  # benchmarks/ is on sys.path when a script runs


def _markdown(r: dict) -> str:
    a = r["args"]
    return "\n".join([
        "# MixSD rejection sampling: refilled slots vs fixed batches (CPU)",
        "",
        f"Command: `{r['command']}`",
        "",
        f"`{a['model']}` (fp32, {r['threads']} threads), {r['num_facts']} facts, λ = {a['lambda_mix']}, T = 0, "
        f"max_new_tokens {a['max_new_tokens']}, max_retries {a['max_retries']}, generation batch {a['batch_size']}; "
        f"{r['targets_tokens']} target tokens, {r['attempts']} attempts in all. Median of {a['repeats']} "
        "interleaved runs; the two build identical targets (checked).",
        "",
        "| decoder | seconds |",
        "|---|---:|",
        f"| fixed batches (`mixed_generate`, one round per attempt) | {r['seconds']['fixed']:.1f} |",
        f"| refilled slots (`refill=True`) | {r['seconds']['refill']:.1f} |",
        "",
        f"**Speed-up refill / fixed: {r['speedup']:.2f}x**",
        "",
    ])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-entities", type=int, default=8, help="2 facts per entity")
    parser.add_argument("--lambda-mix", type=float, default=0.3)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--max-retries", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    if args.threads:  # 1 on a shared machine: torch's threads then do not wait on each other
        torch.set_num_threads(args.threads)

    from trl_sdx.data import make_knowledge_dataset
    from trl_sdx.mixsd import mixed_generate, rejection_sample, stop_token_ids
    from trl_sdx.mixsd.prompts import FACT_PREFIX, FACT_TRANSITION, build_prompt_ids
    from trl_sdx.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=torch.float32).eval()
    train = make_knowledge_dataset(args.num_entities, seed=0)["train"]
    kwargs = dict(chat_template_kwargs={"enable_thinking": False})
    naive, expert = build_prompt_ids(tokenizer, train["question"], train["answer"], FACT_PREFIX, FACT_TRANSITION,
                                     **kwargs)
    common = dict(lambda_mix=args.lambda_mix, max_new_tokens=args.max_new_tokens, max_retries=args.max_retries,
                  batch_size=args.batch_size, seed=0, eos_token_id=stop_token_ids(tokenizer, model))
    runs = {
        "fixed": lambda: rejection_sample(model, tokenizer, naive, expert, train["answer"], **common,
                                          decoder=functools.partial(mixed_generate, model, return_sources=True)),
        "refill": lambda: rejection_sample(model, tokenizer, naive, expert, train["answer"], refill=True, **common),
    }
    timings, targets = {name: [] for name in runs}, {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            targets[name] = [t.to_dict() for t in run()]
            timings[name].append(time.perf_counter() - start)
    assert targets["fixed"] == targets["refill"], "the two decoders built different targets"
    seconds = {name: statistics.median(values) for name, values in timings.items()}
    result = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "args": vars(args), "threads": torch.get_num_threads(), "num_facts": len(naive),
        "targets_tokens": sum(len(t["completion_ids"]) for t in targets["refill"]),
        "attempts": sum(t["attempts"] for t in targets["refill"]),
        "seconds": seconds, "seconds_all": timings, "speedup": seconds["fixed"] / seconds["refill"],
    }
    print(_markdown(result))
    write_report(result, args.out, args.markdown, _markdown)
    return result


if __name__ == "__main__":
    main()
