"""MixSD: knowledge injection by SFT on mixed contextual self-distillation targets (arXiv 2605.16865)."""

from .evaluation import (
    answer_accuracy,
    evaluate_knowledge_injection,
    greedy_answers,
    lenient_answer_checker,
    target_nll_stats,
)
from .mixed_decoding import MixedGenerationOutput, mixed_generate, select_mixed_tokens
from .mixsd_config import MixSDConfig
from .mixsd_trainer import MixSDTrainer
from .prompts import PROMPT_TEMPLATES, build_prompt_ids, expert_user_message
from .rejection import MixedTarget, default_answer_checker, rejection_sample, summarize_targets
from .targets import MixSDTargets, build_mixsd_targets, gold_sft_dataset

__all__ = [
    "MixSDConfig",
    "MixSDTargets",
    "MixSDTrainer",
    "MixedGenerationOutput",
    "MixedTarget",
    "PROMPT_TEMPLATES",
    "answer_accuracy",
    "build_mixsd_targets",
    "build_prompt_ids",
    "default_answer_checker",
    "evaluate_knowledge_injection",
    "expert_user_message",
    "gold_sft_dataset",
    "greedy_answers",
    "lenient_answer_checker",
    "mixed_generate",
    "rejection_sample",
    "select_mixed_tokens",
    "summarize_targets",
    "target_nll_stats",
]
