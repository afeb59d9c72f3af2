"""Construction-time checks shared by the trainers.

Every check raises `ValueError` naming the argument and the fix, so a misconfigured run fails in
seconds instead of training on silently wrong targets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def check_tokenizer(tokenizer, *, argument: str = "processing_class", need_chat_template: bool = True,
                    need_pad_token: bool = True) -> None:
    """A pad token is needed to batch rollouts; a chat template to build the prompts the methods specify."""
    if tokenizer is None:
        raise ValueError(f"`{argument}` is None: pass the tokenizer of the model (AutoTokenizer.from_pretrained(...)).")
    if need_pad_token and getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError(
            f"`{argument}` has no pad token. Set one before building the trainer, e.g. "
            "`tokenizer.pad_token = tokenizer.eos_token`."
        )
    if need_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"`{argument}` has no chat template, which this method needs to build its prompts. Use an instruct "
            "tokenizer or set `tokenizer.chat_template` (e.g. a ChatML template)."
        )


def _vocab_size(model) -> int:
    """The number of logits the model emits (its lm_head rows), which is what distillation aligns."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and getattr(output, "weight", None) is not None:
        return output.weight.shape[0]
    return model.config.vocab_size


def check_same_vocab(student, teacher, student_tokenizer=None, teacher_tokenizer=None) -> None:
    """Token-level distillation compares logits index by index: both sides must mean the same tokens."""
    s_vocab, t_vocab = _vocab_size(student), _vocab_size(teacher)
    if s_vocab != t_vocab:
        raise ValueError(
            f"Teacher and student vocab sizes differ (student {s_vocab} logits, teacher {t_vocab}). Token-level "
            "distillation needs one shared vocabulary: pick a teacher from the student's model family, or resize "
            "both embeddings to the same tokenizer (`model.resize_token_embeddings(len(tokenizer))`)."
        )
    if student_tokenizer is not None and teacher_tokenizer is not None:
        if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
            raise ValueError(
                "`teacher_processing_class` and `processing_class` map tokens to different ids. Use the same "
                "tokenizer for teacher and student (the student's is used for both when you pass none)."
            )


def check_columns(dataset, required: Iterable[str], *, argument: str = "train_dataset", hint: str = "") -> None:
    """Fail before training on a dataset that lacks a column the method reads."""
    if dataset is None:
        raise ValueError(f"`{argument}` is None: pass a `datasets.Dataset`.")
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        return  # an IterableDataset without features: checked on the first batch instead
    if isinstance(columns, dict):  # DatasetDict
        raise ValueError(f"`{argument}` is a DatasetDict; pass one split, e.g. `dataset['train']`.")
    missing = [name for name in required if name not in columns]
    if missing:
        raise ValueError(
            f"`{argument}` lacks the column(s) {missing} (it has {list(columns)}). {hint}".rstrip()
        )
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(f"`{argument}` is empty: it needs at least one row.")


def check_range(name: str, value: float, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, allow_inf: bool = False) -> None:
    """`name` must lie in [low, high] (or the open variant); NaN is always rejected."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    if math.isinf(value) and not allow_inf:
        raise ValueError(f"`{name}` must be finite, got {value}.")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        span = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
        raise ValueError(f"`{name}` must lie in {span}, got {value}.")


def check_top_k(name: str, top_k: int | None, vocab_size: int | None = None) -> None:
    """`top_k=None` means the full vocabulary; otherwise 1 <= top_k <= vocab size."""
    if top_k is None:
        return
    if int(top_k) != top_k or top_k <= 0:
        raise ValueError(f"`{name}` must be a positive integer or None (full vocabulary), got {top_k}.")
    if vocab_size is not None and top_k > vocab_size:
        raise ValueError(
            f"`{name}`={top_k} is larger than the vocabulary ({vocab_size}); use at most {vocab_size} or None."
        )


def context_length(model) -> int | None:
    """The longest sequence the model was built for (None when its config does not say)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "max_position_embeddings", None)


def check_fits_context(longest_prompt: int, max_new_tokens: int | None, model, *, argument: str = "train_dataset",
                       knob: str = "max_completion_length") -> None:
    """A prompt plus its completion must fit the model's context: past it, RoPE models silently produce garbage."""
    limit = context_length(model)
    if limit is None or max_new_tokens is None:
        return
    if longest_prompt + max_new_tokens > limit:
        raise ValueError(
            f"A prompt of `{argument}` has {longest_prompt} tokens; with `{knob}`={max_new_tokens} that exceeds the "
            f"model's context of {limit} tokens. Drop or shorten long prompts (e.g. `dataset.filter(lambda row: "
            f"len(tokenizer.apply_chat_template(row['prompt'], return_dict=True)['input_ids']) <= {max(limit - max_new_tokens, 0)})`) or lower "
            f"`{knob}`."
        )
