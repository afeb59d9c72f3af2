"""SD-Zero's teacher input (spec, Phase 2): the reviser reads its own answer, the reward phrase, then re-reads it.

For each sample, with r the binary reward of the on-policy completion y:

    teacher ids = chat(x, add_generation_prompt=True) ids + y ids + ids("\\n\\n" + P_r + "\\n\\n") + y ids

Only the second copy of y is scored. The teacher logit that predicts y_t in the second copy is aligned with the
student logit that predicts y_t after chat(x) + y_<t. Everything here is pure tensor bookkeeping (no model, no
tokenizer) so it can be tested token by token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

SEPARATOR = "\n\n"


def control_text(phrase: str) -> str:
    """The text inserted between the two copies of y: "\\n\\n" + P_r + "\\n\\n" (spec: control phrases)."""
    return f"{SEPARATOR}{phrase}{SEPARATOR}"


def truncated_length(prompt_length: int, completion_length: int, delimiter_length: int, max_length: int | None) -> int:
    """Tokens of y kept so the teacher input fits (spec: truncation rule).

        if |x| + 2|y| + |delim| > max_length:  |y'| = (max_length - |x| - |delim|) // 2   (cut for student AND teacher)
        |y'| <= 0  ->  0, and the sample gets zero loss weight

    `max_length=None` keeps y whole.
    """
    if max_length is None or prompt_length + 2 * completion_length + delimiter_length <= max_length:
        return completion_length
    return max(0, (max_length - prompt_length - delimiter_length) // 2)


@dataclass
class TeacherInputs:
    """The teacher's batch, laid out so that `logits_to_keep = T` aligns it with the student's completion.

    `input_ids` is `[left-padded chat(x) + y + delim | second copy of y, right-padded to T]`: column t of the last T
    positions holds y_t for both the teacher and the student (whose input is `[left-padded chat(x) | y]`).
    """

    input_ids: torch.Tensor  # [B, P + T]
    attention_mask: torch.Tensor  # [B, P + T]
    loss_mask: torch.Tensor  # [B, T] 1 on the scored (kept) tokens of y, in the student's completion positions
    second_copy_mask: torch.Tensor  # [B, P + T] bool, True where the scored copy of y sits in `input_ids`
    completion_lengths: torch.Tensor  # [B] |y'| after truncation
    truncated: torch.Tensor  # [B] bool, y was cut to fit `max_length`
    sample_weight: torch.Tensor  # [B] float, 0 when not even one token of y fits


def _strip_one_eos(ids: list[int], eos_token_ids: Sequence[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in eos_token_ids else ids


def build_teacher_inputs(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    rewards: torch.Tensor | Sequence[int],
    delimiter_ids_by_reward: Mapping[int, Sequence[int]],
    max_length: int | None = None,
    *,
    pad_token_id: int,
    eos_token_ids: Sequence[int] = (),
    keep_eos_in_first_copy: bool = True,
) -> TeacherInputs:
    """Build SD-Zero's teacher batch from the student's rollout batch.

    Args:
        prompt_ids, prompt_mask: `[B, P_s]`, left-padded chat(x, add_generation_prompt=True) ids (TRL's layout).
        completion_ids, completion_mask: `[B, T]`, right-padded on-policy completions y (ending with EOS if it
            finished).
        rewards: `[B]` binary rewards r in {0, 1}; they pick the control phrase.
        delimiter_ids_by_reward: `{1: ids("\\n\\n" + P_1 + "\\n\\n"), 0: ids("\\n\\n" + P_0 + "\\n\\n")}`.
        max_length: the teacher's maximum input length for the truncation rule (`truncated_length`); None = no cut.
        pad_token_id: fills the padding.
        eos_token_ids: end-of-turn ids. Unless `keep_eos_in_first_copy`, one trailing EOS is dropped from the FIRST
            copy of y, so the teacher reads "y + delim" exactly as Phase 1 trained it (y_init text, then P_r). The
            second copy keeps its EOS: predicting the end of the answer is part of the distilled target.

    Returns:
        `TeacherInputs`. Zero-weight samples (nothing of y fits) get the prompt alone as teacher prefix and an
        all-zero loss mask, so the batch stays rectangular and nothing of them is scored.
    """
    batch_size, width = completion_ids.shape
    device = completion_ids.device
    rewards = torch.as_tensor(rewards).reshape(-1).tolist()
    if len(rewards) != batch_size:
        raise ValueError(f"`rewards` has {len(rewards)} entries for a batch of {batch_size} completions.")
    eos_token_ids = tuple(eos_token_ids)

    prefixes: list[list[int]] = []
    kept = torch.zeros(batch_size, dtype=torch.long)
    truncated = torch.zeros(batch_size, dtype=torch.bool)
    weight = torch.zeros(batch_size, dtype=torch.float32)
    for i in range(batch_size):
        x = prompt_ids[i][prompt_mask[i].bool()].tolist()
        y = completion_ids[i][completion_mask[i].bool()].tolist()
        reward = int(round(float(rewards[i])))
        if reward not in delimiter_ids_by_reward:
            raise ValueError(f"reward {rewards[i]!r} has no control phrase; rewards must be binary (0 or 1).")
        delimiter = list(delimiter_ids_by_reward[reward])
        length = truncated_length(len(x), len(y), len(delimiter), max_length)
        truncated[i] = length < len(y)
        if length <= 0:
            prefixes.append(x)  # nothing scored; the prompt keeps the row well-formed
            continue
        y = y[:length]
        first_copy = y if keep_eos_in_first_copy else _strip_one_eos(y, eos_token_ids)
        prefixes.append(x + first_copy + delimiter)
        kept[i] = length
        weight[i] = 1.0

    prefix_width = max(len(p) for p in prefixes)
    input_ids = torch.full((batch_size, prefix_width + width), pad_token_id, dtype=completion_ids.dtype)
    attention_mask = torch.zeros((batch_size, prefix_width + width), dtype=torch.long)
    for i, prefix in enumerate(prefixes):
        start = prefix_width - len(prefix)
        input_ids[i, start:prefix_width] = torch.tensor(prefix, dtype=completion_ids.dtype)
        attention_mask[i, start:prefix_width] = 1
        n = int(kept[i])
        input_ids[i, prefix_width : prefix_width + n] = completion_ids[i, :n].cpu()
        attention_mask[i, prefix_width : prefix_width + n] = 1

    positions = torch.arange(width)
    loss_mask = (positions.unsqueeze(0) < kept.unsqueeze(1)).long() * completion_mask.cpu().long()
    second_copy_mask = torch.zeros((batch_size, prefix_width + width), dtype=torch.bool)
    second_copy_mask[:, prefix_width:] = loss_mask.bool()
    return TeacherInputs(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        loss_mask=loss_mask.to(device),
        second_copy_mask=second_copy_mask.to(device),
        completion_lengths=kept.to(device),
        truncated=truncated.to(device),
        sample_weight=weight.to(device),
    )
