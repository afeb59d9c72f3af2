"""Turn a (question, gold answer) dataset into MixSD training targets, cached on disk."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field

from datasets import Dataset

from .cache import cache_key, data_fingerprint, load_targets, model_fingerprint, save_targets, tokenizer_fingerprint
from .mixed_decoding import _eos_ids
from .prompts import build_prompt_ids, resolve_template
from .rejection import AnswerChecker, MixedTarget, rejection_sample, summarize_targets

logger = logging.getLogger(__name__)


@dataclass
class MixSDTargets:
    """Targets of a training set, in dataset order, with what the paper reports about their construction."""

    questions: list[str]
    gold_answers: list[str]
    targets: list[MixedTarget]
    stats: dict
    cache_entry: str | None = None
    from_cache: bool = False
    metadata: dict = field(default_factory=dict)

    def kept_indices(self, keep_failed: bool) -> list[int]:
        return [i for i, t in enumerate(self.targets) if t.accepted or keep_failed]

    def to_sft_dataset(self, keep_failed: bool = False) -> Dataset:
        """Conversational prompt/completion rows: x⁻ as the prompt, the mixed target as the completion.

        SFTTrainer then applies the chat template and masks the prompt (completion-only NLL, the paper's loss).
        """
        keep = self.kept_indices(keep_failed)
        return Dataset.from_dict({
            "prompt": [[{"role": "user", "content": self.questions[i]}] for i in keep],
            "completion": [[{"role": "assistant", "content": self.targets[i].completion}] for i in keep],
        })


def gold_sft_dataset(dataset: Dataset, question_column: str = "question", answer_column: str = "answer") -> Dataset:
    """Plain-SFT rows (prompt x⁻, completion y*): the baseline MixSD is compared with, and the eval set format."""
    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": q}] for q in dataset[question_column]],
        "completion": [[{"role": "assistant", "content": a.strip()}] for a in dataset[answer_column]],
    })


def base_model_context(model):
    """Decode with the base weights: a PEFT model with its adapters disabled (no second copy), else the model."""
    from accelerate.utils import is_peft_model

    return model.disable_adapter() if is_peft_model(model) else contextlib.nullcontext()


def _checker_name(checker: AnswerChecker | None) -> str:
    if checker is None:
        return "default"
    return f"{getattr(checker, '__module__', '')}.{getattr(checker, '__qualname__', type(checker).__name__)}"


def build_mixsd_targets(
    model,
    tokenizer,
    dataset: Dataset,
    args,
    *,
    answer_checker: AnswerChecker | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> MixSDTargets:
    """MixSD targets of `dataset` (columns `args.question_column`, `args.answer_column`), from the cache if there.

    `args` is a `MixSDConfig` (only its MixSD fields are read). The cache key hashes the base weights, the tokenizer,
    the data, every mixing parameter and the answer checker's name; on a hit the model is not run at all.
    """
    if answer_checker is None and getattr(args, "answer_match", "final_answer") == "lenient":
        from .evaluation import lenient_answer_checker as answer_checker
    questions = [str(q) for q in dataset[args.question_column]]
    gold_answers = [str(a) for a in dataset[args.answer_column]]
    prefix, transition = resolve_template(args.prompt_template, args.expert_prefix, args.expert_transition)
    seed = args.seed if args.mixsd_seed is None else args.mixsd_seed
    with base_model_context(model):
        model_id = model_fingerprint(model)
    key_inputs = {
        "model": model_id,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": data_fingerprint(questions, gold_answers),
        "lambda_mix": args.lambda_mix,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "max_new_tokens": args.max_new_tokens,
        "max_retries": args.max_retries,
        "seed": seed,
        "expert_prefix": prefix,
        "expert_transition": transition,
        "answer_checker": _checker_name(answer_checker),
    }
    key = cache_key(key_inputs)
    cache_dir = cache_dir or args.mixsd_cache_dir or os.path.join(args.output_dir or ".", "mixsd_cache")
    entry = os.path.join(cache_dir, key)
    cached = load_targets(entry)
    if cached is not None:
        targets, metadata = cached
        logger.info("MixSD: reusing %d cached targets from %s", len(targets), entry)
        # `keep_failed` is not part of the key (the entry stores every example): recount for this run's value.
        stats = {**metadata["stats"], **summarize_targets(targets, keep_failed=args.keep_failed),
                 "keep_failed": args.keep_failed}
        return MixSDTargets(questions, gold_answers, targets, stats, entry, True, metadata)

    naive_ids, expert_ids = build_prompt_ids(tokenizer, questions, gold_answers, prefix, transition)
    # Stop at the tokenizer's end-of-turn as well as the model's EOS (they differ for some chat models).
    eos = _eos_ids(model, None) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    started = time.perf_counter()
    with base_model_context(model):
        targets = rejection_sample(
            model, tokenizer, naive_ids, expert_ids, gold_answers,
            lambda_mix=args.lambda_mix, temperature=args.temperature, top_k=args.top_k,
            max_new_tokens=args.max_new_tokens, max_retries=args.max_retries,
            batch_size=args.generation_batch_size, seed=seed, answer_checker=answer_checker,
            eos_token_id=sorted(eos),
        )
    stats = summarize_targets(targets, keep_failed=args.keep_failed)
    stats["generation_seconds"] = round(time.perf_counter() - started, 3)
    stats["keep_failed"] = args.keep_failed
    metadata = {"key": key, "inputs": key_inputs, "stats": stats}
    save_targets(entry, targets, metadata)
    logger.info(
        "MixSD targets: %d examples, %d accepted, %d dropped, naive-token share %.3f (λ=%s), mean retries %.2f; "
        "cached in %s", stats["num_examples"], stats["num_accepted"], stats["num_dropped"],
        stats["naive_token_share"], args.lambda_mix, stats["mean_retries"], entry,
    )
    return MixSDTargets(questions, gold_answers, targets, stats, entry, False, metadata)
