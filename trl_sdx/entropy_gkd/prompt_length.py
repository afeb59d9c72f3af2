"""The paper's prompt limit (`max_prompt_length`, 1024 tokens), enforced without truncating anything.

TRL's `DistillationConfig` has no prompt limit (it keeps prompts whole). The paper's runs cap prompts at 1024
tokens; here a longer prompt is an error naming the fix, so a run never trains on a shortened question. A map-style
training set is checked once at construction (all its prompts, tokenized as the trainer tokenizes them); every
rollout is checked again, which also covers streamed data sets.
"""

from __future__ import annotations

from datasets import Dataset


def _filter_hint(limit: int) -> str:
    return (f"Drop long prompts before training (e.g. `dataset.filter(lambda row: len(tokenizer.apply_chat_template("
            f"row['prompt'], add_generation_prompt=True)['input_ids']) <= {limit})`) or raise `max_prompt_length`.")


def check_prompt_length(longest_prompt: int, max_prompt_length: int | None) -> None:
    """Raise when a rollout holds a prompt longer than `max_prompt_length` tokens (`None`: no limit)."""
    if max_prompt_length is None or longest_prompt <= max_prompt_length:
        return
    raise ValueError(
        f"A prompt of `train_dataset` has {longest_prompt} tokens, more than `max_prompt_length`={max_prompt_length}. "
        + _filter_hint(max_prompt_length)
    )


def check_dataset_prompt_lengths(dataset, tokenize_prompts, max_prompt_length: int | None,
                                 batch_size: int = 256) -> None:
    """Count the prompts of a map-style `dataset` longer than `max_prompt_length` and raise if there are any.

    `tokenize_prompts(list_of_prompts)` returns the prompt ids first (`DistillationTrainer._tokenize_prompts`), so
    the lengths are exactly those a rollout will have. Streamed data sets are left to the per-rollout check.
    """
    if max_prompt_length is None or not isinstance(dataset, Dataset):
        return
    too_long, longest = 0, 0
    for start in range(0, len(dataset), batch_size):
        lengths = [len(ids) for ids in tokenize_prompts(dataset[start : start + batch_size]["prompt"])[0]]
        too_long += sum(length > max_prompt_length for length in lengths)
        longest = max(longest, *lengths)
    if too_long:
        raise ValueError(
            f"{too_long} of the {len(dataset)} prompts of `train_dataset` are longer than `max_prompt_length`="
            f"{max_prompt_length} tokens (the longest has {longest}). " + _filter_hint(max_prompt_length)
        )
