"""Answer checking for verifiable tasks, in TRL's reward-function form.

The papers grade the last `\\boxed{...}` of a completion with math-verify; when a completion has no box we
fall back to its last number, which is what small models on arithmetic usually write.
"""

from __future__ import annotations

import re
import threading

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?")
_BOX_OPENERS = ("\\boxed{", "\\fbox{")


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, with nested braces balanced (e.g. `\\boxed{\\frac{3}{4}}`)."""
    start = max(text.rfind(opener) + len(opener) if text.rfind(opener) >= 0 else -1 for opener in _BOX_OPENERS)
    if start < 0:
        return None
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
    return None  # unbalanced: the completion was cut inside the box


def extract_final_answer(text: str) -> str | None:
    """The last `\\boxed{}` content, else the last number in `text`, else None."""
    if not text:
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1].strip() if numbers else None


def _parse(answer: str):
    # math-verify's signal-based timeouts only work on the main thread (dataloader workers, vLLM callbacks
    # and test runners may call us from others), so disable them there.
    on_main = threading.current_thread() is threading.main_thread()
    timeout = 5 if on_main else None
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    text = answer if "$" in answer or "\\" not in answer else f"${answer}$"
    return parse(text, extraction_config=config, parsing_timeout=timeout), timeout


def answers_match(prediction: str | None, gold: str | int | float) -> bool:
    """True when `prediction` equals `gold` mathematically (3/4 == \\frac{3}{4} == 0.75, 1,000 == 1000)."""
    if prediction is None:
        return False
    gold = str(gold).strip()
    prediction = str(prediction).strip()
    if prediction == gold:
        return True
    gold_parsed, timeout = _parse(gold)
    pred_parsed, _ = _parse(prediction)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def completion_text(completion) -> str:
    """Plain text of a completion: a string, or TRL's conversational form (a list of messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return "".join(str(message.get("content", "")) for message in completion if message.get("role") == "assistant") \
        or "".join(str(message.get("content", "")) for message in completion)


def boxed_answer_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion's final answer (last `\\boxed{}`, fallback last number) equals `answer`, else 0.0.

    Signature follows TRL's reward functions: `answer` is the dataset column of the same name, one per
    completion, and extra columns arrive as keyword arguments (ignored).
    """
    if isinstance(answer, (str, int, float)):
        answer = [answer] * len(completions)
    if len(answer) != len(completions):
        raise ValueError(f"boxed_answer_reward got {len(completions)} completions but {len(answer)} answers.")
    return [
        1.0 if answers_match(extract_final_answer(completion_text(c)), gold) else 0.0
        for c, gold in zip(completions, answer, strict=True)
    ]
