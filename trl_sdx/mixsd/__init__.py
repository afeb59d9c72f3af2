"""MixSD: knowledge injection by SFT on mixed contextual self-distillation targets (arXiv 2605.16865)."""

from .answers import boxed_answer_checker, boxed_or_last_number_checker, extract_boxed
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
from .prompts import PROMPT_TEMPLATES, build_prompt_ids, expert_user_message, stop_token_ids
from .rejection import MixedTarget, rejection_sample, summarize_targets
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
    "boxed_answer_checker",
    "boxed_or_last_number_checker",
    "evaluate_knowledge_injection",
    "extract_boxed",
    "expert_user_message",
    "gold_sft_dataset",
    "greedy_answers",
    "lenient_answer_checker",
    "mixed_generate",
    "rejection_sample",
    "select_mixed_tokens",
    "stop_token_ids",
    "summarize_targets",
    "target_nll_stats",
]
