"""Does MixSD forget less than SFT on the gold answer at the same memorisation? `MixSDTrainer` (λ ∈ {0, 0.3, 0.5})
versus TRL's `SFTTrainer` on the gold answers y*, in a synthetic world built to isolate the mechanism.

Task (benchmarks/efficacy/mixsd_world.py). A tiny Llama (hidden 128, 4 layers, BPE vocabulary 1024 learnt from the
world's text) is pre-trained in-process (tiny_world.py) on (a) facts about known entities, asked and answered in its
own style ("The profession of X is \\boxed{potter}."), (b) the reading skill: questions about other entities with a
human-written answer y* in the official KGFact expert prompt, answered in the own style, (c) generic skills
(counting, repeating). It is built once (seed 0) and is the same base for every run, like the paper's one
checkpoint; the seeds vary what is injected and how. The injected facts are about entities never seen in
pre-training (4 attributes each); their gold y* is human-phrased ("According to the town ledger, X has worked for
many years as a potter.\\n\\nFinal answer: \\boxed{potter}").

Arms, all from the same base weights, same facts, steps, batch, optimiser and lr grid per seed:
  SFT on y*    `SFTTrainer` on (question, y*) prompt/completion rows (completion-only NLL);
  MixSD λ      `MixSDTrainer` with the official KGFact PREFIX/TRANSITION, T = 0, the strict rule
               (`boxed_answer_checker`: last \\boxed{} equals the gold one exactly, targets must end at EOS),
               max_retries 100 (official), failed targets dropped and counted; SFT on the kept targets.
Optimiser (paper): AdamW, weight decay 0.01, betas (0.9, 0.95), constant lr after warm-up.

Measured: memorisation = strict greedy accuracy on the injected questions (every fact, dropped ones included),
every `mem_every` steps; at step 0, every `eval_every` steps, at the end and at the first checkpoint where
memorisation ≥ 0.9 ("matched checkpoint"): retention = strict greedy accuracy on the reported probes (known facts
the base answers correctly, so the base scores 1.0), the same on the validation probes (disjoint), and the KL to the
base, KL(π_base ‖ π_θ) per token on the base's greedy completions of held-out generic prompts. Evaluation answers
get `eval_max_new_tokens` = the longest training target (y* or the MixSD cap) + 16; cut-off answers are counted.
Also: the base model's NLL of the training targets (share of tokens with NLL > 5, y* versus MixSD targets).

Pre-registered rule (written and committed before the full run; the results' markdown repeats it):
  R0. Within reach, checked first: λ = 0 must pass the strict rule on ≥ 90% of the injected facts (per seed and
      pooled), and ≥ 300 probes must remain after keeping those the base answers correctly. Both are reported; if
      either fails the comparison is reported as out of reach, not as a result about MixSD.
  R1. Matched checkpoint of a run: the first evaluated step (every `mem_every` steps) at which memorisation ≥ 0.9.
      Learning rate, chosen per arm separately: among the lrs of the grid at which every seed reaches a matched
      checkpoint, the one with the highest seed-mean validation-probe accuracy at the matched checkpoint (ties
      within 1e-6 → the smaller lr). An arm with no such lr is reported at the lr with the highest seed-mean final
      memorisation, at its last step, marked "did not reach 0.9", and takes no part in R3.
  R2. Primary outcome: retention (accuracy on the reported probes, base = 1.0) at the matched checkpoint, MixSD
      λ = 0.3 − SFT on y*, paired by seed (same injected facts, data order and initial weights). Secondary: the same
      for λ = 0 and λ = 0.5; KL to the base on generic prompts at the matched checkpoint; the step of the matched
      checkpoint; the share of target tokens with base NLL > 5 (y* versus MixSD targets).
  R3. Claim. "MixSD retains more than SFT" only when the 95% t-interval of the paired difference (MixSD − SFT) of
      retention excludes 0 in MixSD's favour (for KL: below 0); "SFT retains more" symmetrically; otherwise "no
      difference detected at this size" (a null result, reported as such).
end of rule

Example (≈ 30 min on 2 idle CPU cores, pre-training included; --base-cache keeps the pre-trained base for reruns):
  python benchmarks/efficacy/mixsd_vs_sft.py --size full --base-cache outputs/mixsd_efficacy/base.pt \
      --out-prefix benchmarks/results/mixsd_efficacy
Toy size (CI, tests/test_efficacy_mixsd_toy.py): --size toy.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script: its siblings
from common import (  # noqa: E402
    aggregate_curves, apply_overrides, best_setting, format_interval, header_lines, mean_interval,
    reading_and_plot_lines, write_outputs)
from common import verdict as common_verdict  # noqa: E402
import mixsd_world  # noqa: E402
import tiny_world  # noqa: E402

SFT_ARM = "SFT on y*"
ARMS = {SFT_ARM: None, "MixSD λ=0": 0.0, "MixSD λ=0.3": 0.3, "MixSD λ=0.5": 0.5}
PRIMARY_ARM = "MixSD λ=0.3"
MATCH_THRESHOLD = 0.9
FULL_METRICS = ("memorisation", "retention", "validation_retention", "kl_generic")
# What the base model depends on (a --base-cache file is reused only for the same values).
BASE_RECIPE = ("known_entities", "reading_entities", "generic_train", "generic_eval", "spare_names", "hidden", "layers",
               "pretrain_steps", "pretrain_batch", "pretrain_lr")
SIZES = {
    "toy": dict(known_entities=8, reading_entities=8, generic_train=24, generic_eval=4, spare_names=2, hidden=32,
                layers=2, pretrain_steps=10, pretrain_batch=16, pretrain_lr=3e-3, validation_probes=2,
                injected_entities=1, steps=2, batch_size=4, mem_every=1, eval_every=2, seeds=[0, 1], lrs=[1e-3],
                max_new_tokens=32, max_retries=2, min_probes=0,
                keep_failed=True),  # an untrained base passes nothing: keep its targets, so the arms still run
    "full": dict(known_entities=130, reading_entities=150, generic_train=200, generic_eval=64, spare_names=200,
                 hidden=128, layers=4, pretrain_steps=700, pretrain_batch=64, pretrain_lr=4e-3, validation_probes=100,
                 injected_entities=10, steps=120, batch_size=8, mem_every=4, eval_every=40, seeds=[0, 1, 2],
                 lrs=[3e-4, 1e-3, 3e-3], max_new_tokens=64, max_retries=100, min_probes=300, keep_failed=False),
}


# --- the base model and what is measured on it -------------------------------------------------------------------


def build_base(p: dict, log, cache: str | None = None):
    """The world, its tokenizer and the pre-trained base (cached in `cache` when given: same sizes, same weights)."""
    from trl_sdx.testing import make_tiny_model

    world = mixsd_world.build_world(p["known_entities"], p["reading_entities"], p["generic_train"],
                                    p["generic_eval"], num_spare_names=p["spare_names"])
    tokenizer = tiny_world.train_chat_tokenizer(mixsd_world.tokenizer_corpus(world), vocab_size=1024)
    model = make_tiny_model(tokenizer, seed=0, hidden_size=p["hidden"], num_layers=p["layers"])
    recipe = {key: p[key] for key in BASE_RECIPE}
    started = time.perf_counter()
    if cache and os.path.exists(cache):
        saved = torch.load(cache)
        if saved["recipe"] != recipe:
            raise ValueError(f"--base-cache {cache} was pre-trained with {saved['recipe']}, this run needs {recipe}: "
                             "delete it or name another file.")
        model.load_state_dict(saved["state_dict"])
        info = saved["info"]
        log(f"[mixsd efficacy] base model read from {cache} (pre-trained in {info['pretrain_seconds']} s)")
    else:
        losses = tiny_world.pretrain_on_chats(model, tokenizer, mixsd_world.pretraining_chats(world),
                                              steps=p["pretrain_steps"], lr=p["pretrain_lr"],
                                              batch_size=p["pretrain_batch"], seed=0, log=log, log_every=100)
        info = {"pretrain_seconds": round(time.perf_counter() - started, 1),
                "pretrain_final_loss": sum(losses[-20:]) / len(losses[-20:]),
                "parameters": sum(t.numel() for t in model.parameters()), "vocab_size": len(tokenizer)}
        if cache:
            os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
            torch.save({"recipe": recipe, "state_dict": model.state_dict(), "info": info}, cache)
    model.eval()
    return world, tokenizer, model, info


def strict_accuracy(model, tokenizer, questions, golds, max_new_tokens: int) -> dict:
    from trl_sdx.mixsd.answers import boxed_answer_checker
    from trl_sdx.mixsd.evaluation import answer_accuracy

    return answer_accuracy(model, tokenizer, list(questions), list(golds), answer_checker=boxed_answer_checker,
                           max_new_tokens=max_new_tokens, batch_size=64)


def select_probes(world, tokenizer, base, p: dict, max_new_tokens: int) -> dict:
    """Known facts the base answers correctly (strict rule), split into validation (lr choice) and reported."""
    result = strict_accuracy(base, tokenizer, [f.question for f in world.known], [f.value for f in world.known],
                             max_new_tokens)
    correct = [f for f, ok in zip(world.known, result["correct"]) if ok]
    random.Random("mixsd-probe-split").shuffle(correct)
    validation, reported = correct[:p["validation_probes"]], correct[p["validation_probes"]:]
    return {"validation": validation, "reported": reported,
            "check": {"known_facts": len(world.known), "base_correct": len(correct),
                      "base_known_accuracy": result["accuracy"], "base_cut_off": result["num_cut_off"],
                      "validation_probes": len(validation), "reported_probes": len(reported)}}


class Evaluator:
    """Everything measured on a model during injection (one per seed: its injected facts)."""

    def __init__(self, tokenizer, base, injected, probes, generic_refs, max_new_tokens: int):
        self.tokenizer, self.base, self.injected, self.probes = tokenizer, base, injected, probes
        self.generic_refs, self.max_new_tokens = generic_refs, max_new_tokens

    def memorisation(self, model) -> dict:
        r = strict_accuracy(model, self.tokenizer, [f.question for f in self.injected],
                            [f.gold_answer for f in self.injected], self.max_new_tokens)
        return {"memorisation": r["accuracy"], "injected_cut_off": r["num_cut_off"]}

    @torch.no_grad()
    def full(self, model) -> dict:
        from trl_sdx.entropy_gkd.evaluation import distillation_gap

        out = self.memorisation(model)
        for key, facts in (("retention", self.probes["reported"]), ("validation_retention", self.probes["validation"])):
            r = strict_accuracy(model, self.tokenizer, [f.question for f in facts], [f.value for f in facts],
                                self.max_new_tokens)
            out[key], out[f"{key}_cut_off"] = r["accuracy"], r["num_cut_off"]
        out["kl_generic"] = distillation_gap(model, self.base, self.generic_refs)["kl_teacher_student"]
        return out


# --- one injection run ---------------------------------------------------------------------------------------------


def _config(arm_lambda, output_dir: str, lr: float, seed: int, p: dict, cache_dir: str):
    from trl import SFTConfig

    from trl_sdx.mixsd import MixSDConfig

    common = dict(output_dir=output_dir, learning_rate=lr, max_steps=p["steps"],
                  per_device_train_batch_size=p["batch_size"], lr_scheduler_type="constant_with_warmup",
                  warmup_steps=max(1, p["steps"] // 20), weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95,
                  logging_steps=p["mem_every"], report_to="none", save_strategy="no", use_cpu=True, bf16=False,
                  gradient_checkpointing=False, disable_tqdm=True, seed=seed, data_seed=seed)
    if arm_lambda is None:
        return SFTConfig(**common)
    return MixSDConfig(**common, lambda_mix=arm_lambda, temperature=0.0, max_new_tokens=p["max_new_tokens"],
                       max_retries=p["max_retries"], answer_match="boxed", keep_failed=p["keep_failed"],
                       generation_batch_size=64,
                       mixsd_seed=seed, mixsd_cache_dir=cache_dir)


def run_one(base, tokenizer, injected, evaluator: Evaluator, arm_lambda, lr: float, seed: int, p: dict,
            cache_dir: str, step0: dict) -> dict:
    """Train a copy of the base on the injected facts; the curves, the matched checkpoint and the targets."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTTrainer

    from trl_sdx.mixsd import MixSDTrainer
    from trl_sdx.mixsd.targets import gold_sft_dataset

    facts = Dataset.from_dict({"question": [f.question for f in injected], "answer": [f.gold_answer for f in injected]})
    record = {"mem_curve": [{"step": 0, "memorisation": step0["memorisation"]}], "full_curve": [dict(step0, step=0)],
              "matched": dict(step0, step=0) if step0["memorisation"] >= MATCH_THRESHOLD else None}

    class Evaluate(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            if step % p["mem_every"] and step % p["eval_every"] and step != args.max_steps:
                return
            row = evaluator.memorisation(model)
            record["mem_curve"].append({"step": step, "memorisation": row["memorisation"]})
            reached = row["memorisation"] >= MATCH_THRESHOLD and record["matched"] is None
            if step % p["eval_every"] == 0 or step == args.max_steps or reached:
                full = evaluator.full(model)
                if step % p["eval_every"] == 0 or step == args.max_steps:
                    record["full_curve"].append({"step": step, **full})
                if reached:
                    record["matched"] = {"step": step, **full}

    out = tempfile.mkdtemp(prefix="mixsd_efficacy_")
    try:
        config = _config(arm_lambda, out, lr, seed, p, cache_dir)
        model = copy.deepcopy(base)
        if arm_lambda is None:
            trainer = SFTTrainer(model=model, args=config, train_dataset=gold_sft_dataset(facts),
                                 processing_class=tokenizer, callbacks=[Evaluate()])
        else:
            trainer = MixSDTrainer(model=model, args=config, train_dataset=facts, processing_class=tokenizer,
                                   callbacks=[Evaluate()])
            stats = trainer.mixsd_stats
            record["targets"] = {k: stats[k] for k in ("num_examples", "num_accepted", "num_dropped", "num_truncated",
                                                       "naive_token_share", "mean_retries", "mean_completion_tokens")}
            record["target_texts"] = [t.completion for t in trainer.mixsd_targets.targets]
            record["target_accepted"] = [t.accepted for t in trainer.mixsd_targets.targets]
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        record["final_loss"] = losses[-1] if losses else None
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return record


# --- the rule and the summary --------------------------------------------------------------------------------------


def outcome_of(record: dict) -> dict | None:
    """The matched checkpoint's measurements (R1), or None when the run never reached memorisation ≥ 0.9."""
    return record["matched"]


def choose_lr(runs_of_arm: dict) -> tuple[str | None, bool]:
    """Rule R1: (lr, reached). Among lrs where every seed reaches the matched checkpoint, the highest seed-mean
    validation retention there (ties within 1e-6 → smaller lr); else the highest seed-mean final memorisation."""
    eligible = {lr: [outcome_of(r)["validation_retention"] for r in records] for lr, records in runs_of_arm.items()
                if records and all(outcome_of(r) is not None for r in records)}
    lr = best_setting(eligible, higher_is_better=True)
    if lr is not None:
        return lr, True
    final = {lr: [r["mem_curve"][-1]["memorisation"] for r in records] for lr, records in runs_of_arm.items()}
    return best_setting(final, higher_is_better=True), False


def _reported(record: dict, reached: bool) -> dict:
    return outcome_of(record) if reached else record["full_curve"][-1]


def verdict(diff: dict, higher_is_better: bool) -> str:
    """Rule R3 in words."""
    return common_verdict(diff, ("MixSD", "SFT"), higher_is_better)


def summarise(runs: dict) -> dict:
    """Chosen lr per arm, outcomes at its matched checkpoints, paired differences to SFT, the whole sweep."""
    chosen, outcomes, curves = {}, {}, {}
    for arm, by_lr in runs.items():
        lr, reached = choose_lr(by_lr)
        if lr is None:
            continue
        chosen[arm] = {"lr": lr, "reached": reached}
        rows = [_reported(r, reached) for r in by_lr[lr]]
        outcomes[arm] = {key: mean_interval(row[key] for row in rows) for key in (*FULL_METRICS, "step")}
        curves[arm] = {"memorisation": aggregate_curves([r["mem_curve"] for r in by_lr[lr]], ["memorisation"]),
                       "full": aggregate_curves([r["full_curve"] for r in by_lr[lr]], list(FULL_METRICS))}
    differences = {}
    sft = chosen.get(SFT_ARM)
    for arm, pick in chosen.items():
        if arm == SFT_ARM or sft is None or not (pick["reached"] and sft["reached"]):
            continue
        a, b = runs[arm][pick["lr"]], runs[SFT_ARM][sft["lr"]]
        if len(a) != len(b):
            continue
        differences[arm] = {key: mean_interval(outcome_of(x)[key] - outcome_of(y)[key] for x, y in zip(a, b))
                            for key in ("retention", "kl_generic", "step")}
    sweep = {}
    for arm, by_lr in runs.items():
        for lr, records in by_lr.items():
            matched = [outcome_of(r) for r in records if outcome_of(r) is not None]
            sweep.setdefault(arm, {})[lr] = {
                "reached": f"{len(matched)}/{len(records)}",
                "final_memorisation": mean_interval(r["mem_curve"][-1]["memorisation"] for r in records),
                **({key: mean_interval(m[key] for m in matched) for key in ("step", "retention",
                    "validation_retention", "kl_generic")} if matched else {}),
                "final_retention": mean_interval(r["full_curve"][-1]["retention"] for r in records),
            }
    return {"chosen_lr": chosen, "outcomes": outcomes, "curves": curves, "difference_mixsd_minus_sft": differences,
            "sweep": sweep}


# --- the whole benchmark -------------------------------------------------------------------------------------------


def _eval_max_new_tokens(tokenizer, injected_sets, p: dict) -> int:
    """Longest training target (a y*, or a MixSD target at its cap) + 16, so no correct answer is cut off."""
    longest_gold = max(len(tokenizer(f.gold_answer, add_special_tokens=False)["input_ids"]) + 1
                       for facts in injected_sets for f in facts)
    return max(longest_gold, p["max_new_tokens"]) + 16


def run(p: dict, result: dict, log, save, base_cache: str | None = None, arms=tuple(ARMS)) -> None:
    from trl_sdx.entropy_gkd.evaluation import teacher_references
    from trl_sdx.mixsd.evaluation import target_nll_stats

    world, tokenizer, base, info = build_base(p, log, base_cache)
    injected = {seed: mixsd_world.injected_facts(world, p["injected_entities"], seed) for seed in p["seeds"]}
    max_new = _eval_max_new_tokens(tokenizer, injected.values(), p)
    probes = select_probes(world, tokenizer, base, p, max_new)
    generic_refs = teacher_references(base, tokenizer, [[{"role": "user", "content": q}] for q in world.generic_eval],
                                      max_new_tokens=32)
    check = {**info, **probes["check"], "eval_max_new_tokens": max_new,
             "injected_facts_per_seed": len(next(iter(injected.values()))),
             "generic_eval_prompts": len(world.generic_eval),
             "probes_enough": probes["check"]["reported_probes"] >= p["min_probes"]}
    result["base_check"] = check
    log(f"[mixsd efficacy] base check: {json.dumps(check)}")
    evaluators = {seed: Evaluator(tokenizer, base, injected[seed], probes, generic_refs, max_new)
                  for seed in p["seeds"]}
    step0 = {seed: evaluators[seed].full(base) for seed in p["seeds"]}
    result["base_memorisation"] = mean_interval(step0[s]["memorisation"] for s in p["seeds"])
    runs: dict = {arm: {} for arm in arms}
    result["runs"] = runs
    cache_dir = tempfile.mkdtemp(prefix="mixsd_efficacy_cache_")  # targets built once per (λ, seed), reused per lr
    try:
        for lr in p["lrs"]:
            for arm in arms:
                lam, records = ARMS[arm], []
                for seed in p["seeds"]:
                    started = time.perf_counter()
                    records.append(run_one(base, tokenizer, injected[seed], evaluators[seed], lam, lr, seed, p,
                                           cache_dir, step0[seed]))
                    m = records[-1]["matched"]
                    log(f"[mixsd efficacy] {arm} lr={lr} seed {seed}: {time.perf_counter() - started:.0f} s, "
                        f"matched {m and {k: round(v, 3) for k, v in m.items()}}")
                runs[arm][str(lr)] = records
                result["fingerprint"] = fingerprint(runs, injected, p["seeds"], base, tokenizer, target_nll_stats,
                                                    p["keep_failed"])
                result["within_reach"] = within_reach(runs)
                result.update(summarise(runs))
                save()
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def within_reach(runs: dict) -> dict:
    """R0: the share of injected facts whose λ = 0 target passes the strict rule, per seed and pooled."""
    by_lr = runs.get("MixSD λ=0", {})
    if not by_lr:
        return {}
    records = next(iter(by_lr.values()))
    shares = [r["targets"]["num_accepted"] / r["targets"]["num_examples"] for r in records]
    pooled = sum(r["targets"]["num_accepted"] for r in records) / sum(r["targets"]["num_examples"] for r in records)
    return {"lambda0_pass_share_per_seed": shares, "lambda0_pass_share": pooled,
            "passes_90_percent": pooled >= 0.9 and all(s >= 0.9 for s in shares)}


def fingerprint(runs: dict, injected: dict, seeds, base, tokenizer, target_nll_stats, keep_failed: bool) -> dict:
    """Base NLL of the training targets: share of tokens with NLL > 5 and mean NLL, y* versus MixSD targets (the
    ones trained on: accepted, or all with `keep_failed`)."""
    out = {}
    gold = [target_nll_stats(base, tokenizer, [f.question for f in injected[s]], [f.gold_answer for f in injected[s]])
            for s in seeds]
    out[SFT_ARM] = {"high_nll_share": mean_interval(g["high_nll_share"] for g in gold),
                    "mean_nll": mean_interval(g["mean_nll"] for g in gold)}
    for arm, by_lr in runs.items():
        if arm == SFT_ARM or not by_lr:
            continue
        records = next(iter(by_lr.values()))  # the targets do not depend on the lr
        stats = []
        for seed, r in zip(seeds, records):
            kept = [(f.question, t) for f, t, ok in zip(injected[seed], r["target_texts"], r["target_accepted"])
                    if ok or keep_failed]
            if kept:
                stats.append(target_nll_stats(base, tokenizer, [q for q, _ in kept], [t for _, t in kept]))
        if stats:
            out[arm] = {"high_nll_share": mean_interval(s["high_nll_share"] for s in stats),
                        "mean_nll": mean_interval(s["mean_nll"] for s in stats)}
    return out


# --- outputs ---------------------------------------------------------------------------------------------------


def preregistered_rule() -> str:
    text = __doc__.split("Pre-registered rule")[1].split("end of rule")[0]
    return "Pre-registered rule" + text.rstrip()


def _fmt(stat: dict | None, digits: int = 3) -> str:
    return "—" if stat is None else format_interval(stat, digits)


def _pretrain_note(r: dict) -> str:
    c = r.get("base_check")
    if not c:
        return ""
    if "--base-cache" in r["command"]:  # pre-trained by an earlier run of the same recipe, read back
        return f", plus {c['pretrain_seconds']:.0f} s to pre-train the base (done once, read from --base-cache)"
    return f", of which {c['pretrain_seconds']:.0f} s pre-training the base"


def to_markdown(r: dict) -> str:
    p = r["sizes"]
    lines = header_lines(r, "MixSD versus SFT on the gold answer, at matched memorisation",
                         "differences are paired by seed.", threads="thread(s)", seeds=f"seeds {p['seeds']}",
                         wall_note=_pretrain_note(r))
    lines += ["```", preregistered_rule(), "```", ""]
    c = r.get("base_check")
    if c:
        lines += [
            "## Set-up", "",
            f"Synthetic world (benchmarks/efficacy/mixsd_world.py): {c['known_facts']} known facts "
            f"({p['known_entities']} entities × 4 attributes), {p['reading_entities'] * 4} reading-skill "
            f"conversations, {p['generic_train']} generic ones. Base: tiny Llama, hidden {p['hidden']}, {p['layers']} "
            f"layers, {c['parameters']:,} parameters, vocabulary {c['vocab_size']}, pre-trained "
            f"{p['pretrain_steps']} steps × {p['pretrain_batch']} conversations (lr {p['pretrain_lr']}; final loss "
            f"{c['pretrain_final_loss'] if c['pretrain_final_loss'] is None else round(c['pretrain_final_loss'], 4)}). "
            f"Injection per seed: {c['injected_facts_per_seed']} new facts ({p['injected_entities']} unseen "
            f"entities), {p['steps']} steps of batch {p['batch_size']}, lr grid {p['lrs']}; memorisation every "
            f"{p['mem_every']} steps, full evaluation every {p['eval_every']}; evaluation answers up to "
            f"{c['eval_max_new_tokens']} new tokens. MixSD: T = 0, max_new_tokens {p['max_new_tokens']}, "
            f"max_retries {p['max_retries']}, strict `boxed` rule.", "",
            "## Within reach (R0, checked first)", "",
            f"- Probes: the base answers {c['base_correct']} of {c['known_facts']} known facts correctly under the "
            f"strict rule ({c['base_known_accuracy']:.3f}; {c['base_cut_off']} cut off); {c['validation_probes']} "
            f"validation probes, **{c['reported_probes']} reported probes** "
            f"({'≥' if c['probes_enough'] else '<'} {p['min_probes']}).",
            f"- KL prompts: {c['generic_eval_prompts']} generic prompts held out of pre-training.",
        ]
        w = r.get("within_reach")
        if w:
            lines.append(f"- λ = 0 passes the strict rule on **{w['lambda0_pass_share']:.3f}** of the injected facts "
                         f"(per seed {[round(s, 3) for s in w['lambda0_pass_share_per_seed']]}): "
                         f"{'meets' if w['passes_90_percent'] else 'FAILS'} the ≥ 0.9 requirement.")
        if r.get("base_memorisation"):
            lines.append(f"- The base's memorisation of the injected facts before training: "
                         f"{_fmt(r['base_memorisation'])} (chance: 1/16 per attribute).")
        lines.append("")
    f = r.get("fingerprint")
    if f:
        lines += ["## Target NLL under the base (the mechanism's fingerprint)", "",
                  "| training targets | share of tokens with base NLL > 5 | mean NLL / token |", "|---|---:|---:|"]
        for arm, s in f.items():
            name = "gold y* (SFT)" if arm == SFT_ARM else f"{arm} targets (kept)"
            lines.append(f"| {name} | {_fmt(s['high_nll_share'])} | {_fmt(s['mean_nll'])} |")
        lines.append("")
    if r.get("chosen_lr"):
        lines += ["## Outcomes at the matched checkpoint (R1–R3)", "",
                  "| arm | lr (R1) | step reached | memorisation | retention (primary) | validation retention | "
                  "KL to base (generic) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for arm, pick in r["chosen_lr"].items():
            o = r["outcomes"][arm]
            mark = "" if pick["reached"] else " (did not reach 0.9: last step)"
            lines.append(f"| {arm} | {pick['lr']}{mark} | {_fmt(o['step'], 1)} | {_fmt(o['memorisation'])} | "
                         f"{_fmt(o['retention'])} | {_fmt(o['validation_retention'])} | {_fmt(o['kl_generic'], 4)} |")
        lines += ["", "Paired differences MixSD − SFT at the matched checkpoints:", "",
                  "| arm | Δ retention | R3 verdict | Δ KL to base | R3 verdict (KL) | Δ step reached |",
                  "|---|---:|---|---:|---|---:|"]
        for arm, d in r["difference_mixsd_minus_sft"].items():
            tag = " (primary)" if arm == PRIMARY_ARM else ""
            lines.append(f"| {arm}{tag} | {_fmt(d['retention'])} | {verdict(d['retention'], True)} | "
                         f"{_fmt(d['kl_generic'], 4)} | {verdict(d['kl_generic'], False)} | {_fmt(d['step'], 1)} |")
        lines += ["", "Every setting of the sweep (matched-checkpoint values over the seeds that reached it):", "",
                  "| arm | lr | chosen | seeds reaching 0.9 | step | retention | validation retention | KL | "
                  "final memorisation | final retention |", "|---|---:|:---:|---:|---:|---:|---:|---:|---:|---:|"]
        for arm, by_lr in r["sweep"].items():
            for lr, s in by_lr.items():
                mark = "✓" if r["chosen_lr"].get(arm, {}).get("lr") == lr else ""
                lines.append(f"| {arm} | {lr} | {mark} | {s['reached']} | {_fmt(s.get('step'), 1)} | "
                             f"{_fmt(s.get('retention'))} | {_fmt(s.get('validation_retention'))} | "
                             f"{_fmt(s.get('kl_generic'), 4)} | {_fmt(s['final_memorisation'])} | "
                             f"{_fmt(s['final_retention'])} |")
        first_lr = {arm: next(iter(by_lr.values())) for arm, by_lr in r["runs"].items() if by_lr and arm != SFT_ARM}
        if first_lr:
            lines += ["", "MixSD targets per seed (the same for every lr; dropped = never passed the strict rule):", ""]
            for arm, recs in first_lr.items():
                for seed, rec in zip(p["seeds"], recs):
                    t = rec["targets"]
                    lines.append(f"- {arm}, seed {seed}: {t['num_accepted']}/{t['num_examples']} accepted, "
                                 f"{t['num_dropped']} dropped ({t['num_truncated']} cut off), naive-token "
                                 f"share {t['naive_token_share']:.3f}, mean retries {t['mean_retries']:.2f}, "
                                 f"mean length {t['mean_completion_tokens']:.1f} tokens")
        lines.append("")
    lines += reading_and_plot_lines(r, "mean ± 95% interval over seeds, each arm at its R1 lr; dashed: "
                                       "memorisation 0.9")
    return "\n".join(lines)


def panels(r: dict) -> list[dict]:
    curves = r.get("curves")
    if not curves:
        return []
    mem = [{"label": arm, "curve": c["memorisation"], "metric": "memorisation"} for arm, c in curves.items()]
    full = lambda metric: [{"label": arm, "curve": c["full"], "metric": metric} for arm, c in curves.items()]  # noqa
    return [
        {"title": "memorisation (strict, injected facts)", "ylabel": "accuracy", "series": mem,
         "hline": {"y": MATCH_THRESHOLD, "label": "0.9"}},
        {"title": "retention (held-out probes; base = 1)", "ylabel": "accuracy", "series": full("retention")},
        {"title": "KL(base ‖ model) on generic prompts", "ylabel": "nats / token", "series": full("kl_generic")},
    ]


def main(argv=None) -> dict:
    import datasets

    datasets.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=JSON",
                        help="override any entry of the size, e.g. seeds=[0] (recorded in the results)")
    parser.add_argument("--base-cache", default=None, help="a .pt file: read the pre-trained base from it if it "
                        "exists, else write it there (same sizes only)")
    parser.add_argument("--arms", nargs="+", default=None, choices=list(ARMS), help="run only these arms")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    parser.add_argument("--reading", default=None, help="a text file: the written reading, added to the markdown")
    parser.add_argument("--rewrite", default=None, metavar="JSON",
                        help="no runs: rewrite the outputs of an earlier result (e.g. with --reading)")
    parser.add_argument("--out-prefix", default=None, help="writes <prefix>.json, <prefix>.md and <prefix>.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    p = dict(SIZES[args.size])
    apply_overrides(p, args.set)
    started = time.perf_counter()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if args.rewrite:
        with open(args.rewrite) as f:
            result = json.load(f)
    else:
        result = {"command": "python " + " ".join([os.path.relpath(__file__)] +
                                                 (argv if argv is not None else sys.argv[1:])),
                  "size": args.size, "sizes": p, "overrides": args.set, "arms": args.arms or list(ARMS),
                  "threads": torch.get_num_threads(),
                  "preregistered_rule": preregistered_rule(), "complete": False, "seconds": 0.0}
    if args.reading:
        with open(args.reading) as f:
            result["reading"] = f.read()
    if args.rewrite:
        write_outputs(result, args.out_prefix, to_markdown, panels(result))
        return result

    def save():  # after every finished (arm, lr): a stopped run still leaves what it measured
        result["seconds"] = round(time.perf_counter() - started, 1)
        write_outputs(result, args.out_prefix, to_markdown, panels(result))

    run(p, result, log, save, args.base_cache, args.arms or list(ARMS))
    result["complete"] = True
    save()
    log(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
