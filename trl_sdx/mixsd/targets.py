"""Turn a (question, gold answer) dataset into MixSD training targets, cached on disk."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field

from datasets import Dataset

from .answers import boxed_answer_checker, boxed_or_last_number_checker
from .cache import (
    cache_key,
    callable_identity,
    data_fingerprint,
    load_targets,
    model_fingerprint,
    save_targets,
    sharded_parameters,
    tokenizer_fingerprint,
)
from .prompts import build_prompt_ids, resolve_template, stop_token_ids
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

    def to_sft_dataset(self, keep_failed: bool = False, chat_template_kwargs: dict | None = None) -> Dataset:
        """Conversational prompt/completion rows: x⁻ as the prompt, the mixed target as the completion.

        SFTTrainer then applies the chat template and masks the prompt (completion-only NLL, the paper's loss).
        `chat_template_kwargs` becomes a column SFTTrainer passes to `apply_chat_template`, so training renders
        x⁻ exactly as generation did (e.g. Qwen3 with `enable_thinking=False`).
        """
        keep = self.kept_indices(keep_failed)
        return _sft_rows([self.questions[i] for i in keep], [self.targets[i].completion for i in keep],
                         chat_template_kwargs)


def _sft_rows(prompts: list[str], completions: list[str], chat_template_kwargs: dict | None) -> Dataset:
    rows = {
        "prompt": [[{"role": "user", "content": q}] for q in prompts],
        "completion": [[{"role": "assistant", "content": c}] for c in completions],
    }
    if chat_template_kwargs:
        rows["chat_template_kwargs"] = [dict(chat_template_kwargs) for _ in prompts]
    return Dataset.from_dict(rows)


def gold_sft_dataset(dataset: Dataset, question_column: str = "question", answer_column: str = "answer",
                     chat_template_kwargs: dict | None = None) -> Dataset:
    """Plain-SFT rows (prompt x⁻, completion y*): the baseline MixSD is compared with, and the eval set format."""
    return _sft_rows(list(dataset[question_column]), [a.strip() for a in dataset[answer_column]],
                     chat_template_kwargs)


def base_model_context(model):
    """Decode with the base weights: a PEFT model with its adapters disabled (no second copy), else the model."""
    from accelerate.utils import is_peft_model

    return model.disable_adapter() if is_peft_model(model) else contextlib.nullcontext()


def resolve_answer_checker(answer_checker: AnswerChecker | None, answer_match: str = "boxed") -> AnswerChecker:
    """The checker rejection sampling uses: the caller's callable, else the one `answer_match` names."""
    if answer_checker is not None:
        return answer_checker
    if answer_match == "lenient":
        from .evaluation import lenient_answer_checker

        return lenient_answer_checker
    return {"boxed": boxed_answer_checker, "boxed_or_last_number": boxed_or_last_number_checker}[answer_match]


def target_cache_inputs(model, tokenizer, questions, gold_answers, args, answer_checker: AnswerChecker) -> dict:
    """Everything the targets depend on, as the cache key's inputs: a change of any of them is a new entry."""
    prefix, transition = resolve_template(args.prompt_template, args.expert_prefix, args.expert_transition)
    with base_model_context(model):
        weights = model_fingerprint(model)
    config = model.config
    return {
        "model": weights,
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "generation_eos": getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        "stop_token_ids": stop_token_ids(tokenizer, model),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template_kwargs": getattr(args, "chat_template_kwargs", None),
        "data": data_fingerprint(questions, gold_answers),
        "lambda_mix": args.lambda_mix,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "max_new_tokens": args.max_new_tokens,
        "max_retries": args.max_retries,
        "seed": args.seed if args.mixsd_seed is None else args.mixsd_seed,
        "expert_prefix": prefix,
        "expert_transition": transition,
        "answer_checker": callable_identity(answer_checker),
        "decoder": "vllm" if getattr(args, "mixsd_use_vllm", False) else "kv_cache",  # different kernels
    }


def check_full_weights(model) -> None:
    """Refuse to decode with weights this process holds only a shard of, naming the workarounds."""
    sharded = sharded_parameters(model)
    if sharded:
        raise ValueError(
            f"MixSD builds its targets with the full base weights, but {len(sharded)} parameters (e.g. "
            f"{sharded[0]!r}) are sharded in this process (DeepSpeed ZeRO-3 or FSDP CPU-RAM-efficient loading "
            "partition them at load). Build the targets first without ZeRO-3 (e.g. `trl-sdx mixsd --generate_only` "
            "with the same arguments, single process or plain DDP) and point `mixsd_targets_path` at the cache "
            "entry it prints; or train with ZeRO-2 / FSDP with `fsdp_cpu_ram_efficient_loading: false`, which "
            "load the full weights before wrapping."
        )


def _gather(values: list, state) -> list:
    """Every process's list, concatenated in rank order (pickled objects; works on gloo and NCCL)."""
    if state.num_processes == 1:
        return list(values)
    import torch.distributed as dist

    gathered = [None] * state.num_processes
    dist.all_gather_object(gathered, values)
    return [item for part in gathered for item in part]


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

    `args` is a `MixSDConfig` (only its MixSD fields are read). The cache key hashes everything the targets depend
    on (`target_cache_inputs`); on a hit the model is not run at all. Under several processes (accelerate, torchrun)
    every process builds the examples `i ≡ rank (mod world size)`; the shards are gathered in dataset order (each
    example's own generator makes that equal to a single-process run) and the main process writes the entry.
    """
    from accelerate import PartialState

    state = PartialState()
    checker = resolve_answer_checker(answer_checker, getattr(args, "answer_match", "boxed"))
    questions = [str(q) for q in dataset[args.question_column]]
    gold_answers = [str(a) for a in dataset[args.answer_column]]
    if getattr(args, "mixsd_targets_path", None):
        return _load_prebuilt(args.mixsd_targets_path, questions, gold_answers, args)
    check_full_weights(model)
    key_inputs = target_cache_inputs(model, tokenizer, questions, gold_answers, args, checker)
    key = cache_key(key_inputs)
    cache_dir = cache_dir or args.mixsd_cache_dir or os.path.join(args.output_dir or ".", "mixsd_cache")
    entry = os.path.join(cache_dir, key)
    cached = load_targets(entry)
    # Every process must take the same branch (a filesystem may show the entry to some nodes first).
    if all(_gather([cached is not None], state)):
        logger.info("MixSD: reusing %d cached targets from %s", len(cached[0]), entry)
        return _reused(cached, questions, gold_answers, entry, args)

    prefix, transition = key_inputs["expert_prefix"], key_inputs["expert_transition"]
    mine = list(range(state.process_index, len(questions), state.num_processes))
    naive_ids, expert_ids = build_prompt_ids(
        tokenizer, [questions[i] for i in mine], [gold_answers[i] for i in mine], prefix, transition,
        getattr(args, "chat_template_kwargs", None),
    )
    started = time.perf_counter()
    decoder = _vllm_decoder(model, args, state) if getattr(args, "mixsd_use_vllm", False) else None
    with base_model_context(model), contextlib.closing(decoder) if decoder else contextlib.nullcontext():
        shard = rejection_sample(
            model, tokenizer, naive_ids, expert_ids, [gold_answers[i] for i in mine],
            lambda_mix=args.lambda_mix, temperature=args.temperature, top_k=args.top_k,
            max_new_tokens=args.max_new_tokens, max_retries=args.max_retries,
            batch_size=args.generation_batch_size, seed=key_inputs["seed"], answer_checker=checker,
            eos_token_id=key_inputs["stop_token_ids"], example_indices=mine,
            disable_progress=bool(getattr(args, "disable_tqdm", False)) or not state.is_local_main_process,
            decoder=decoder,
        )
    elapsed = time.perf_counter() - started
    gathered = _gather([(i, t.to_dict()) for i, t in zip(mine, shard, strict=True)], state)
    targets = [MixedTarget(**t) for _, t in sorted(gathered, key=lambda item: item[0])]
    stats = summarize_targets(targets, keep_failed=args.keep_failed)
    stats["generation_seconds"] = round(max(_gather([elapsed], state)), 3)
    stats["num_processes"] = state.num_processes
    stats["keep_failed"] = args.keep_failed
    metadata = {"key": key, "inputs": key_inputs, "stats": stats}
    if state.is_main_process:  # one writer, even across nodes sharing the filesystem
        save_targets(entry, targets, metadata)
    logger.info(
        "MixSD targets: %d examples, %d accepted, %d dropped (%d cut off by max_new_tokens), naive-token share "
        "%.3f (λ=%s), mean retries %.2f; cached in %s", stats["num_examples"], stats["num_accepted"],
        stats["num_dropped"], stats["num_truncated"], stats["naive_token_share"], args.lambda_mix,
        stats["mean_retries"], entry,
    )
    return MixSDTargets(questions, gold_answers, targets, stats, entry, False, metadata)


def _vllm_decoder(model, args, state):
    from .vllm_decoding import VLLMTargetDecoder

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return VLLMTargetDecoder(model.config._name_or_path, seed=args.seed, dtype=dtype, num_processes=state.num_processes,
                             gpu_memory_utilization=args.mixsd_vllm_gpu_memory_utilization,
                             max_model_len=args.mixsd_vllm_max_model_len)


def _load_prebuilt(path, questions, gold_answers, args) -> MixSDTargets:
    """A cache entry built elsewhere (e.g. before a ZeRO-3 run, which cannot decode with sharded weights).

    The weights cannot be fingerprinted here, so this checks what it can: same data and mixing parameters.
    """
    cached = load_targets(path)
    if cached is None:
        raise ValueError(f"`mixsd_targets_path`={path!r} is not a complete MixSD cache entry (targets.jsonl and "
                         "metadata.json), e.g. the folder `trl-sdx mixsd --generate_only` reports.")
    targets, metadata = cached
    inputs = metadata.get("inputs", {})
    expected = {"data": data_fingerprint(questions, gold_answers), "lambda_mix": args.lambda_mix,
                "temperature": args.temperature, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens}
    different = [name for name, value in expected.items() if inputs.get(name) != value]
    if different:
        raise ValueError(f"`mixsd_targets_path`={path!r} was built for other inputs ({', '.join(different)} "
                         "differ): rebuild it with this run's dataset and mixing parameters.")
    return _reused(cached, questions, gold_answers, str(path), args)


def _reused(cached, questions, gold_answers, entry: str, args) -> MixSDTargets:
    """Targets read from an entry. `keep_failed` is not part of the key (an entry stores every example), so the
    statistics are recounted for this run's value."""
    targets, metadata = cached
    stats = {**metadata["stats"], **summarize_targets(targets, keep_failed=args.keep_failed),
             "keep_failed": args.keep_failed}
    return MixSDTargets(questions, gold_answers, targets, stats, entry, True, metadata)
