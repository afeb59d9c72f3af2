"""examples/configs/entropy_gkd.yaml is the paper's schedule (issue 10, item 7), read by the CLI's own parser.

The paper (`../shared/specs/eopd.md`, "Reported set-up"): 128 prompts per rollout, mini-batch 32 -> 4 optimizer
steps per rollout, 1 pass over each rollout, AdamW lr 3e-6 cosine with 10 warm-up steps, weight decay 0.1, max prompt
1024, max response 4096, temperature 1.0, top-p 1.0, 3 epochs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from trl_sdx.entropy_gkd import EntropyAwareGKDConfig
from trl_sdx.scripts.entropy_gkd import make_parser

PAPER_YAML = Path(__file__).parents[1] / "examples" / "configs" / "entropy_gkd.yaml"
PROMPTS_PER_ROLLOUT, MINI_BATCH = 128, 32  # the paper's numbers


def _parse(monkeypatch, num_processes: int, *flags: str):
    """The yaml as `trl-sdx entropy-gkd --config ...` reads it on `num_processes` processes (CPU, fp32 here)."""
    monkeypatch.setattr(EntropyAwareGKDConfig, "world_size", property(lambda self: num_processes))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, args, model_args = make_parser().parse_args_and_config(
            ["--config", str(PAPER_YAML), "--bf16", "false", "--use_cpu", "true", *flags])
    deprecated = [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]
    return args, model_args, deprecated


@pytest.mark.parametrize(("num_processes", "flags"), [(8, ()), (1, ("--gradient_accumulation_steps", "8"))])
def test_paper_schedule_gives_four_optimizer_steps_per_rollout(monkeypatch, num_processes, flags):
    args, _, _ = _parse(monkeypatch, num_processes, *flags)
    mini_batch = args.per_device_train_batch_size * num_processes * args.gradient_accumulation_steps
    assert (args.generation_batch_size, mini_batch, args.num_iterations) == (PROMPTS_PER_ROLLOUT, MINI_BATCH, 1)
    assert args.optimizer_steps_per_rollout == 4
    # Every micro-batch of a rollout is used once: rollout = micro-batches x per-process batch x processes.
    assert args.steps_per_generation * args.per_device_train_batch_size * num_processes == PROMPTS_PER_ROLLOUT


def test_paper_optimiser_sampling_and_lengths(monkeypatch):
    args, model_args, deprecated = _parse(monkeypatch, 8)
    assert deprecated == []  # current TrainingArguments / ModelConfig names only
    assert (args.learning_rate, args.lr_scheduler_type, args.warmup_steps, args.weight_decay) == (
        3e-6, "cosine", 10, 0.1)
    assert args.optim.startswith("adamw") and args.num_train_epochs == 3
    assert (args.max_prompt_length, args.max_completion_length) == (1024, 4096)
    assert args.vllm_max_model_length == args.max_prompt_length + args.max_completion_length
    assert (args.temperature, args.top_p, args.top_k) == (1.0, 1.0, 0)
    assert (args.tau, args.alpha, args.fkl_top_k, args.clip_eps, args.rkl_estimator) == (0.8, 1.0, 16, 0.2, "sampled")
    assert args.activation_checkpointing and model_args.dtype == "bfloat16"
    assert args.chat_template_kwargs == {"enable_thinking": False}


def test_prompt_over_the_limit_is_an_error_not_a_truncation():
    from trl_sdx.entropy_gkd.prompt_length import check_prompt_length

    check_prompt_length(1024, 1024)
    check_prompt_length(5000, None)
    with pytest.raises(ValueError, match="1025 tokens, more than `max_prompt_length`=1024"):
        check_prompt_length(1025, 1024)


def test_trainer_counts_long_prompts_at_construction(tmp_path):
    from tiny_trainers import build_entropy_gkd

    trainer = build_entropy_gkd(tmp_path, max_steps=1, max_prompt_length=64)
    tokenizer = trainer.processing_class
    lengths = [len(tokenizer.apply_chat_template(p, add_generation_prompt=True)["input_ids"])
               for p in trainer.train_dataset["prompt"]]
    limit = sorted(lengths)[len(lengths) // 2]  # about half of the prompts are longer
    too_long = sum(length > limit for length in lengths)
    assert 0 < too_long < len(lengths)
    with pytest.raises(ValueError, match=f"{too_long} of the {len(lengths)} prompts .* longer than "
                                         f"`max_prompt_length`={limit} tokens \\(the longest has {max(lengths)}\\)"):
        build_entropy_gkd(tmp_path, max_steps=1, max_prompt_length=limit)
