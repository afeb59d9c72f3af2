"""SD-Zero's binary reward r, from reward functions in TRL's (GRPO's) form."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from trl_sdx.rewards import boxed_answer_reward, math_verify_reward

# The released code's answer checks (spec, "Answer check"): Phase 1 grades the last \boxed{} by math equivalence,
# Phase 2 runs math-verify against "\boxed{" + answer + "}". Neither credits an unboxed answer.
PHASE1_DEFAULT_REWARD = boxed_answer_reward
PHASE2_DEFAULT_REWARD = math_verify_reward


def resolve_reward_funcs(reward_funcs, default: Callable = PHASE2_DEFAULT_REWARD
                         ) -> tuple[list[Callable], list[str], bool]:
    """(functions, names, uses_default). None -> `default` (a strict check against the dataset's `answer` column).

    Entries may be callables or "module.function" / "module:function" import paths (what the CLI passes).
    SD-Zero needs a verifiable 0/1 signal, so reward *models* are not accepted.
    """
    if reward_funcs is None or (isinstance(reward_funcs, (list, tuple)) and len(reward_funcs) == 0):
        return [default], [default.__name__], True
    if not isinstance(reward_funcs, (list, tuple)):
        reward_funcs = [reward_funcs]
    funcs, names = [], []
    for func in reward_funcs:
        if isinstance(func, str):
            func = import_reward_func(func)
        if isinstance(func, torch.nn.Module) or not callable(func):
            raise ValueError(
                f"`reward_funcs` entry {func!r} is not a reward function. SD-Zero grades each completion with a "
                "verifiable reward: pass callables `f(completions, **columns) -> list[float]` (e.g. "
                "`trl_sdx.rewards.boxed_answer_reward`) or their import paths, not reward models."
            )
        funcs.append(func)
        names.append(getattr(func, "__name__", type(func).__name__))
    return funcs, names, False


def import_reward_func(path: str) -> Callable:
    """'package.module.function' or 'package.module:function' -> the function."""
    module_name, sep, attribute = path.replace(":", ".").rpartition(".")
    if not sep or not module_name:
        raise ValueError(f"Reward function {path!r} must be an import path like 'trl_sdx.rewards.boxed_answer_reward'.")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"Cannot import reward function {path!r}: {error}") from error


def score_completions(
    reward_funcs: Sequence[Callable],
    inputs: list[dict[str, Any]],
    prompts: list,
    completions: list,
    completion_ids: list[list[int]],
    **extra,
) -> torch.Tensor:
    """[B, F] rewards; every dataset column besides the prompt reaches the functions as a keyword (GRPO's contract).

    A function may return None for a sample it does not grade; that becomes NaN and counts as 0 in the weighted sum.
    """
    keys = [key for key in inputs[0] if key not in ("prompt", "completion", "completion_ids")]
    columns = {key: [example[key] for example in inputs] for key in keys}
    out = torch.zeros(len(prompts), len(reward_funcs), dtype=torch.float32)
    for j, func in enumerate(reward_funcs):
        name = getattr(func, "__name__", repr(func))
        try:
            values = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns, **extra)
        except Exception as error:
            # Name the culprit and what it was given: the traceback alone points into the trainer's rollout code.
            raise RuntimeError(
                f"Reward function {name!r} raised {type(error).__name__}: {error}. It was called with keyword "
                f"arguments {sorted(['prompts', 'completions', 'completion_ids', *columns, *extra])} for "
                f"{len(prompts)} completions; fix the function or the dataset columns it reads."
            ) from error
        if len(values) != len(prompts):
            raise ValueError(f"Reward function {name!r} returned {len(values)} values for "
                             f"{len(prompts)} completions.")
        out[:, j] = torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)
    return out


def binary_reward(rewards_per_func: torch.Tensor, weights: torch.Tensor, threshold: float) -> torch.Tensor:
    """r in {0, 1}: 1 when the weighted reward sum (NaN counted as 0) reaches `threshold`."""
    total = (rewards_per_func * weights.to(rewards_per_func).unsqueeze(0)).nansum(dim=1)
    return (total >= threshold).long()
