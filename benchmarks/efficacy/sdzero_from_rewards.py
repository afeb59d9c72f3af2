"""Does SD-Zero turn binary rewards into accuracy? Base, Phase 1 (SRT) only, Phase 1 + Phase 2, and an RFT baseline.

Task and base model: benchmarks/efficacy/sdzero_task.py (two-digit addition, a tiny Llama pre-trained in-process
that is unsure between the right answer and the forgotten carry on carry problems, and whose reviser has seen what
"this response is wrong" means). Every arm uses the library's own code:

- Phase 1 (SRT): `trl_sdx.sdzero.run_srt` (transformers collection `HFSampler`, then TRL's `SFTTrainer` twice);
- Phase 2: `trl_sdx.sdzero.SDZeroTrainer`, student and frozen teacher θ_SRT;
- RFT: the base model's own samples on the same training problems (`HFSampler`, the collection's sampling), the
  correct ones kept, then TRL's `SFTTrainer` with the SFT settings of SRT.

Paper settings kept (they are not about scale): control phrases P_1 "Let me rephrase the above solution." / P_0
"Wait, this response is wrong. Let me correct it."; collection T = 1.0, top-p 0.9, 3 y_init × 3 revisions, only
incorrect y_init revised, cleaning on; SFT 3 epochs, cosine, warmup 0.05, weight decay 1e-4, betas (0.9, 0.95);
Phase 2 with 1 generation per prompt, T = 1.0, top-p 1.0, top-k 64 (the vocabulary has 512 tokens), mixed KL
w = 0.5, grad clip 1.0, teacher sync off. Scaled down: the problems, `stage2_size` (1/6 of the expected D_rev, the
released 1000 of 6000), the token budgets, the batch (16 prompts per step), the steps and the learning rates (a
tiny model pre-trained at 3e-3 is not moved by 5e-6; the sweep is the same for every arm).
Changed: the released math system prompts and prompt suffix are off (`collection_system_prompt=None`,
`collection_prompt_suffix=""`, `sft_system_prompt=None`): the task's prompt already asks for a box, and every phase
and the evaluation then see the same x. Phase 2 grades with the Phase 1 check (`boxed_answer_reward`, the last box)
instead of math-verify, because math-verify reads several boxes as a set and θ_SRT revises inside its answer
(stage 1 teaches "y_init + P_0 + y_revised"), which the evaluation grades by its last box. Phase 2's teacher reads
the first copy of y without its end-of-turn token (`keep_eos_in_first_copy=False`, the library's option that matches
Phase 1's text): the reviser was trained (pre-training, SRT stage 1) on y + P_r with no end-of-turn between them,
and a pilot with the released layout (an `<|im_end|>` inside the assistant turn) sent the teacher off its training
distribution (KL on correct samples 0.30, accuracy falling from 0.54 to 0.13 in 40 steps).

Pre-registered rule (written and committed before the full run; the results' markdown repeats it):
  R1. One learning-rate grid for every trained arm: SRT's two SFT stages, Phase 2 and RFT each sweep the grid
      of the size (full: 3e-5, 1e-4, 3e-4, 1e-3). For each arm the reported lr is the one with the highest mean
      over seeds of the selection metric at the end of training. Ties (within 1e-6) go to the smaller lr; an lr with a
      non-finite value in any seed is never chosen. Phase 1's lr is chosen first (on θ_SRT); Phase 2 then starts,
      for every seed, from θ_SRT at that lr.
  R2. Selection metric: avg@k sampled accuracy (T = 1) on the validation problems, disjoint from the training
      problems (all phases) and from the test problems the results are reported on. Test numbers play no part.
  R3. Equal footing. All arms train on the same training problems, with the same batch (16 per optimizer step), the
      same grid and, for RFT, the same optimizer steps as SD-Zero in total (Phase 1's two stages + Phase 2, per
      seed) and the same number of sampled completions from the base model as SD-Zero samples (Phase 1's y_init and
      revisions + Phase 2's rollouts, per seed). Every arm and seed starts from the same base model, pre-trained
      once (seed `base_seed`); a seed varies Phase 1's collection, the data order, Phase 2's and RFT's sampling and
      the evaluation's sampling, not the base model.
  R4. Outcomes on the held-out test problems at the last step. Primary: avg@k (T = 1) of Phase 1 + Phase 2 minus
      RFT, paired by seed. Secondary: the same for greedy accuracy; Phase 1 + Phase 2 − Phase 1 only; Phase 1 only −
      base; Phase 1 + Phase 2 − base; and the Phase 2 KL on r = 0 versus r = 1 samples (token mean of the per-token
      loss over the run, `sdzero/kl_incorrect` − `sdzero/kl_correct`, paired by seed; descriptive).
  R5. Claim. "SD-Zero beats RFT" only when the 95% t-interval of the paired per-seed difference excludes 0 in
      SD-Zero's favour; "RFT beats SD-Zero" symmetrically; otherwise "no difference detected at this size" (null).
      The same wording for every secondary comparison.
  R6. Within reach, checked first and reported whatever it shows: base test accuracy (greedy and avg@k) must lie in
      20–80%, and the base reviser's accuracy on its own wrong answers is reported before any training (and θ_SRT's
      after Phase 1). A base outside 20–80% is reported as a failed precondition, not rerun with other settings.
end of rule

Example (≈ 30 min on 2 idle CPU cores; writes JSON, markdown and PNG):
  python benchmarks/efficacy/sdzero_from_rewards.py --size full --out-prefix benchmarks/results/sdzero_efficacy
Toy size (CI, tests/test_efficacy_sdzero_toy.py): --size toy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script: its siblings
from common import (  # noqa: E402
    aggregate_curves, apply_overrides, best_setting, format_interval, header_lines, mean_interval,
    reading_and_plot_lines, write_outputs)
from common import verdict as common_verdict  # noqa: E402
import sdzero_task as task  # noqa: E402
from tiny_world import pretrain_on_chats, train_chat_tokenizer  # noqa: E402

ARMS = ("base", "SRT (Phase 1)", "SD-Zero (Phase 1 + 2)", "RFT")
METRICS = ("avg_at_k", "greedy", "avg_at_k_carry", "inline_revision_share", "boxed_share")
SIZES = {
    # problems per pool; base model; pre-training; grid; SRT; Phase 2; evaluation
    "toy": dict(pools={"test": 24, "validation": 12, "train": 24}, operands=[10, 19], carry_share=0.6, hidden=32,
                layers=2, vocab=512, base_seed=0, pretrain_chats=3000, pretrain_steps=150, pretrain_lr=3e-3,
                p_carry_right=0.4, revision_share=0.3, other_error_share=0.5,
                seeds=[0, 1], lrs=[1e-3], batch_size=4, stage2_size=2, srt_epochs=1, phase2_steps=2, eval_every=1,
                max_new_tokens=24, eval_k=2),
    "full": dict(pools={"test": 400, "validation": 200, "train": 512}, operands=[10, 99], carry_share=0.6,
                 hidden=64, layers=4, vocab=512, base_seed=0, pretrain_chats=20000, pretrain_steps=1200,
                 pretrain_lr=3e-3, p_carry_right=0.4, other_error_share=0.5,
                 revision_share=0.3, seeds=[0, 1, 2], lrs=[3e-5, 1e-4, 3e-4, 1e-3], batch_size=16, stage2_size=50,
                 srt_epochs=3, phase2_steps=40, eval_every=20, max_new_tokens=48, eval_k=8),
}
HIGHER_IS_BETTER = {"avg_at_k": True, "greedy": True}


def preregistered_rule() -> str:
    text = __doc__.split("Pre-registered rule")[1].split("end of rule")[0]
    return "Pre-registered rule" + text.rstrip()


def choose_lr(final_by_lr: dict[str, list[float]]) -> str | None:
    """Rule R1: the lr with the highest seed-mean value; ties (1e-6) → smaller lr; non-finite seeds excluded."""
    return best_setting(final_by_lr, higher_is_better=True)


def verdict(diff: dict, higher_is_better: bool = True, names: tuple[str, str] = ("SD-Zero", "RFT")) -> str:
    """Rule R5 in words, for a paired difference a − b."""
    return common_verdict(diff, names, higher_is_better)


# --------------------------------------------------------------------------------------------------------------------
# The world: problems, tokenizer, base model
# --------------------------------------------------------------------------------------------------------------------
class World:
    def __init__(self, p: dict, root: Path, log):
        self.p, self.root, self.log = p, root, log
        self.pools = task.split_problems(p["pools"], p["carry_share"], operands=tuple(p["operands"]))
        self.tokenizer = train_chat_tokenizer(task.tokenizer_corpus(self.pools["pretrain"]), vocab_size=p["vocab"])

    def eval(self, model, pool: str, seed: int) -> dict:
        return task.accuracy(model, self.tokenizer, self.pools[pool], k=self.p["eval_k"],
                             max_new_tokens=self.p["max_new_tokens"], seed=seed)

    def eval_both(self, model, seed: int) -> dict:
        """Validation and test metrics; the sampling seeds depend on the run's seed only, so within a seed every arm
        is scored on the same random numbers."""
        val, test = self.eval(model, "validation", 101 + 1000 * seed), self.eval(model, "test", 202 + 1000 * seed)
        return {**{f"val_{k}": v for k, v in val.items()}, **{f"test_{k}": v for k, v in test.items()}}

    def reviser(self, model, seed: int) -> dict:
        return task.reviser_accuracy(model, self.tokenizer, self.pools["test"], k=2,
                                     max_new_tokens=self.p["max_new_tokens"], seed=seed)

    def dataset(self, pool: str):
        from datasets import Dataset

        problems = self.pools[pool]
        return Dataset.from_dict({"prompt": [q.prompt for q in problems], "answer": [str(q.answer) for q in problems]})

    def base_model(self) -> str:
        """Pre-train the base model (once, seed `base_seed`; every seed and arm starts from it); returns its folder."""
        from trl_sdx.testing import make_tiny_model

        path = self.root / "base"
        if not (path / "config.json").is_file():
            p, seed = self.p, self.p["base_seed"]
            model = make_tiny_model(self.tokenizer, seed=seed, hidden_size=p["hidden"], num_layers=p["layers"],
                                    max_position_embeddings=256)
            chats = task.pretraining_chats(self.pools["pretrain"], p["pretrain_chats"], p["revision_share"],
                                           p["p_carry_right"], seed=seed, other_error_share=p["other_error_share"])
            pretrain_on_chats(model, self.tokenizer, chats, steps=p["pretrain_steps"], lr=p["pretrain_lr"],
                              batch_size=64, seed=seed, log=self.log, log_every=max(1, p["pretrain_steps"] // 4),
                              chat_template_kwargs={"chat_template": task.PREFIXED_CHATML_TEMPLATE})
            model.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
        return str(path)


def _load(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _common_args(p: dict, seed: int, lr: float) -> dict:
    return dict(learning_rate=lr, per_device_train_batch_size=p["batch_size"], gradient_accumulation_steps=1,
                report_to="none", save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True, seed=seed,
                data_seed=seed, logging_steps=1)


def _sft_args(p: dict, seed: int, lr: float) -> dict:
    """The released SRT SFT settings (also RFT's): cosine, warmup 0.05, weight decay 1e-4, betas (0.9, 0.95)."""
    return dict(**_common_args(p, seed, lr), lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=1e-4,
                adam_beta2=0.95)


class _StepCount:
    """A callback that adds up the optimizer steps of every trainer it is given to."""

    def __new__(cls):
        from transformers import TrainerCallback

        class StepCount(TrainerCallback):
            steps = 0

            def on_train_end(self, args, state, control, **kwargs):
                self.steps += state.global_step

        return StepCount()


# --------------------------------------------------------------------------------------------------------------------
# Phase 1 (SRT)
# --------------------------------------------------------------------------------------------------------------------
def run_phase1(world: World, seed: int, lr: float, base: str) -> dict:
    from trl_sdx.sdzero.srt import SRTConfig, run_srt

    p = world.p
    out = world.root / f"seed{seed}" / f"srt_lr{lr:g}"
    shared = world.root / f"seed{seed}" / "srt_revisions"  # the collection is from the base: once per seed
    if (shared / "counts.json").is_file() and not (out / "revisions").exists():
        shutil.copytree(shared, out / "revisions")
    config = SRTConfig(
        output_dir=str(out), **_sft_args(p, seed, lr), num_train_epochs=p["srt_epochs"], stage2_size=p["stage2_size"],
        init_max_new_tokens=p["max_new_tokens"], revision_max_new_tokens=p["max_new_tokens"], max_revisions=None,
        collection_system_prompt=None, collection_prompt_suffix="", sft_system_prompt=None,
        generate_batch_size=256, max_length=None,
    )
    steps = _StepCount()
    theta = run_srt(_load(base), world.tokenizer, world.dataset("train"), config, callbacks=[steps])
    if not shared.exists():
        shutil.copytree(out / "revisions", shared)
    counts = json.loads((out / "revisions" / "counts.json").read_text())
    split = json.loads((out / "revisions" / "sft_split.json").read_text())
    model = _load(theta)
    return {"path": theta, "steps": steps.steps, "counts": counts, "split": split,
            "generations": counts["init_samples"] + counts["revision_attempts"], **world.eval_both(model, seed),
            "reviser": world.reviser(model, seed=303 + seed)}


# --------------------------------------------------------------------------------------------------------------------
# Phase 2 (SDZeroTrainer), with held-out evaluations along the way
# --------------------------------------------------------------------------------------------------------------------
def _eval_callback(world: World, curve: list, every: int, seed: int):
    from transformers import TrainerCallback

    class EvalEvery(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0 or state.global_step == args.max_steps:
                curve.append({"step": state.global_step, **world.eval_both(model, seed)})

    return EvalEvery()


def _number(value) -> float:
    """A logged metric; TRL logs a NaN (a step without a sample of that reward) as None."""
    return float("nan") if value is None else float(value)


def _kl_by_reward(log_history: list[dict]) -> dict:
    """Mean over the logged steps of the Phase 2 KL, overall and on r = 0 / r = 1 samples (steps where a group was
    empty log NaN and are left out of that group's mean; their number is returned)."""
    out = {}
    for key in ("sdzero/kl", "sdzero/kl_incorrect", "sdzero/kl_correct", "sdzero/reward_mean"):
        values = [_number(e[key]) for e in log_history if key in e]
        finite = [v for v in values if math.isfinite(v)]
        out[key.split("/")[1]] = sum(finite) / len(finite) if finite else float("nan")
        out[key.split("/")[1] + "_steps_empty"] = len(values) - len(finite)
    return out


def run_phase2(world: World, seed: int, lr: float, srt: dict) -> dict:
    """Phase 2 from theta_SRT (`srt`, whose evaluation is the curve's step 0)."""
    from trl_sdx.rewards import boxed_answer_reward
    from trl_sdx.sdzero import SDZeroConfig, SDZeroTrainer

    p = world.p
    out = world.root / f"seed{seed}" / f"phase2_lr{lr:g}"
    config = SDZeroConfig(
        output_dir=str(out), **_common_args(p, seed, lr), max_steps=p["phase2_steps"], lr_scheduler_type="constant",
        max_completion_length=p["max_new_tokens"], temperature=1.0, top_p=1.0, distillation_topk=64,
        kl_type="mixed", mixed_kl_weight=0.5, teacher_sync_steps=0, keep_eos_in_first_copy=False,
    )
    theta = srt["path"]
    curve = [{"step": 0, **{k: v for k, v in srt.items() if k.startswith(("val_", "test_"))}}]
    trainer = SDZeroTrainer(model=_load(theta), teacher_model=_load(theta), reward_funcs=[boxed_answer_reward],
                            args=config,
                            train_dataset=world.dataset("train"), processing_class=world.tokenizer,
                            callbacks=[_eval_callback(world, curve, p["eval_every"], seed)])
    trainer.train()
    kl_curve = [{"step": e["step"], "kl_incorrect": _number(e.get("sdzero/kl_incorrect")),
                 "kl_correct": _number(e.get("sdzero/kl_correct"))}
                for e in trainer.state.log_history if "sdzero/kl" in e]
    shutil.rmtree(out, ignore_errors=True)
    return {"curve": curve, "kl": _kl_by_reward(trainer.state.log_history), "kl_curve": kl_curve,
            "generations": p["phase2_steps"] * p["batch_size"]}


# --------------------------------------------------------------------------------------------------------------------
# RFT: the base model's own correct samples, SFT with SRT's settings
# --------------------------------------------------------------------------------------------------------------------
def rft_samples(world: World, seed: int, base: str, generations: int) -> tuple[list[dict], dict]:
    """`generations` samples of the base model spread evenly over the training problems (collection sampling:
    T = 1.0, top-p 0.9, `HFSampler`); returns the correct ones as SFT rows and the counts."""
    from trl_sdx.sdzero.srt import SRTConfig
    from trl_sdx.sdzero.srt_collect import HFSampler

    problems = world.pools["train"]
    config = SRTConfig(output_dir=str(world.root / "unused"), generate_batch_size=256, use_cpu=True, bf16=False,
                       report_to="none")
    sampler = HFSampler(_load(base), world.tokenizer, config)
    per_problem, extra = divmod(generations, len(problems))
    order = list(range(len(problems)))
    random.Random(f"rft-{seed}").shuffle(order)
    rows, correct = [], 0
    for n, chosen in ((per_problem + 1, order[:extra]), (per_problem, order[extra:])):
        if n == 0 or not chosen:
            continue
        encode = [world.tokenizer(task.prompt_text(world.tokenizer, problems[i]), add_special_tokens=False)
                  ["input_ids"] for i in chosen]
        samples = sampler(encode, n, world.p["max_new_tokens"], seed=seed * 7919 + n)
        for i, ys in zip(chosen, samples):
            for y, ok in zip(ys, task.grade(ys, [problems[i].answer] * len(ys))):
                if ok:
                    correct += 1
                    rows.append({"prompt": problems[i].prompt, "completion": [{"role": "assistant", "content": y}]})
    return rows, {"samples": generations, "correct": correct}


def run_rft(world: World, seed: int, lr: float, base: str, rows: list[dict], steps: int) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    p = world.p
    out = world.root / f"seed{seed}" / f"rft_lr{lr:g}"
    config = SFTConfig(output_dir=str(out), **_sft_args(p, seed, lr), max_steps=steps, max_length=None)
    trainer = SFTTrainer(model=_load(base), args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=world.tokenizer)
    trainer.train()
    final = {"step": steps, **world.eval_both(trainer.model, seed)}
    shutil.rmtree(out, ignore_errors=True)
    return {"curve": [final]}


# --------------------------------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------------------------------
def run(p: dict, result: dict, root: Path, log, save) -> None:
    world = World(p, root, log)
    lrs = [float(lr) for lr in p["lrs"]]
    seeds = p["seeds"]
    result["task"] = {pool: {"problems": len(v), "carry_share": sum(q.carry for q in v) / len(v)}
                      for pool, v in world.pools.items()}
    seeds_out = result.setdefault("seeds", {})

    # 0. the base model, and the check that comes first (its sampling seeds vary with the run's seed)
    started = time.perf_counter()
    base = world.base_model()
    result["base_seconds"] = round(time.perf_counter() - started, 1)
    model = _load(base)
    for seed in seeds:
        seeds_out[str(seed)] = {"base": world.eval_both(model, seed),
                                "base_reviser": world.reviser(model, seed=303 + seed)}
        log(f"[sdzero] seed {seed} base: {json.dumps(seeds_out[str(seed)])}")
    save()

    # 1. Phase 1 for every lr; R1 picks its lr on validation avg@k
    for seed in seeds:
        s = seeds_out[str(seed)]
        for lr in lrs:
            started = time.perf_counter()
            s.setdefault("srt", {})[str(lr)] = run_phase1(world, seed, lr, base)
            log(f"[sdzero] seed {seed} SRT lr {lr}: {time.perf_counter() - started:.0f} s")
            save()
    srt_lr = choose_lr({str(lr): [seeds_out[str(s)]["srt"][str(lr)]["val_avg_at_k"] for s in seeds] for lr in lrs})
    result.setdefault("chosen_lr", {})["SRT (Phase 1)"] = srt_lr

    # 2. Phase 2 from theta_SRT at that lr
    for seed in seeds:
        s = seeds_out[str(seed)]
        for lr in lrs:
            started = time.perf_counter()
            s.setdefault("phase2", {})[str(lr)] = run_phase2(world, seed, lr, s["srt"][srt_lr])
            log(f"[sdzero] seed {seed} Phase 2 lr {lr}: {time.perf_counter() - started:.0f} s")
            save()
    result["chosen_lr"]["SD-Zero (Phase 1 + 2)"] = choose_lr(
        {str(lr): [seeds_out[str(s)]["phase2"][str(lr)]["curve"][-1]["val_avg_at_k"] for s in seeds] for lr in lrs})

    # 3. RFT with SD-Zero's generations and steps (per seed)
    for seed in seeds:
        s = seeds_out[str(seed)]
        srt, phase2 = s["srt"][srt_lr], s["phase2"][result["chosen_lr"]["SD-Zero (Phase 1 + 2)"]]
        generations = srt["generations"] + phase2["generations"]
        steps = srt["steps"] + p["phase2_steps"]
        rows, counts = rft_samples(world, seed, base, generations)
        s["rft_data"] = {**counts, "steps": steps}
        for lr in lrs:
            started = time.perf_counter()
            s.setdefault("rft", {})[str(lr)] = run_rft(world, seed, lr, base, rows,
                                                        steps)
            log(f"[sdzero] seed {seed} RFT lr {lr}: {time.perf_counter() - started:.0f} s")
            save()
    result["chosen_lr"]["RFT"] = choose_lr(
        {str(lr): [seeds_out[str(s)]["rft"][str(lr)]["curve"][-1]["val_avg_at_k"] for s in seeds] for lr in lrs})
    summarise(result, seeds, lrs)


def final_rows(result: dict, seed: str) -> dict[str, dict]:
    """Per arm, the metrics of this seed at the chosen lr, end of training."""
    s, chosen = result["seeds"][seed], result["chosen_lr"]
    return {"base": s["base"], "SRT (Phase 1)": s["srt"][chosen["SRT (Phase 1)"]],
            "SD-Zero (Phase 1 + 2)": s["phase2"][chosen["SD-Zero (Phase 1 + 2)"]]["curve"][-1],
            "RFT": s["rft"][chosen["RFT"]]["curve"][-1]}


COMPARISONS = (("SD-Zero (Phase 1 + 2)", "RFT"), ("SD-Zero (Phase 1 + 2)", "SRT (Phase 1)"),
               ("SRT (Phase 1)", "base"), ("SD-Zero (Phase 1 + 2)", "base"), ("RFT", "base"))


def summarise(result: dict, seeds: list[int], lrs: list[float]) -> None:
    per_seed = {str(s): final_rows(result, str(s)) for s in seeds}
    result["final"] = {arm: {f"test_{m}": mean_interval(per_seed[str(s)][arm][f"test_{m}"] for s in seeds)
                             for m in METRICS} for arm in ARMS}
    result["differences"] = {
        f"{a} − {b}": {m: mean_interval(per_seed[str(s)][a][f"test_{m}"] - per_seed[str(s)][b][f"test_{m}"]
                                        for s in seeds) for m in ("avg_at_k", "greedy")}
        for a, b in COMPARISONS}
    p2 = result["chosen_lr"]["SD-Zero (Phase 1 + 2)"]
    kls = [result["seeds"][str(s)]["phase2"][p2]["kl"] for s in seeds]
    result["kl_by_reward"] = {"kl_incorrect": mean_interval(k["kl_incorrect"] for k in kls),
                              "kl_correct": mean_interval(k["kl_correct"] for k in kls),
                              "incorrect_minus_correct": mean_interval(k["kl_incorrect"] - k["kl_correct"]
                                                                       for k in kls),
                              "reward_mean": mean_interval(k["reward_mean"] for k in kls)}
    srt = result["chosen_lr"]["SRT (Phase 1)"]
    result["check"] = {
        "base_test_greedy": mean_interval(result["seeds"][str(s)]["base"]["test_greedy"] for s in seeds),
        "base_test_avg_at_k": mean_interval(result["seeds"][str(s)]["base"]["test_avg_at_k"] for s in seeds),
        "base_reviser_after_wrong": mean_interval(result["seeds"][str(s)]["base_reviser"]["revision_right_after_wrong"]
                                                  for s in seeds),
        "base_reviser_after_right": mean_interval(result["seeds"][str(s)]["base_reviser"]["revision_right_after_right"]
                                                  for s in seeds),
        "srt_reviser_after_wrong": mean_interval(result["seeds"][str(s)]["srt"][srt]["reviser"]
                                                 ["revision_right_after_wrong"] for s in seeds),
        "srt_reviser_after_right": mean_interval(result["seeds"][str(s)]["srt"][srt]["reviser"]
                                                 ["revision_right_after_right"] for s in seeds),
    }
    result["phase2_curve"] = aggregate_curves(
        [result["seeds"][str(s)]["phase2"][p2]["curve"] for s in seeds], ["test_avg_at_k", "test_greedy"])
    result["kl_curve"] = aggregate_curves(
        [result["seeds"][str(s)]["phase2"][p2]["kl_curve"] for s in seeds], ["kl_incorrect", "kl_correct"])
    result["sweep"] = {
        "SRT (Phase 1)": {str(lr): mean_interval(result["seeds"][str(s)]["srt"][str(lr)]["val_avg_at_k"] for s in seeds)
                          for lr in lrs},
        "SD-Zero (Phase 1 + 2)": {str(lr): mean_interval(result["seeds"][str(s)]["phase2"][str(lr)]["curve"][-1]
                                                         ["val_avg_at_k"] for s in seeds) for lr in lrs},
        "RFT": {str(lr): mean_interval(result["seeds"][str(s)]["rft"][str(lr)]["curve"][-1]["val_avg_at_k"]
                                       for s in seeds) for lr in lrs},
    }
    result["generations"] = {str(s): {"sdzero": result["seeds"][str(s)]["srt"][srt]["generations"]
                                      + result["seeds"][str(s)]["phase2"][p2]["generations"],
                                      "rft": result["seeds"][str(s)]["rft_data"]["samples"],
                                      "rft_correct": result["seeds"][str(s)]["rft_data"]["correct"],
                                      "steps": result["seeds"][str(s)]["rft_data"]["steps"]} for s in seeds}


# --------------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------------
def to_markdown(r: dict) -> str:
    p = r["sizes"]
    lines = header_lines(r, "SD-Zero from binary rewards: base, SRT, SRT + Phase 2, RFT",
                         "differences are paired by seed (same base model, same training problems).")
    lines += ["```", preregistered_rule(), "```", ""]
    t = r.get("task", {})
    if t:
        lines += [f"Task (benchmarks/efficacy/sdzero_task.py): two-digit addition; pools {json.dumps(t)}. Base: tiny "
                  f"Llama (hidden {p['hidden']}, {p['layers']} layers, vocabulary {p['vocab']}) pre-trained "
                  f"{p['pretrain_steps']} steps (once, seed {p['base_seed']}; every seed and arm starts from it) on "
                  f"{p['pretrain_chats']} conversations (carry answered right "
                  f"with p = {p['p_carry_right']}; {p['revision_share']:.0%} self-revisions). Batch "
                  f"{p['batch_size']}; SRT {p['srt_epochs']} epochs per stage, stage-2 quota {p['stage2_size']}; "
                  f"Phase 2 {p['phase2_steps']} steps; grid {p['lrs']}; seeds {p['seeds']}; avg@k with k = "
                  f"{p['eval_k']}, up to {p['max_new_tokens']} new tokens.", ""]
    if "check" in r:
        c = r["check"]
        lines += ["**Within reach (checked first, R6).** Base on the test problems: greedy "
                  f"{format_interval(c['base_test_greedy'])}, avg@k {format_interval(c['base_test_avg_at_k'])}. "
                  "Reviser, one revision of each of 2 samples per test problem: after its own wrong answer (P_0) "
                  f"right {format_interval(c['base_reviser_after_wrong'])} (base) → "
                  f"{format_interval(c['srt_reviser_after_wrong'])} (θ_SRT); after a right one (P_1) right "
                  f"{format_interval(c['base_reviser_after_right'])} → "
                  f"{format_interval(c['srt_reviser_after_right'])}.",
                  ""]
    if "final" in r:
        lines += [f"Chosen lr (R1, by validation avg@k): {r['chosen_lr']}.", "",
                  "| arm | test avg@k (primary) | test greedy | avg@k on carry problems | inline revisions | boxed |",
                  "|---|---:|---:|---:|---:|---:|"]
        for arm in ARMS:
            f = r["final"][arm]
            lines.append(f"| {arm} | " + " | ".join(format_interval(f[f"test_{m}"]) for m in METRICS) + " |")
        lines += ["", "| paired difference | test avg@k | verdict (R5) | test greedy | verdict |",
                  "|---|---:|---|---:|---|"]
        for name, d in r["differences"].items():
            a, b = name.split(" − ")
            short = lambda arm: arm.split(" (")[0] if arm.startswith("S") else arm  # noqa: E731
            names = (short(a), short(b))
            lines.append(f"| {name} | {format_interval(d['avg_at_k'])} | {verdict(d['avg_at_k'], True, names)} | "
                         f"{format_interval(d['greedy'])} | {verdict(d['greedy'], True, names)} |")
        k = r["kl_by_reward"]
        lines += ["", "**Phase 2 KL by reward** (token mean of the per-token loss over the run, chosen lr): r = 0 "
                  f"{format_interval(k['kl_incorrect'], 4)}, r = 1 {format_interval(k['kl_correct'], 4)}, paired "
                  f"difference r=0 − r=1 {format_interval(k['incorrect_minus_correct'], 4)}; mean reward of the "
                  f"rollouts {format_interval(k['reward_mean'])}.", "",
                  "Equal generations and steps (R3), per seed: " + "; ".join(
                      f"seed {s}: SD-Zero {g['sdzero']} sampled completions, RFT {g['rft']} ({g['rft_correct']} "
                      f"correct, its SFT rows), {g['steps']} optimizer steps each"
                      for s, g in r["generations"].items()),
                  "", "Every lr of the sweep, validation avg@k at the end (the selection metric):", "",
                  "| arm | " + " | ".join(r["sweep"]["RFT"]) + " |", "|---|" + "---:|" * len(r["sweep"]["RFT"])]
        for arm, by_lr in r["sweep"].items():
            mark = lambda lr: " ✓" if r["chosen_lr"][arm] == lr else ""  # noqa: E731
            lines.append(f"| {arm} | " + " | ".join(format_interval(v) + mark(lr) for lr, v in by_lr.items()) + " |")
        lines.append("")
    lines += reading_and_plot_lines(r, "mean ± 95% interval over seeds")
    return "\n".join(lines)


def panels(r: dict) -> list[dict]:
    if "final" not in r:
        return []
    hline = {"y": r["final"]["RFT"]["test_avg_at_k"]["mean"], "label": "RFT (end)"}
    return [
        {"title": "held-out avg@k by arm", "ylabel": "accuracy", "bars": [
            {"label": arm.replace(" (Phase 1 + 2)", "").replace(" (Phase 1)", ""), "stat": r["final"][arm]
             ["test_avg_at_k"]} for arm in ARMS]},
        {"title": "Phase 2 from θ_SRT: held-out accuracy", "ylabel": "accuracy", "hline": hline,
         "series": [{"label": "avg@k", "curve": r["phase2_curve"], "metric": "test_avg_at_k"},
                    {"label": "greedy", "curve": r["phase2_curve"], "metric": "test_greedy"}]},
        {"title": "Phase 2 KL by the sample's reward", "ylabel": "per-token loss",
         "series": [{"label": "r = 0", "curve": r["kl_curve"], "metric": "kl_incorrect"},
                    {"label": "r = 1", "curve": r["kl_curve"], "metric": "kl_correct"}]},
    ]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=JSON",
                        help="override an entry of the size (recorded in the results as a deviation)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run fastest on one)")
    parser.add_argument("--workdir", default=None, help="where models go (default: a temporary folder, removed)")
    parser.add_argument("--reading", default=None, help="a text file: the written reading, added to the markdown")
    parser.add_argument("--rebuild", default=None, metavar="JSON",
                        help="no runs: rewrite an earlier result (with --reading) to --out-prefix")
    parser.add_argument("--out-prefix", default=None, help="writes <prefix>.json, <prefix>.md and <prefix>.png")
    args = parser.parse_args(argv)
    p = json.loads(json.dumps(SIZES[args.size]))
    deviations = []
    for item in args.set:
        key = item.partition("=")[0]
        apply_overrides(p, [item])
        deviations.append(f"{key} = {p[key]} (planned {SIZES[args.size][key]})")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    result = {"command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None
                                                                             else sys.argv[1:])),
              "size": args.size, "sizes": p, "deviations": deviations, "threads": torch.get_num_threads(),
              "preregistered_rule": preregistered_rule(), "complete": False, "seconds": 0.0}
    if args.rebuild:
        result = json.loads(Path(args.rebuild).read_text())
    if args.reading:
        result["reading"] = Path(args.reading).read_text()
    if args.rebuild:
        write_outputs(result, args.out_prefix, to_markdown, panels(result))
        return result

    def save():
        result["seconds"] = round(time.perf_counter() - started, 1)
        write_outputs(result, args.out_prefix, to_markdown, panels(result))

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sdzero_efficacy_"))
    try:
        run(p, result, root, log, save)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    result["complete"] = True
    save()
    log(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
