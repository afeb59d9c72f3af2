"""Does the entropy gate help? EOPD (τ = 0.8) versus plain OPD (τ = ∞), the same `EntropyAwareGKDTrainer` for both.

Two settings, each over ≥ 3 seeds with 95% t-intervals (benchmarks/efficacy/common.py):

1. Synthetic, mechanism-isolating. A tiny Llama teacher is trained in-process on a task with K = 4 valid answers
   at a known position (synthetic_modes.py): its entropy there is ≈ ln 4 = 1.39 nats > τ, elsewhere ≈ 0. The
   student (a smaller tiny Llama, fresh per seed) is first fine-tuned on the teacher's greedy completions (one
   answer per prompt, the usual sequence-level-KD start), so its rollouts are well-formed but cover ≈ 1 of the K
   answers. Then on-policy distillation, gate off vs on. Measured against steps: KL(π_T ‖ π_θ) at the multi-modal
   position, the student's entropy there, and coverage@8 (distinct valid completions among 8 samples at T = 1,
   divided by K).
2. Real model. Teacher `smollm2-135m-instruct`, student `smollm2-135m-instruct:half-depth`, synthetic arithmetic
   prompts. Measured on held-out prompts, on the teacher's greedy completions: KL(π_T ‖ π_θ) (via
   `trl_sdx.entropy_gkd.evaluation.distillation_gap`), the student's entropy, and both split by the gate
   (positions where the teacher's entropy is ≥ τ or not).

Both methods run with the same data, the same steps, the same learning-rate sweep, the same per-seed initial
student and the same per-seed prompt order and sampling seed; only `tau` differs.

Pre-registered rule (written before the full runs; the results' markdown repeats it):
  R1. For each method separately (τ = ∞ and τ = 0.8) the reported learning rate is the one of the sweep with the
      lowest mean over seeds of the selection metric at the last step. Ties (within 1e-6) go to the smaller lr; a
      setting with a non-finite value in any seed is never chosen.
  R2. Selection metric. Synthetic: KL(π_T ‖ π_θ) averaged over every position of the teacher's valid completions
      (the distillation objective itself; coverage and entropy play no part). Real model: KL(π_T ‖ π_θ) on the
      teacher's greedy completions of a validation prompt set, disjoint from the training prompts and from the
      held-out prompts the results are reported on.
  R3. Outcomes. Synthetic primary: coverage@8 at the last step; secondary: KL and student entropy at the
      multi-modal position. Real model primary: held-out KL(π_T ‖ π_θ) at the last step; secondary: held-out
      student entropy and the KL on gated positions.
  R4. Claim. "EOPD beats OPD" on an outcome only when the 95% t-interval of the paired per-seed difference
      (EOPD − OPD, same seed) at the last step excludes 0 in EOPD's favour; "OPD beats EOPD" symmetrically;
      otherwise "no difference detected at this size" (a null result, reported as such).
end of rule

Example (≤ 60 min on 2 idle CPU cores):
  python benchmarks/efficacy/eopd_vs_opd.py --size full --out-prefix benchmarks/results/eopd_efficacy
or, as the committed results were made (the two settings as two processes, then merged):
  python benchmarks/efficacy/eopd_vs_opd.py --size full --skip-real --out-prefix outputs/eopd/synthetic &
  python benchmarks/efficacy/eopd_vs_opd.py --size full --skip-synthetic --threads 1 --out-prefix outputs/eopd/real &
  wait; python benchmarks/efficacy/eopd_vs_opd.py --merge outputs/eopd/synthetic.json outputs/eopd/real.json \
      --out-prefix benchmarks/results/eopd_efficacy
Toy size (CI, tests/test_efficacy_toy.py): --size toy, with --real-teacher/--real-student naming tiny models.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script: its siblings
from common import (  # noqa: E402
    aggregate_curves, apply_overrides, best_setting, format_interval, header_lines, mean_interval, paired_difference,
    reading_and_plot_lines, run_seeds, write_outputs)
from common import verdict as common_verdict  # noqa: E402
import synthetic_modes  # noqa: E402

TAU_EOPD = 0.8
METHODS = {"OPD (τ=∞)": float("inf"), "EOPD (τ=0.8)": TAU_EOPD}
SYNTH_METRICS = ("kl_modal", "student_entropy_modal", "student_valid_mass_modal", "coverage_at_k", "valid_share",
                 "pass_at_k", "kl_all_positions", "kl_deterministic", "coverage_first_token_at_k")
REAL_METRICS = ("kl_heldout", "student_nll_heldout", "student_entropy_heldout", "kl_gated", "kl_ungated",
                "student_entropy_gated", "kl_validation")
# (section, metrics, selection metric of rule R2, outcomes compared EOPD − OPD)
SECTIONS = (
    ("synthetic", SYNTH_METRICS, "kl_all_positions",
     ["coverage_at_k", "kl_modal", "student_entropy_modal", "valid_share", "kl_deterministic",
      "coverage_first_token_at_k"]),
    ("real", REAL_METRICS, "kl_validation", ["kl_heldout", "student_entropy_heldout", "kl_gated"]),
)
SIZES = {
    # prompts, K, batch (prompts per optimizer step), steps, eval every, seeds, lr sweep; real-model counterparts
    "toy": dict(num_prompts=8, num_valid=4, batch_size=4, steps=4, eval_every=2, seeds=[0, 1], lrs=[1e-3],
                teacher_steps=30, sft_steps=10, num_samples=4,
                real_prompts=8, real_eval_prompts=4, real_batch_size=2, real_steps=2, real_eval_every=1,
                real_seeds=[0, 1], real_lrs=[1e-4], real_max_completion_length=6),
    "full": dict(num_prompts=32, num_valid=4, batch_size=8, steps=60, eval_every=10, seeds=[0, 1, 2],
                 lrs=[3e-4, 1e-3, 3e-3], teacher_steps=600, sft_steps=150, num_samples=8,
                 real_prompts=64, real_eval_prompts=16, real_batch_size=4, real_steps=16, real_eval_every=8,
                 real_seeds=[0, 1, 2], real_lrs=[3e-5, 1e-5], real_max_completion_length=32),
}


def _config(output_dir: str, tau: float, lr: float, seed: int, steps: int, batch_size: int, max_completion: int,
            logging_steps: int):
    from trl_sdx.entropy_gkd import EntropyAwareGKDConfig

    # The paper's rollout reuse: 4 optimizer steps per rollout (generation batch = 4 × the optimizer batch), so the
    # PPO ratio against π_old is live. Constant lr: the curves compare methods, not schedules.
    return EntropyAwareGKDConfig(
        output_dir=output_dir, tau=tau, learning_rate=lr, max_steps=steps, per_device_train_batch_size=batch_size,
        generation_batch_size=4 * batch_size, max_completion_length=max_completion, temperature=1.0,
        lr_scheduler_type="constant", logging_steps=logging_steps, report_to="none", save_strategy="no",
        use_cpu=True, bf16=False, gradient_checkpointing=False, disable_tqdm=True, seed=seed, data_seed=seed,
    )


def _train_with_evals(student, teacher, tokenizer, prompts, config, evaluate, eval_every: int) -> tuple[list, dict]:
    """Train `student` in place, calling `evaluate(student, step)` at step 0 and every `eval_every` steps."""
    from datasets import Dataset
    from transformers import TrainerCallback

    from trl_sdx.entropy_gkd import EntropyAwareGKDTrainer

    curve = [{"step": 0, **evaluate(student, 0)}]

    class EvalEvery(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % eval_every == 0 or state.global_step == args.max_steps:
                curve.append({"step": state.global_step, **evaluate(model, state.global_step)})

    trainer = EntropyAwareGKDTrainer(model=student, teacher_model=teacher, args=config,
                                     train_dataset=Dataset.from_dict({"prompt": list(prompts)}),
                                     processing_class=tokenizer, callbacks=[EvalEvery()])
    trainer.train()
    logged = [e for e in trainer.state.log_history if "eopd/gate_fraction" in e]
    train_stats = {k: sum(e[k] for e in logged) / len(logged) for k in ("eopd/gate_fraction", "eopd/teacher_entropy")
                   } if logged else {}
    return curve, train_stats


def _sweep(lrs, seeds, run_one, log, label, on_done):
    """runs[method][lr] = per-seed curves, for every method of METHODS and lr of the sweep."""
    runs = {method: {} for method in METHODS}
    for lr in lrs:
        for method, tau in METHODS.items():
            runs[method][str(lr)] = run_seeds(seeds, lambda seed: run_one(seed, tau, lr), log,
                                              f"{label} {method} lr={lr}")
            on_done(runs)
    return runs


def choose_lr(runs_of_method: dict, metric: str) -> str | None:
    """Rule R1: the lr with the lowest seed-mean `metric` at the last step; ties → smaller lr; non-finite excluded."""
    return best_setting({lr: [curve[-1][metric] for curve in curves] for lr, curves in runs_of_method.items()},
                        higher_is_better=False)


def summarise(runs: dict, metrics, selection_metric: str, outcomes: list[str]) -> dict:
    """Chosen lr per method (R1/R2), aggregated curves at it, paired final differences (R4), the full sweep."""
    recorded = next(iter(next(iter(runs.values())).values()))[0][0]  # a results file from before a metric existed
    metrics = [m for m in metrics if m in recorded]
    outcomes = [m for m in outcomes if m in recorded]
    chosen = {method: choose_lr(by_lr, selection_metric) for method, by_lr in runs.items()}
    curves = {m: aggregate_curves(runs[m][lr], metrics) for m, lr in chosen.items() if lr is not None}
    opd, eopd = list(METHODS)
    differences = {}
    if chosen[opd] is not None and chosen[eopd] is not None:
        differences = {metric: paired_difference(runs[eopd][chosen[eopd]], runs[opd][chosen[opd]], metric)
                       for metric in outcomes}
    sweep = {m: {lr: {metric: mean_interval(c[-1][metric] for c in cs) for metric in metrics}
                 for lr, cs in by_lr.items()} for m, by_lr in runs.items()}
    return {"chosen_lr": chosen, "curves": curves, "difference_eopd_minus_opd": differences, "final_by_lr": sweep}


def _progress(section: dict, runs: dict, metrics, selection_metric: str, outcomes, on_progress) -> None:
    """After each finished sweep point: summarise the lrs that every method has finished, then save."""
    section["runs"] = runs
    done = [lr for lr in runs[next(iter(METHODS))] if all(lr in by_lr for by_lr in runs.values())]
    if done:
        section.update(summarise({m: {lr: by_lr[lr] for lr in done} for m, by_lr in runs.items()}, metrics,
                                 selection_metric, outcomes))
        section["lrs_finished"] = done
    on_progress()


def verdict(diff: dict, higher_is_better: bool) -> str:
    """Rule R4 in words."""
    return common_verdict(diff, ("EOPD", "OPD"), higher_is_better)


# --- the synthetic setting -------------------------------------------------------------------------------------


def run_synthetic(p: dict, section: dict, log, on_progress) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # models this small run fastest on one thread (and far faster on a busy machine)
    try:
        _run_synthetic(p, section, log, on_progress)
    finally:
        torch.set_num_threads(threads)


def _run_synthetic(p: dict, section: dict, log, on_progress) -> None:
    from trl_sdx.testing import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    task = synthetic_modes.build_task(tokenizer, p["num_prompts"], p["num_valid"])
    started = time.perf_counter()
    teacher = make_tiny_model(tokenizer, seed=1000, hidden_size=64, num_layers=3)
    synthetic_modes.train_teacher(teacher, task, p["teacher_steps"])
    check = synthetic_modes.teacher_check(teacher, task, TAU_EOPD, p["num_samples"], seed=0)
    check["seconds"] = round(time.perf_counter() - started, 1)
    log(f"[efficacy] synthetic teacher check: {json.dumps(check)}")
    section["teacher_check"] = check
    # The prompt order is the trainer's (data_seed); a prompt appears once per rollout of 4 optimizer batches.
    prompts = task.prompts * max(1, (4 * p["batch_size"]) // len(task.prompts))
    students, sft_checks = {}, {}

    def student_for(seed):
        if seed not in students:  # one SFT'd initial student per seed, shared by both methods and every lr
            student = make_tiny_model(tokenizer, seed=seed, hidden_size=32, num_layers=2)
            synthetic_modes.sft_on_greedy(student, teacher, tokenizer, task, p["sft_steps"], lr=3e-3,
                                          batch_size=32, seed=seed)
            students[seed] = student
            sft_checks[seed] = synthetic_modes.evaluate(student, teacher, task, p["num_samples"], seed=0)
        return copy.deepcopy(students[seed])

    def run_one(seed, tau, lr):
        tmp = tempfile.mkdtemp(prefix="eopd_efficacy_")
        try:
            config = _config(tmp, tau, lr, seed, p["steps"], p["batch_size"], 4, p["eval_every"])
            curve, stats = _train_with_evals(
                student_for(seed), teacher, tokenizer, prompts, config,
                lambda model, step: synthetic_modes.evaluate(model, teacher, task, p["num_samples"], seed=step),
                p["eval_every"])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        curve[-1]["train_stats"] = stats
        return curve

    section["student_after_sft"] = sft_checks
    _, metrics, selection, outcomes = SECTIONS[0]
    _sweep(p["lrs"], p["seeds"], run_one, log, "synthetic",
           lambda runs: _progress(section, runs, metrics, selection, outcomes, on_progress))


# --- the real-model setting ------------------------------------------------------------------------------------


def _disjoint_prompts(n: int, seed: int, exclude: set[str]):
    from trl_sdx.data import make_arithmetic_dataset

    rows = [r for r in make_arithmetic_dataset(2 * n + len(exclude), seed=seed)["prompt"]
            if r[0]["content"] not in exclude]
    return rows[:n]


def _real_eval(student, teacher, refs_test, refs_val, tau: float) -> dict:
    from trl_sdx.entropy_gkd.evaluation import distillation_gap

    gap = distillation_gap(student, teacher, refs_test)
    stats = synthetic_modes.position_stats(student, teacher, refs_test, batch_size=4)
    mask = refs_test.completion_mask.bool()
    gated = mask & (stats["teacher_entropy"] >= tau)
    ungated = mask & ~gated
    mean = lambda x, m: (x[m].mean().item() if m.any() else float("nan"))  # noqa: E731
    return {
        "kl_heldout": gap["kl_teacher_student"],
        "student_nll_heldout": gap["student_nll_of_teacher_text"],
        "kl_heldout_recomputed": mean(stats["kl"], mask),  # cross-check of distillation_gap, same tokens
        "student_entropy_heldout": mean(stats["student_entropy"], mask),
        "kl_gated": mean(stats["kl"], gated),
        "kl_ungated": mean(stats["kl"], ungated),
        "student_entropy_gated": mean(stats["student_entropy"], gated),
        "kl_validation": distillation_gap(student, teacher, refs_val)["kl_teacher_student"],
    }


def run_real(p: dict, teacher_name: str, student_name: str, section: dict, log, on_progress) -> None:
    from trl_sdx.entropy_gkd.evaluation import teacher_references
    from trl_sdx.models import load_model, load_tokenizer

    started = time.perf_counter()
    tokenizer = load_tokenizer(teacher_name)
    teacher = load_model(teacher_name).eval()
    train = _disjoint_prompts(p["real_prompts"], seed=0, exclude=set())
    seen = {r[0]["content"] for r in train}
    test = _disjoint_prompts(p["real_eval_prompts"], seed=1, exclude=seen)
    seen |= {r[0]["content"] for r in test}
    val = _disjoint_prompts(p["real_eval_prompts"] // 2, seed=2, exclude=seen)
    width = p["real_max_completion_length"]
    refs_test = teacher_references(teacher, tokenizer, test, max_new_tokens=width)
    refs_val = teacher_references(teacher, tokenizer, val, max_new_tokens=width)
    stats = synthetic_modes.position_stats(teacher, teacher, refs_test, batch_size=4)
    mask = refs_test.completion_mask.bool()
    gate = mask & (stats["teacher_entropy"] >= TAU_EOPD)
    check = {
        "teacher_entropy_mean": stats["teacher_entropy"][mask].mean().item(),
        "gate_fraction_heldout": (gate.sum() / mask.sum()).item(),
        "teacher_entropy_gated_mean": stats["teacher_entropy"][gate].mean().item() if gate.any() else float("nan"),
        "heldout_tokens": int(mask.sum()),
        "num_train_prompts": len(train), "num_heldout_prompts": len(test), "num_validation_prompts": len(val),
        "seconds": round(time.perf_counter() - started, 1),
    }
    log(f"[efficacy] real-model teacher check: {json.dumps(check)}")
    section.update(teacher=teacher_name, student=student_name, teacher_check=check)

    def run_one(seed, tau, lr):
        tmp = tempfile.mkdtemp(prefix="eopd_efficacy_real_")
        try:
            config = _config(tmp, tau, lr, seed, p["real_steps"], p["real_batch_size"], width, p["real_eval_every"])
            curve, stats = _train_with_evals(load_model(student_name), teacher, tokenizer, train, config,
                                             lambda model, step: _real_eval(model, teacher, refs_test, refs_val,
                                                                            TAU_EOPD), p["real_eval_every"])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        curve[-1]["train_stats"] = stats
        return curve

    _, metrics, selection, outcomes = SECTIONS[1]
    _sweep(p["real_lrs"], p["real_seeds"], run_one, log, "real",
           lambda runs: _progress(section, runs, metrics, selection, outcomes, on_progress))


# --- outputs ---------------------------------------------------------------------------------------------------

HIGHER_IS_BETTER = {"coverage_at_k": True, "valid_share": True, "kl_modal": False, "kl_heldout": False,
                    "kl_gated": False, "kl_deterministic": False, "coverage_first_token_at_k": True}


def preregistered_rule() -> str:
    text = __doc__.split("Pre-registered rule")[1].split("end of rule")[0]
    return "Pre-registered rule" + text.rstrip()


def _outcome_table(section: dict, outcomes: list[tuple[str, str]]) -> list[str]:
    opd, eopd = list(METHODS)
    lines = [f"| outcome | {opd} at step 0 | {opd} last | {eopd} last | EOPD − OPD (paired) | R4 verdict |",
             "|---|---:|---:|---:|---:|---|"]
    for key, name in outcomes:
        if opd not in section["curves"] or eopd not in section["curves"]:
            continue
        first, a, b = (section["curves"][m][i][key] for m, i in ((opd, 0), (opd, -1), (eopd, -1)))
        diff = section["difference_eopd_minus_opd"].get(key)
        if diff is None:
            diff_text = verdict_text = "—"
        else:
            diff_text = format_interval(diff)
            verdict_text = verdict(diff, HIGHER_IS_BETTER[key]) if key in HIGHER_IS_BETTER else "(descriptive)"
        lines.append(f"| {name} | {format_interval(first)} | {format_interval(a)} | {format_interval(b)} | "
                     f"{diff_text} | {verdict_text} |")
    return lines


def _sweep_table(section: dict, metrics: list[tuple[str, str]]) -> list[str]:
    lines = ["| method | lr | chosen | " + " | ".join(name for _, name in metrics) + " |",
             "|---|---:|:---:|" + "---:|" * len(metrics)]
    for method, by_lr in section["final_by_lr"].items():
        for lr, stats in by_lr.items():
            mark = "✓" if section["chosen_lr"].get(method) == lr else ""
            lines.append(f"| {method} | {lr} | {mark} | " + " | ".join(format_interval(stats[k]) for k, _ in metrics)
                         + " |")
    return lines


def _synthetic_markdown(s: dict, p: dict, title: str, note: str = "") -> list[str]:
    c = s["teacher_check"]
    lines = [
        title, "", *([note, ""] if note else []),
        f"{p['num_prompts']} prompts `#XY=`, K = {p['num_valid']} valid completions `m m <|im_end|>` each "
        "(benchmarks/efficacy/synthetic_modes.py). Teacher: tiny Llama (hidden 64, 3 layers) trained "
        f"{p['teacher_steps']} steps on uniformly drawn valid completions. Student: tiny Llama (hidden 32, 2 "
        f"layers), per seed, fine-tuned {p['sft_steps']} steps on the teacher's greedy completions. Distillation: "
        f"{p['steps']} optimizer steps of {p['batch_size']} prompts, 4 optimizer steps per rollout, T = 1, "
        f"constant lr from {p['lrs']}, seeds {p['seeds']}; coverage@k with k = {p['num_samples']}.", "",
        f"**Within reach (checked first).** Teacher entropy at the multi-modal position: mean "
        f"{c['entropy_modal_mean']:.3f}, min {c['entropy_modal_min']:.3f} nats (ln K = {c['ln_K']:.3f}, τ = "
        f"{c['tau']}); share of prompts above τ: {c['share_modal_above_tau']:.2f}; max entropy at the "
        f"deterministic positions {c['entropy_deterministic_max']:.3f}; teacher mass on the valid answers: mean "
        f"{c['valid_mass_modal_mean']:.3f}, min {c['valid_mass_modal_min']:.3f}; the teacher's own coverage@k "
        f"{c['teacher_coverage_at_k']:.3f}, valid share {c['teacher_valid_share']:.3f}.", "",
    ]
    sft = s.get("student_after_sft", {})
    if sft:
        cov = mean_interval(v["coverage_at_k"] for v in sft.values())
        ent = mean_interval(v["student_entropy_modal"] for v in sft.values())
        lines += [f"Student after SFT (step 0): coverage@k {format_interval(cov)}, entropy at the multi-modal "
                  f"position {format_interval(ent)} nats.", ""]
    if "curves" in s:
        lines += [f"Chosen lr (R1, by final `kl_all_positions`): {s['chosen_lr']} (lrs finished for every "
                  f"method: {s['lrs_finished']}).", ""]
        outcomes = [("coverage_at_k", "coverage@k (primary)"),
                    ("kl_modal", "KL(π_T‖π_θ) at the multi-modal position"),
                    ("student_entropy_modal", "student entropy there (nats)"),
                    ("valid_share", "share of valid samples"),
                    ("kl_deterministic", "KL at the deterministic positions"),
                    ("coverage_first_token_at_k", "first-token coverage@k (exact, multi-modal position only)")]
        first_curve = next(iter(s["curves"].values()))
        lines += _outcome_table(s, [o for o in outcomes if o[0] in first_curve[0]])
        lines += ["", "Every setting of the sweep, last step:", ""]
        lines += _sweep_table(s, [("kl_all_positions", "KL all positions (selection)"),
                                  ("coverage_at_k", "coverage@k"), ("kl_modal", "KL modal"),
                                  ("student_entropy_modal", "entropy modal")])
        lines.append("")
    return lines


def to_markdown(r: dict) -> str:
    lines = header_lines(r, "EOPD (τ = 0.8) versus OPD (τ = ∞): does the entropy gate help?",
                         "EOPD − OPD is paired by seed (same initial student, prompt order and sampling seed).")
    if r.get("deviations"):
        lines += ["**Deviations from the planned protocol** (the `SIZES` of the script):", "",
                  *[f"- {d}" for d in r["deviations"]], ""]
    lines += ["```", preregistered_rule(), "```", ""]
    p = r["sizes"]
    if r.get("synthetic"):
        lines += _synthetic_markdown(r["synthetic"], p,
                                     "## 1. Synthetic: a teacher with K valid answers at a known position")
    if r.get("synthetic_followup"):
        f = r["synthetic_followup"]
        lines += _synthetic_markdown(f, f["sizes"], "## 1b. Synthetic, post-hoc follow-up (NOT pre-registered)",
                                     note=f"Run after seeing section 1, to test its reading; command `{f['command']}`. "
                                     "Same task, teacher and SFT'd students; only the steps and the lr list "
                                     "differ. Exploratory: the rule above does not cover it.")
    real = r.get("real")
    if real:
        c = real["teacher_check"]
        lines += [
            f"## 2. Real model: `{real['teacher']}` → `{real['student']}`", "",
            f"Synthetic arithmetic prompts: {c['num_train_prompts']} for training, {c['num_heldout_prompts']} "
            f"held-out (reported), {c['num_validation_prompts']} validation (lr selection), disjoint. "
            f"{p['real_steps']} optimizer steps of {p['real_batch_size']} prompts, 4 per rollout, completions up "
            f"to {p['real_max_completion_length']} tokens, T = 1, constant lr from {p['real_lrs']}, seeds "
            f"{p['real_seeds']}. Metrics on the teacher's greedy completions of the held-out prompts.", "",
            f"**Within reach (checked first).** Teacher entropy on its held-out completions: mean "
            f"{c['teacher_entropy_mean']:.3f} nats; share of positions with H ≥ τ (gated): "
            f"{c['gate_fraction_heldout']:.3f}, their mean entropy {c['teacher_entropy_gated_mean']:.3f} nats "
            f"({c['heldout_tokens']} tokens).", "",
        ]
        if "curves" in real:
            lines += [f"Chosen lr (R1, by final validation KL): {real['chosen_lr']} (lrs finished for every "
                      f"method: {real['lrs_finished']}).", ""]
            lines += _outcome_table(real, [("kl_heldout", "held-out KL(π_T‖π_θ) (primary)"),
                                           ("student_entropy_heldout", "held-out student entropy (nats)"),
                                           ("kl_gated", "KL on gated positions (H_T ≥ τ)"),
                                           ("kl_ungated", "KL on the other positions")])
            lines += ["", "Every setting of the sweep, last step:", ""]
            lines += _sweep_table(real, [("kl_validation", "validation KL (selection)"),
                                         ("kl_heldout", "held-out KL"),
                                         ("student_entropy_heldout", "student entropy")])
            lines.append("")
    lines += reading_and_plot_lines(r, "mean ± 95% interval over seeds, chosen lr per method")
    return "\n".join(lines)


def panels(r: dict) -> list[dict]:
    out = []
    s = r.get("synthetic", {})
    if "curves" in s:
        series = lambda metric: [{"label": m, "curve": c, "metric": metric} for m, c in s["curves"].items()]  # noqa
        c = s["teacher_check"]
        out += [
            {"row": 0, "title": "synthetic: coverage@k of the K valid answers", "ylabel": "coverage@k",
             "series": series("coverage_at_k"), "hline": {"y": c["teacher_coverage_at_k"], "label": "teacher"}},
            {"row": 0, "title": "synthetic: KL(teacher‖student) at the multi-modal position", "ylabel": "nats",
             "series": series("kl_modal")},
            {"row": 0, "title": "synthetic: student entropy there", "ylabel": "nats",
             "series": series("student_entropy_modal"),
             "hline": {"y": c["entropy_modal_mean"], "label": "teacher"}},
        ]
    f = r.get("synthetic_followup", {})
    if "curves" in f:
        series = lambda metric: [{"label": m, "curve": c, "metric": metric} for m, c in f["curves"].items()]  # noqa
        tag = f"post-hoc, {f['sizes']['steps']} steps"
        out += [
            {"row": 1, "title": f"synthetic ({tag}): coverage@k", "ylabel": "coverage@k",
             "series": series("coverage_at_k"), "hline": {"y": f["teacher_check"]["teacher_coverage_at_k"],
                                                          "label": "teacher"}},
            {"row": 1, "title": f"synthetic ({tag}): KL at the multi-modal position", "ylabel": "nats",
             "series": series("kl_modal")},
        ]
        if "coverage_first_token_at_k" in next(iter(f["curves"].values()))[0]:
            out.append({"row": 1, "title": f"synthetic ({tag}): first-token coverage@k", "ylabel": "coverage@k",
                        "series": series("coverage_first_token_at_k")})
    real = r.get("real", {})
    if "curves" in real:
        series = lambda metric: [{"label": m, "curve": c, "metric": metric} for m, c in real["curves"].items()]  # noqa
        out += [
            {"row": 2, "title": "SmolLM2: held-out KL(teacher‖student)", "ylabel": "nats / token",
             "series": series("kl_heldout")},
            {"row": 2, "title": "SmolLM2: held-out student entropy", "ylabel": "nats / token",
             "series": series("student_entropy_heldout"),
             "hline": {"y": real["teacher_check"]["teacher_entropy_mean"], "label": "teacher"}},
            {"row": 2, "title": "SmolLM2: KL on gated positions (H_T ≥ τ)", "ylabel": "nats / token",
             "series": series("kl_gated")},
        ]
    return out


def _concat_seeds(all_runs: list[dict]) -> dict:
    """runs[method][lr] of several processes (each a subset of the seeds), seeds in file order."""
    out = {}
    for runs in all_runs:
        for method, by_lr in runs.items():
            for lr, curves in by_lr.items():
                out.setdefault(method, {}).setdefault(lr, []).extend(curves)
    return out


def _deviations(result: dict) -> list[str]:
    """Where the merged runs differ from the planned protocol of their size (SIZES): said next to the status."""
    planned = SIZES[result["size"]]
    out = [f"{key} = {result['sizes'][key]} (planned {planned[key]})" for key in planned
           if key not in ("lrs", "seeds", "real_lrs", "real_seeds") and result["sizes"].get(key) != planned[key]]
    for section, lrs_key, seeds_key in (("synthetic", "lrs", "seeds"), ("real", "real_lrs", "real_seeds")):
        part = result.get(section)
        if not part:
            out.append(f"{section}: not run")
            continue
        done = sorted(float(lr) for lr in part.get("lrs_finished", []))
        if done != sorted(planned[lrs_key]):
            out.append(f"{section}: learning rates run {done}, planned {sorted(planned[lrs_key])}")
        seeds = sorted({len(curves) for by_lr in part["runs"].values() for curves in by_lr.values()})
        if seeds != [len(planned[seeds_key])]:
            out.append(f"{section}: seeds per setting {seeds}, planned {len(planned[seeds_key])}")
    return out


def _merge(result: dict, paths: list[str], out_prefix: str | None, followup: str | None = None) -> dict:
    """One result from several runs' JSON: each setting from the file that has it; complete only if all were."""
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
    result.update(command=" ; ".join(part["command"] for part in parts), sizes=parts[0]["sizes"],
                  size=parts[0]["size"], threads=parts[0]["threads"], complete=all(part["complete"] for part in parts),
                  seconds=max(part["seconds"] for part in parts))
    for section, metrics, selection, outcomes in SECTIONS:
        have = [part[section] for part in parts if part.get(section, {}).get("runs")]
        if not have:
            continue
        merged = {**have[0], "runs": _concat_seeds([h["runs"] for h in have])}
        _progress(merged, merged["runs"], metrics, selection, outcomes, lambda: None)
        result[section] = merged
        if section == "real":
            real_parts = [part for part in parts if "real" in part]
            seeds = sorted({s for part in real_parts for s in part["sizes"]["real_seeds"]})
            own = {k: v for k, v in real_parts[0]["sizes"].items() if k.startswith("real_")}  # its own overrides
            result["sizes"] = {**result["sizes"], **own, "real_seeds": seeds,
                               "real_lrs": [float(lr) for lr in merged["lrs_finished"]]}
    result["deviations"] = _deviations(result)
    if followup:
        with open(followup) as f:
            extra = json.load(f)
        result["synthetic_followup"] = {**extra["synthetic"], "sizes": extra["sizes"], "command": extra["command"],
                                        "complete": extra["complete"]}
    write_outputs(result, out_prefix, to_markdown, panels(result))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--seeds", type=int, nargs="+", help="override both settings' seeds")
    parser.add_argument("--steps", type=int, default=None, help="override the synthetic setting's steps")
    parser.add_argument("--lrs", type=float, nargs="+", default=None, help="override the synthetic lr sweep")
    parser.add_argument("--real-lrs", type=float, nargs="+", default=None, help="override the real-model lr sweep")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=JSON",
                        help="override any entry of the size, e.g. real_steps=8 (listed as a deviation)")
    parser.add_argument("--followup", default=None, metavar="JSON",
                        help="with --merge: a synthetic run made after the main one, shown as a post-hoc section")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--real-teacher", default="smollm2-135m-instruct")
    parser.add_argument("--real-student", default="smollm2-135m-instruct:half-depth")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the real-model setting "
                        "(default: torch's); the synthetic setting always uses 1")
    parser.add_argument("--reading", default=None, help="a text file: the written reading, added to the markdown")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="no runs: combine the sections of earlier results (e.g. the synthetic and the real-model "
                        "setting run as two processes) and write them to --out-prefix")
    parser.add_argument("--out-prefix", default=None, help="writes <prefix>.json, <prefix>.md and <prefix>.png")
    args = parser.parse_args(argv)
    p = dict(SIZES[args.size])
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seeds:
        p["seeds"] = p["real_seeds"] = args.seeds
    if args.steps:
        p["steps"] = args.steps
    if args.lrs:
        p["lrs"] = args.lrs
    if args.real_lrs:
        p["real_lrs"] = args.real_lrs
    apply_overrides(p, args.set)
    started = time.perf_counter()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    result = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "size": args.size, "sizes": p, "threads": torch.get_num_threads(), "preregistered_rule": preregistered_rule(),
        "complete": False, "seconds": 0.0,
    }
    if args.reading:
        with open(args.reading) as f:
            result["reading"] = f.read()
    if args.merge:
        return _merge(result, args.merge, args.out_prefix, args.followup)

    def save():  # after every finished (method, lr) sweep point: a stopped run still leaves its seeds
        result["seconds"] = round(time.perf_counter() - started, 1)
        write_outputs(result, args.out_prefix, to_markdown, panels(result))

    if not args.skip_synthetic:
        run_synthetic(p, result.setdefault("synthetic", {}), log, save)
    if not args.skip_real:
        run_real(p, args.real_teacher, args.real_student, result.setdefault("real", {}), log, save)
    result["complete"] = True
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_outputs(result, args.out_prefix, to_markdown, panels(result))
    log(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
