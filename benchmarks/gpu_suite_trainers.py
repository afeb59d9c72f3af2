"""GPU suite, trainer sections: seconds per optimizer step and peak memory of our trainers next to the TRL trainer
each builds on, at equal settings, in the same process (EOPD, SD-Zero, MixSD, and the single-process FSDP2 runs).

Equal work: every completion is exactly `completion_len` tokens (`min_new_tokens`), every prompt `prompt_words`
tokens plus the chat template's, the same batch, learning rate, gradient checkpointing and precision. A task trains
`warmup_steps + measured_steps` optimizer steps; the step time is the median of the measured ones (synchronised on
CUDA; the rollout, i.e. generation and the scoring done at rollout time, is included and reported apart as
`rollout_s`); peak memory is the highest allocation of the training phase above what the process held before the
task built its models (weights, gradients, optimizer state, activations, generation).
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import tempfile
import time

import torch

from gpu_suite_setup import Meter, gib, knowledge_rows, make_model, make_tokenizer, prompt_dataset

FSDP2_CONFIG = {"version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "transformer_layer_cls_to_wrap": ["Qwen3DecoderLayer"]}


def always_correct(completions, **kwargs):
    """SD-Zero reward: every completion counts as correct (the teacher reads the 'rephrase' control phrase)."""
    return [1.0] * len(completions)


def accept_all(text, gold):
    """MixSD answer checker: keep every target (a random model never writes the gold answer)."""
    return True


class Unavailable(Exception):
    """The feature a task measures is not on this checkout or this device: recorded, not an error."""


def _require_fields(config_cls, fields: dict) -> None:
    known = {f.name for f in dataclasses.fields(config_cls)}
    missing = sorted(set(fields) - known)
    if missing:
        raise Unavailable(f"{config_cls.__name__} has no field(s) {missing} on this checkout")


def _step_timer(meter: Meter):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of every optimizer step; the training phase's memory peak starts at `on_train_begin`."""

        def __init__(self):
            self.times, self._start = [], None

        def on_train_begin(self, args, state, control, **kwargs):
            meter.reset_peak()

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = meter.now()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(meter.now() - self._start)

    return StepTimer()


def _time_rollouts(trainer, meter: Meter) -> list:
    """Wrap the trainer's rollout method (an instance attribute shadows the class's) to time each call."""
    original, times = trainer._generate_and_score_completions, []

    def timed(*args, **kwargs):
        start = meter.now()
        out = original(*args, **kwargs)
        times.append(meter.now() - start)
        return out

    trainer._generate_and_score_completions = timed
    return times


def _common_args(task: dict, cfg: dict, meter: Meter, out_dir: str) -> dict:
    cuda = meter.device.type == "cuda"
    args = dict(
        output_dir=out_dir, per_device_train_batch_size=cfg["batch"], gradient_accumulation_steps=1,
        max_steps=cfg["warmup_steps"] + cfg["measured_steps"], learning_rate=1e-6, logging_steps=1,
        report_to="none", save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
        gradient_checkpointing=cfg["gradient_checkpointing"], use_cpu=not cuda,
        # bf16 autocast on CUDA; on CPU only the fp32-master run uses it (bf16 on this CPU is ~10x slower)
        bf16=cuda or task.get("fp32_master", False),
    )
    if task.get("liger"):
        args["use_liger_kernel"] = True
    if task.get("fsdp2"):
        args.update(fsdp=True, fsdp_config=dict(FSDP2_CONFIG))
    return args


def _rollout_args(cfg: dict) -> dict:
    length = cfg["completion_len"]
    return dict(max_completion_length=length, generation_kwargs={"min_new_tokens": length})  # exactly `length` tokens


def _build(task: dict, ctx: dict, out_dir: str):
    """(trainer, whether it generates rollouts) for one task."""
    cfg, meter, tiny = ctx["config"]["trainers"], ctx["meter"], ctx["tiny"]
    device, cuda = meter.device, meter.device.type == "cuda"
    tokenizer = ctx.setdefault("tokenizer", make_tokenizer(ctx["config"]["vocab"]))
    weights_dtype = torch.float32 if (task.get("fp32_master") or not cuda) else torch.bfloat16
    teacher_dtype = torch.bfloat16 if cuda else torch.float32
    common = _common_args(task, cfg, meter, out_dir)
    overrides = task.get("config_overrides", {})
    kind = task["trainer"]
    if kind in ("eopd", "distillation", "sdzero"):
        rows = cfg["batch"] * common["max_steps"]
        dataset = prompt_dataset(rows, cfg["prompt_words"], ctx["config"]["vocab"])
        student = make_model("0.6B", tiny, tokenizer, device, weights_dtype, seed=0)
        if kind != "sdzero":  # SD-Zero's self-teacher: `teacher_mode="copy"` makes the frozen copy itself
            if task.get("teacher") == "self":  # the equal-settings peer of SD-Zero: a frozen copy of the student
                teacher = copy.deepcopy(student).to(teacher_dtype)
            else:
                teacher = make_model("1.7B", tiny, tokenizer, device, teacher_dtype, seed=1)
            teacher.requires_grad_(False)
        if kind == "eopd":
            from trl_sdx.entropy_gkd import EntropyAwareGKDConfig, EntropyAwareGKDTrainer

            _require_fields(EntropyAwareGKDConfig, overrides)
            args = EntropyAwareGKDConfig(**common, **_rollout_args(cfg), **overrides)
            trainer = EntropyAwareGKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                             processing_class=tokenizer)
        elif kind == "distillation":
            from trl import DistillationConfig, DistillationTrainer

            args = DistillationConfig(**common, **_rollout_args(cfg), **overrides)
            trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                          processing_class=tokenizer)
        else:
            from trl_sdx.sdzero import SDZeroConfig, SDZeroTrainer

            _require_fields(SDZeroConfig, overrides)
            args = SDZeroConfig(**common, **_rollout_args(cfg), teacher_mode="copy", **overrides)
            trainer = SDZeroTrainer(model=student, reward_funcs=[always_correct], args=args, train_dataset=dataset,
                                    processing_class=tokenizer)
        return trainer, True
    if kind in ("mixsd", "sft"):
        from trl import SFTConfig, SFTTrainer

        from trl_sdx.mixsd import MixSDConfig, MixSDTrainer

        model = make_model("0.6B", tiny, tokenizer, device, weights_dtype, seed=0)
        sft = dict(common, dataset_num_proc=None)
        if kind == "mixsd":
            _require_fields(MixSDConfig, overrides)
            rows = knowledge_rows(cfg["batch"] * common["max_steps"], cfg["prompt_words"], ctx["config"]["vocab"])
            args = MixSDConfig(**sft, max_new_tokens=cfg["completion_len"], max_retries=0, keep_failed=True,
                               generation_batch_size=cfg["mixsd_generation_batch"], mixsd_cache_dir=out_dir + "/cache",
                               **overrides)
            trainer = MixSDTrainer(model, args=args, train_dataset=rows, processing_class=tokenizer,
                                   answer_checker=accept_all)
            # SFTTrainer gets exactly these targets: same data, same lengths
            ctx["mixsd_sft_dataset"] = trainer.mixsd_targets.to_sft_dataset(keep_failed=True)
            return trainer, False
        if "mixsd_sft_dataset" not in ctx:
            raise RuntimeError("the MixSD task did not produce targets, so SFTTrainer has no equal data to train on")
        trainer = SFTTrainer(model, args=SFTConfig(**sft, **overrides), train_dataset=ctx["mixsd_sft_dataset"],
                             processing_class=tokenizer)
        return trainer, False
    raise ValueError(f"unknown trainer kind {kind!r}")


def _lm_head_is_dtensor(trainer) -> bool:
    from torch.distributed.tensor import DTensor

    weight = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings().weight
    return isinstance(weight, DTensor)


def run_trainer_task(task: dict, ctx: dict) -> dict:
    meter = ctx["meter"]
    if task.get("liger") and meter.device.type != "cuda":
        raise Unavailable("Liger's kernels are Triton kernels: CUDA only")
    cfg = ctx["config"]["trainers"]
    meter.release()
    base = meter.allocated()
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        trainer, has_rollouts = _build(task, ctx, out_dir)
        build_s = time.perf_counter() - start
        held = meter.allocated() - base
        timer = _step_timer(meter)
        trainer.add_callback(timer)
        rollout_times = _time_rollouts(trainer, meter) if has_rollouts else []
        trainer.train()
        peak = meter.peak() - base
        fsdp_enabled = bool(getattr(trainer, "is_fsdp_enabled", False))
        dtensor_head = _lm_head_is_dtensor(trainer)
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        extra = {"mixsd_stats": trainer.mixsd_stats} if task["trainer"] == "mixsd" else {}
        del trainer
    meter.release()
    warm = cfg["warmup_steps"]
    measured = timer.times[warm:]
    result = {
        "status": "ok", "step_s": statistics.median(measured), "step_times_s": timer.times, "build_s": build_s,
        "peak_gib": gib(peak), "held_after_build_gib": gib(held), "fsdp_enabled": fsdp_enabled,
        "lm_head_dtensor": dtensor_head, "final_loss": logs[-1]["loss"] if logs else None,
        "completion_mean_length": logs[-1].get("completions/mean_length") if logs else None, **extra,
    }
    if rollout_times:
        result["rollout_s"] = statistics.median(rollout_times[warm:] or rollout_times)
    if task.get("fsdp2"):
        cpu_fallback = meter.device.type == "cpu" and ctx.get("cpu_fsdp2")  # why FSDP2 could not run on this CPU
        if cpu_fallback:
            result["note"] = f"CPU without FSDP2 ({cpu_fallback}): ran as DDP with world size 1"
        elif not (fsdp_enabled and dtensor_head):
            raise RuntimeError(f"FSDP2 was requested but the trainer ran with fsdp_enabled={fsdp_enabled}, "
                               f"lm_head DTensor={dtensor_head}: the DTensor lm_head path did not run")
        elif meter.device.type == "cpu":
            result["note"] = "CPU: accelerate's FSDP2 plugin on gloo (tests/cpu_fsdp2.py)"
    return result


def run_generation_task(task: dict, ctx: dict) -> dict:
    """MixSD target decoding (both conditionals) vs `model.generate` (greedy, the expert prompts): tokens/s at the same
    batch, EOS disabled so both decode exactly `new_tokens` per sequence (`mixsd_throughput.measure_decoding`).
    Default: the fact prompts, in the layout the `auto` rule picks. `expert_ratios`: long expert contexts (a reference
    solution at least that many times the naive prompt), each in both KV-cache layouts, `shared` and `split`."""
    from mixsd_throughput import LAYOUTS, measure_decoding, stretch_expert_prompts

    from trl_sdx.mixsd import build_prompt_ids
    from trl_sdx.mixsd.decode_cache import choose_cache_layout
    from trl_sdx.mixsd.prompts import resolve_template

    meter, cfg, tiny = ctx["meter"], ctx["config"]["trainers"], ctx["tiny"]
    tokenizer = ctx.setdefault("tokenizer", make_tokenizer(ctx["config"]["vocab"]))
    cuda = meter.device.type == "cuda"
    model = make_model("0.6B", tiny, tokenizer, meter.device, torch.bfloat16 if cuda else torch.float32).eval()
    rows = knowledge_rows(cfg["mixsd_generation_batch"], cfg["prompt_words"], ctx["config"]["vocab"])
    measure = dict(new_tokens=cfg["completion_len"], repeats=cfg["generation_repeats"],
                   pad_token_id=tokenizer.pad_token_id, now=meter.now)
    if not task.get("expert_ratios"):
        naive, expert = build_prompt_ids(tokenizer, rows["question"], rows["answer"], *resolve_template("fact"))
        auto = choose_cache_layout(model, naive, expert)
        r = measure_decoding(model, naive, expert, layouts=(auto,), **measure)
        tps = {"model_generate": r["tokens_per_s"]["model_generate"],
               "mixed_generate": r["tokens_per_s"][f"mixed_{auto}"]}
        result = {"status": "ok", "tokens": r["batch"] * r["new_tokens"], "batch": r["batch"],
                  "new_tokens": r["new_tokens"], "layout": auto, "tokens_per_s": tps,
                  "seconds": {"model_generate": r["seconds"]["model_generate"],
                              "mixed_generate": r["seconds"][f"mixed_{auto}"]},
                  "ratio_mixed_over_generate": tps["mixed_generate"] / tps["model_generate"]}
    else:  # to fit the section's time box: half the tokens, one repeat fewer (ratios are what is compared)
        measure.update(new_tokens=max(1, cfg["completion_len"] // 2), repeats=max(1, cfg["generation_repeats"] - 1))
        result = {"status": "ok", "rows": {}}
        for ratio in task["expert_ratios"]:
            naive, expert = stretch_expert_prompts(tokenizer, rows["question"], rows["answer"], ratio,
                                                   *resolve_template("reasoning"))
            result["rows"][f"expert >= {ratio:g}x naive"] = measure_decoding(model, naive, expert, layouts=LAYOUTS,
                                                                             **measure)
    del model
    meter.release()
    return result


def run_task(task: dict, ctx: dict) -> dict:
    try:
        if task["trainer"] == "mixsd_generation":
            return run_generation_task(task, ctx)
        return run_trainer_task(task, ctx)
    except Unavailable as reason:
        ctx["meter"].release()
        return {"status": "unavailable", "reason": str(reason)}
