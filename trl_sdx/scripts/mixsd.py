"""MixSD knowledge injection from the command line: build the mixed targets with the base model, then SFT.

```bash
# Offline CPU demo: inject 20 fictional facts into SmolLM2-135M-Instruct, then report memorisation and retention
trl-sdx mixsd --config examples/configs/mixsd_demo.yaml

# Only build (or reload from the cache) the targets; one summary line, per-fact detail in mixsd_targets.json
trl-sdx mixsd --config examples/configs/mixsd_demo.yaml --generate_only

# Evaluate a trained model: memorisation on the injected facts, retention relative to the base model
trl-sdx mixsd --config examples/configs/mixsd_demo.yaml --evaluate_only \
    --model_name_or_path outputs/mixsd_demo --base_model_name_or_path smollm2-135m-instruct

# The paper's settings on a GPU (Qwen3-1.7B; every GPU builds a shard of the targets under multi_gpu)
trl-sdx mixsd --config examples/configs/mixsd.yaml --accelerate_config multi_gpu

# Your own data: a hub dataset or local path with `question` / `answer` columns (the gold answer turn)
trl-sdx mixsd --model_name_or_path Qwen/Qwen3-1.7B --dataset_name my/facts --lambda_mix 0.3 \
    --learning_rate 1e-5 --lr_scheduler_type constant_with_warmup --warmup_steps 20 --output_dir Qwen3-MixSD
```

Model names go through `trl_sdx.models.resolve_model_name_or_path`, so the embedded alias
`smollm2-135m-instruct` works wherever a path does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser

from trl_sdx.mixsd import MixSDConfig
from trl_sdx.process_group import end_process_group

SYNTHETIC_KNOWLEDGE = "synthetic-knowledge"


@dataclass
class MixSDScriptArguments(ScriptArguments):
    """TRL's `ScriptArguments` plus the MixSD run modes and the built-in synthetic knowledge base."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": f"Dataset: a hub name or local path loaded with `datasets.load_dataset` (columns `question` and "
            f"`answer`, see `question_column`/`answer_column`), or `{SYNTHETIC_KNOWLEDGE}` for generated facts "
            "about fictional entities plus held-out probe questions (offline)."
        },
    )
    synthetic_num_entities: int = field(
        default=25, metadata={"help": f"Entities of `{SYNTHETIC_KNOWLEDGE}` (2 facts each: 25 → 50 facts)."}
    )
    synthetic_seed: int = field(default=0, metadata={"help": f"Seed of `{SYNTHETIC_KNOWLEDGE}`."})
    probe_split: str | None = field(
        default="probe",
        metadata={"help": "Split with held-out probe questions (question/answer) for retention; skipped if absent."},
    )
    generate_only: bool = field(
        default=False,
        metadata={"help": "Build (or reload from the cache) the mixed targets, print their statistics and the base "
                  "model's NLL of SFT vs MixSD targets, then exit without training."},
    )
    evaluate_only: bool = field(
        default=False,
        metadata={"help": "Evaluate `--model_name_or_path` (memorisation on the training questions, accuracy on the "
                  "probe split) without training; retention is relative to `--base_model_name_or_path` if set."},
    )
    evaluate: bool = field(
        default=False,
        metadata={"help": "After training, evaluate the base and the trained model (memorisation, retention, "
                  "target NLL) and write the report."},
    )
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model that `--evaluate_only` measures retention against."}
    )
    eval_max_new_tokens: int = field(default=64, metadata={"help": "Greedy answer length during evaluation."})
    eval_output_file: str | None = field(
        default=None,
        metadata={"help": "Where the report (JSON) goes; default `<output_dir>/mixsd_eval.json` "
                  "(`<output_dir>/mixsd_targets.json` with `--generate_only`)."},
    )


def load_datasets(script_args: MixSDScriptArguments):
    """(train, probe or None)."""
    if script_args.dataset_name is None:
        raise ValueError(
            f"`--dataset_name` is required: a dataset with question/answer columns, or `{SYNTHETIC_KNOWLEDGE}`."
        )
    if script_args.dataset_name == SYNTHETIC_KNOWLEDGE:
        from trl_sdx.data import make_knowledge_dataset

        data = make_knowledge_dataset(script_args.synthetic_num_entities, seed=script_args.synthetic_seed)
    else:
        from datasets import load_dataset

        data = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    probe = data[script_args.probe_split] if script_args.probe_split and script_args.probe_split in data else None
    return data[script_args.dataset_train_split], probe


def _load(name_or_path: str, training_args: MixSDConfig):
    """Model and tokenizer loaded exactly as `MixSDTrainer` loads them (same dtype: same target cache key)."""
    from trl.trainer.utils import create_model_from_path

    from trl_sdx.models import load_tokenizer, resolve_model_name_or_path

    kwargs = dict(training_args.model_init_kwargs or {})
    kwargs.setdefault("trust_remote_code", training_args.trust_remote_code)
    model = create_model_from_path(resolve_model_name_or_path(name_or_path), **kwargs)
    if getattr(model, "hf_device_map", None) is None:
        model.to(training_args.device)
    return model, load_tokenizer(name_or_path, trust_remote_code=training_args.trust_remote_code)


def _knowledge(model, tokenizer, train, probe, args: MixSDConfig, max_new_tokens: int, base_probe=None) -> dict:
    from trl_sdx.mixsd import evaluate_knowledge_injection

    if probe is None:
        probe = train.select([])
    return evaluate_knowledge_injection(
        model, tokenizer, train, probe, base_probe_accuracy=base_probe, question_column=args.question_column,
        answer_column=args.answer_column, max_new_tokens=max_new_tokens, batch_size=args.generation_batch_size,
        chat_template_kwargs=args.chat_template_kwargs, disable_progress=args.disable_tqdm,
    )


def _target_nll(model, tokenizer, mixsd_targets, args: MixSDConfig) -> dict:
    """The base model's NLL of the SFT targets (gold answers) and of the MixSD targets, same questions."""
    from trl_sdx.mixsd import target_nll_stats

    keep = mixsd_targets.kept_indices(args.keep_failed)
    questions = [mixsd_targets.questions[i] for i in keep]
    kwargs = dict(chat_template_kwargs=args.chat_template_kwargs)
    return {
        "sft": target_nll_stats(model, tokenizer, questions, [mixsd_targets.gold_answers[i].strip() for i in keep],
                                **kwargs),
        "mixsd": target_nll_stats(model, tokenizer, questions, [mixsd_targets.targets[i].completion for i in keep],
                                  **kwargs),
    }


def _target_rows(mixsd_targets) -> list[dict]:
    """Per fact: question, gold answer, target and how it was obtained (the report file's detail)."""
    return [{"question": q, "gold": g, **t.to_dict()}
            for q, g, t in zip(mixsd_targets.questions, mixsd_targets.gold_answers, mixsd_targets.targets,
                               strict=True)]


def targets_summary(stats: dict, target_nll: dict | None = None) -> str:
    """One line about the targets (the report file holds the per-fact detail)."""
    line = (f"MixSD targets: {stats['num_examples']} facts, {stats['num_accepted']} accepted, "
            f"{stats['num_dropped']} dropped ({stats.get('num_truncated', 0)} cut off by max_new_tokens), "
            f"naive-token share {stats['naive_token_share']:.2f}, mean retries {stats['mean_retries']:.2f}")
    if target_nll:
        line += (f"; base-model tokens with NLL > 5: SFT {target_nll['sft']['high_nll_share']:.2f}, "
                 f"MixSD {target_nll['mixsd']['high_nll_share']:.2f}")
    return line


def evaluation_summary(report: dict) -> str:
    """One line: memorisation and probe accuracy (base → trained when both were evaluated), retention."""
    def figure(name):
        values = [f"{report[stage][name]:.2f}" for stage in ("base", "trained") if stage in report]
        return " → ".join(values)

    line = f"MixSD evaluation: memorisation {figure('memorisation')}, probe accuracy {figure('probe_accuracy')}"
    retention = report.get("trained", {}).get("retention")
    return line + (f" (retention {retention:.2f})" if retention is not None else "")


def _write_report(report: dict, summary: str, script_args: MixSDScriptArguments, training_args: MixSDConfig,
                  default_name: str = "mixsd_eval.json") -> None:
    """The whole report to a JSON file in the output dir; one summary line to the console."""
    path = script_args.eval_output_file or os.path.join(training_args.output_dir, default_name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"{summary}. Details: {path}")


def main(script_args: MixSDScriptArguments, training_args: MixSDConfig, model_args: ModelConfig):
    from trl import get_peft_config, get_quantization_config

    from trl_sdx.mixsd import MixSDTrainer, build_mixsd_targets
    from trl_sdx.mixsd.targets import base_model_context
    from trl_sdx.models import resolve_model_name_or_path

    if model_args.model_name_or_path is None:
        raise ValueError("`--model_name_or_path` is required (the base model the facts are injected into).")
    model_init_kwargs = dict(revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
                             attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    train_dataset, probe = load_datasets(script_args)
    max_new = script_args.eval_max_new_tokens

    if script_args.evaluate_only:
        report = {"model": model_args.model_name_or_path}
        base_probe = None
        if script_args.base_model_name_or_path:
            base, tokenizer = _load(script_args.base_model_name_or_path, training_args)
            report["base"] = _knowledge(base, tokenizer, train_dataset, probe, training_args, max_new)
            base_probe = report["base"]["probe_accuracy"]
            del base
        model, tokenizer = _load(model_args.model_name_or_path, training_args)
        report["trained"] = _knowledge(model, tokenizer, train_dataset, probe, training_args, max_new, base_probe)
        _write_report(report, evaluation_summary(report), script_args, training_args)
        return

    if script_args.generate_only:
        model, tokenizer = _load(model_args.model_name_or_path, training_args)
        targets = build_mixsd_targets(model, tokenizer, train_dataset, training_args)  # sharded across processes
        if not training_args.distributed_state.is_main_process:
            return
        report = {"stats": targets.stats, "cache_entry": targets.cache_entry, "from_cache": targets.from_cache,
                  "target_nll": _target_nll(model, tokenizer, targets, training_args),
                  "targets": _target_rows(targets)}
        summary = targets_summary(targets.stats, report["target_nll"]) + f"; cache entry {targets.cache_entry}"
        _write_report(report, summary, script_args, training_args, default_name="mixsd_targets.json")
        return

    trainer = MixSDTrainer(
        model=resolve_model_name_or_path(model_args.model_name_or_path),
        args=training_args,
        train_dataset=train_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    is_main = trainer.accelerator.is_main_process
    report = {"model": model_args.model_name_or_path, "mixsd_stats": trainer.mixsd_stats,
              "targets": _target_rows(trainer.mixsd_targets)}
    trainer.accelerator.print(targets_summary(trainer.mixsd_stats))
    if script_args.evaluate and is_main:
        # Before training the model is still the base (a fresh LoRA adapter is the identity; disabled anyway).
        with base_model_context(trainer.model):
            report["base"] = _knowledge(trainer.model, trainer.processing_class, train_dataset, probe,
                                        training_args, max_new)
            report["target_nll"] = _target_nll(trainer.model, trainer.processing_class, trainer.mixsd_targets,
                                               training_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if script_args.evaluate and is_main:
        report["trained"] = _knowledge(trainer.model, trainer.processing_class, train_dataset, probe, training_args,
                                       max_new, report["base"]["probe_accuracy"])
        _write_report(report, evaluation_summary(report), script_args, training_args)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((MixSDScriptArguments, MixSDConfig, ModelConfig), prog=prog)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
    end_process_group()  # every rank together: a live Gloo group can abort the exit
