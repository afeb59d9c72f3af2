"""The paper's prompt limit (`max_prompt_length`, 1024 tokens), enforced without truncating anything.

TRL's `DistillationConfig` has no prompt limit (it keeps prompts whole). The paper's runs cap prompts at 1024
tokens; here a longer prompt is an error naming the fix, so a run never trains on a shortened question.
"""

from __future__ import annotations


def check_prompt_length(longest_prompt: int, max_prompt_length: int | None) -> None:
    """Raise when a rollout holds a prompt longer than `max_prompt_length` tokens (`None`: no limit)."""
    if max_prompt_length is None or longest_prompt <= max_prompt_length:
        return
    raise ValueError(
        f"A prompt of `train_dataset` has {longest_prompt} tokens, more than `max_prompt_length`={max_prompt_length}. "
        f"Drop long prompts before training (e.g. `dataset.filter(lambda row: len(tokenizer.apply_chat_template("
        f"row['prompt'], add_generation_prompt=True)) <= {max_prompt_length})`) or raise `max_prompt_length`."
    )
