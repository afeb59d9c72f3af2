"""Throughput of MixSD mixed decoding vs greedy `model.generate` on the expert prompts, same model, same batch.

Mixed decoding runs both conditionals of each sequence: the naive row (question x⁻) and the expert row (x⁺, the
question with the gold answer or a reference solution in context). The peer is what MixSD replaces, plain greedy
decoding of the B expert prompts (the "OPSD-NLL" targets, λ = 0). Every method decodes exactly `--new-tokens` tokens
per sequence (EOS disabled), so tokens/s is B · new_tokens / wall time and the ratio mixed / generate is the price of
mixing. Both KV-cache layouts of `trl_sdx.mixsd.decode_cache` are timed (`shared`: one forward of 2B rows at the
expert width; `split`: a cache per side at its own width, two forwards per step); `auto` is the one its rule picks.

Rows: the fact-QA prompts as they are, then long expert contexts (`--long-ratios`: each gold answer repeated, as a
long reference solution, until the expert prompt is at least that many times the naive one), where the naive rows'
wasted width matters.

Each row's contenders run once to warm up, then `--repeats` times interleaved (generate, shared, split, generate,
...) so load from other processes hits them alike; a ratio is the median over repeats of each repeat's ratio (its
adjacent runs). Only ratios are meant to be compared.

Example (the command of the committed results):
  python benchmarks/mixsd_throughput.py --model smollm2-135m-instruct --batch-size 8 --new-tokens 64 --repeats 5 \
      --threads 1 --out benchmarks/results/mixsd_throughput_cpu.json --markdown benchmarks/results/mixsd_throughput_cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from _report import write_report  # benchmarks/ is on sys.path when a script runs

LAYOUTS = ("shared", "split")


def stretch_expert_prompts(tokenizer, questions, answers, ratio: float, prefix: str, transition: str):
    """(naive, expert) ids where each expert prompt holds its gold answer repeated k times, the least k that makes it
    at least `ratio` times as long as its naive prompt: a long reference solution in context."""
    from trl_sdx.mixsd.prompts import build_prompt_ids

    naive, expert = [], []
    for question, answer in zip(questions, answers, strict=True):
        for repeats in range(1, 10_000):
            n, e = build_prompt_ids(tokenizer, [question], [" ".join([answer] * repeats)], prefix, transition)
            if len(e[0]) >= ratio * len(n[0]):
                break
        naive += n
        expert += e
    return naive, expert


def measure_decoding(model, naive, expert, *, new_tokens: int, repeats: int, pad_token_id: int, now=time.perf_counter,
                     lambda_mix: float = 0.3, layouts: tuple[str, ...] = LAYOUTS) -> dict:
    """Tokens/s of `model.generate` on the expert prompts and of `mixed_generate` in each of `layouts`, and the
    ratios mixed / generate (`mixed_auto`: the layout the `auto` rule picks, when measured). The layouts must decode
    the same tokens (checked)."""
    from transformers import GenerationConfig

    from trl_sdx.mixsd import mixed_generate
    from trl_sdx.mixsd.decode_cache import _left_pad, choose_cache_layout

    device = model.get_input_embeddings().weight.device
    input_ids, attention_mask = _left_pad([list(p) for p in expert], pad_token_id, device)
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              eos_token_id=None, pad_token_id=pad_token_id)
    outputs = {}

    def generate():
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        return out.shape[0] * (out.shape[1] - input_ids.shape[1])

    def mixed(layout):
        def run():
            outputs[layout] = mixed_generate(model, naive, expert, lambda_mix=lambda_mix, max_new_tokens=new_tokens,
                                             eos_token_id=[], generator=torch.Generator().manual_seed(0),
                                             cache_layout=layout)
            return sum(len(s) for s in outputs[layout])
        return run

    contenders = {"model_generate": generate, **{f"mixed_{layout}": mixed(layout) for layout in layouts}}
    for run in contenders.values():  # warm-up
        run()
    times, tokens = {name: [] for name in contenders}, {}
    for _ in range(repeats):
        for name, run in contenders.items():
            start = now()
            tokens[name] = run()
            times[name].append(now() - start)
    if len(set(tokens.values())) != 1 or any(out != outputs[layouts[0]] for out in outputs.values()):
        raise RuntimeError(f"unequal work or different tokens across layouts: {tokens}")
    seconds = {name: statistics.median(t) for name, t in times.items()}
    tps = {name: tokens[name] / s for name, s in seconds.items()}
    auto = choose_cache_layout(model, naive, expert)
    # Each repeat's ratio from its adjacent runs (load drifts between repeats), then the median over repeats.
    ratios = {name: statistics.median(g / m for g, m in zip(times["model_generate"], t, strict=True))
              for name, t in times.items() if name != "model_generate"}
    return {
        "batch": len(naive), "new_tokens": new_tokens,
        "naive_tokens_max": max(map(len, naive)), "expert_tokens_max": max(map(len, expert)),
        "auto_layout": auto, "seconds": seconds, "seconds_all": times, "tokens_per_s": tps,
        "ratio_over_generate": {**ratios, **({"mixed_auto": ratios[f"mixed_{auto}"]} if auto in layouts else {})},
    }


def _markdown(r: dict) -> str:
    a = r["args"]
    lines = [
        "# MixSD mixed decoding throughput vs `model.generate` on the expert prompts (CPU)",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Model `{a['model']}` ({r['num_parameters'] / 1e6:.0f}M parameters, fp32, {r['threads']} threads), batch "
        f"{a['batch_size']}, {a['new_tokens']} new tokens per sequence (EOS disabled), λ = {a['lambda_mix']}. "
        f"Peer: greedy `model.generate` of the expert prompts, same batch. Median of {a['repeats']} interleaved runs "
        "after a warm-up; the two layouts decode identical tokens (checked). Ratios are mixed tokens/s over "
        "`model.generate` tokens/s, each repeat's from its adjacent runs, median over repeats.",
        "",
        "| expert context | naive / expert width (tokens) | `shared` | `split` | `auto` picks | `auto` |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for name, row in r["rows"].items():
        ratio = row["ratio_over_generate"]
        lines.append(f"| {name} | {row['naive_tokens_max']} / {row['expert_tokens_max']} | "
                     f"{ratio['mixed_shared']:.2f}x | {ratio['mixed_split']:.2f}x | {row['auto_layout']} | "
                     f"**{ratio['mixed_auto']:.2f}x** |")
    return "\n".join(lines + [""] + r.get("reading", []) + [""])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--lambda-mix", type=float, default=0.3)
    parser.add_argument("--long-ratios", type=float, nargs="*", default=[4.0, 8.0],
                        help="expert / naive prompt-length ratios of the long-context rows")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from trl_sdx.data import make_knowledge_dataset
    from trl_sdx.mixsd.prompts import FACT_PREFIX, FACT_TRANSITION, build_prompt_ids, resolve_template
    from trl_sdx.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=torch.float32).eval()
    train = make_knowledge_dataset(max(1, (args.batch_size + 1) // 2), seed=0)["train"].select(range(args.batch_size))
    prompts = {"fact QA prompts": build_prompt_ids(tokenizer, train["question"], train["answer"], FACT_PREFIX,
                                                   FACT_TRANSITION)}
    for ratio in args.long_ratios:  # a reference solution in context, as the reasoning template has it
        prompts[f"reference solution, expert ≥ {ratio:g}x naive"] = stretch_expert_prompts(
            tokenizer, train["question"], train["answer"], ratio, *resolve_template("reasoning"))
    rows = {}
    for name, (naive, expert) in prompts.items():
        rows[name] = measure_decoding(model, naive, expert, new_tokens=args.new_tokens, repeats=args.repeats,
                                      pad_token_id=tokenizer.pad_token_id, lambda_mix=args.lambda_mix)
        print(name, rows[name]["ratio_over_generate"], flush=True)
    result = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "args": vars(args), "num_parameters": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(), "device": "cpu", "platform": platform.platform(),
        "torch": torch.__version__, "rows": rows,
    }
    print(_markdown(result))
    write_report(result, args.out, args.markdown, _markdown)
    return result


if __name__ == "__main__":
    main()
