"""Answer checking for verifiable tasks, in TRL's reward-function form.

Two strict checks, one per place the SD-Zero code grades (spec, "Answer check"), and one lenient option:

- `boxed_answer_reward` (SD-Zero Phase 1's default): the content of the LAST `\\boxed{...}` is compared with the
  reference answer by math equivalence (3/4 == \\frac{3}{4} == 0.75, 1,000 == 1000).
- `math_verify_reward` (SD-Zero Phase 2's default): math-verify compares the completion with `"\\boxed{" + answer +
  "}"`, as the released Phase 2 code does.
- `lenient_answer_reward`: like `boxed_answer_reward`, but a completion without a box is graded by its last number.

Neither strict check reads an answer that is not boxed: a completion cut off before its box, or one that never
boxes, is wrong (r = 0). Only the lenient check falls back to "the last number in the text", which credits cut-off
and unboxed answers; use it only for models that cannot be prompted to box (e.g. tiny CPU demo models).
"""

from __future__ import annotations

import re
import threading

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?")
_BOX_OPENERS = ("\\boxed{", "\\fbox{")


def extract_boxed_answer(text: str, openers: tuple[str, ...] = _BOX_OPENERS) -> str | None:
    """Content of the last complete `\\boxed{...}` (nested braces balanced, e.g. `\\boxed{\\frac{3}{4}}`), else None.

    An unbalanced last box (the completion was cut inside it) gives None: there is no final answer. `openers`: the
    box commands that count (MixSD's official rule counts `\\boxed{` only).
    """
    if not text:
        return None
    start = max(text.rfind(opener) + len(opener) if text.rfind(opener) >= 0 else -1 for opener in openers)
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
    return None


def extract_final_answer(text: str) -> str | None:
    """LENIENT: the last `\\boxed{}` content, else the last number in `text`, else None.

    The fallback credits unboxed and cut-off answers ("... so far we have 12" reads as the answer 12); the strict
    rewards use `extract_boxed_answer` instead.
    """
    if not text:
        return None
    boxed = extract_boxed_answer(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1].strip() if numbers else None


def _timeout() -> int | None:
    # math-verify's signal-based timeouts only work on the main thread (dataloader workers, vLLM callbacks
    # and test runners may call us from others), so disable them there.
    return 5 if threading.current_thread() is threading.main_thread() else None


def _parse(answer: str):
    timeout = _timeout()
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    text = answer if "$" in answer or "\\" not in answer else f"${answer}$"
    return parse(text, extraction_config=config, parsing_timeout=timeout), timeout


def answers_match(prediction: str | None, gold: str | int | float) -> bool:
    """True when the extracted answer `prediction` equals `gold` mathematically (3/4 == \\frac{3}{4} == 0.75)."""
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


def math_verify_match(completion: str, gold: str | int | float) -> bool:
    """math-verify of the whole completion against `"\\boxed{" + gold + "}"` (the released Phase 2 grading).

    The completion's boxed expressions are extracted (LaTeX extraction, boxes first); a completion without a complete
    `\\boxed{}` is wrong, so neither a bare final number nor a `$...$` expression counts. Several boxes with different
    values are a set to math-verify and do not match a single reference.
    """
    if extract_boxed_answer(completion) is None:
        return False
    timeout = _timeout()
    gold_parsed = parse("\\boxed{" + str(gold).strip() + "}", extraction_config=[LatexExtractionConfig()],
                        parsing_timeout=timeout)
    pred_parsed = parse(completion, extraction_config=[LatexExtractionConfig(boxed_match_priority=0)],
                        parsing_timeout=timeout)
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


def _grade(name: str, completions, answer, check) -> list[float]:
    if isinstance(answer, (str, int, float)):
        answer = [answer] * len(completions)
    if len(answer) != len(completions):
        raise ValueError(f"{name} got {len(completions)} completions but {len(answer)} answers.")
    return [1.0 if check(completion_text(c), gold) else 0.0 for c, gold in zip(completions, answer, strict=True)]


def boxed_answer_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when the content of the completion's last `\\boxed{}` equals `answer` mathematically, else 0.0 (strict).

    SD-Zero Phase 1's answer check. A completion without a complete box gets 0.0. Signature follows TRL's reward
    functions: `answer` is the dataset column of the same name, and extra columns arrive as keywords (ignored).
    """
    return _grade("boxed_answer_reward", completions, answer,
                  lambda text, gold: answers_match(extract_boxed_answer(text), gold))


def math_verify_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when math-verify finds the completion equal to `"\\boxed{" + answer + "}"`, else 0.0 (strict).

    SD-Zero Phase 2's answer check (`math_verify_match`). A completion without a complete box gets 0.0.
    """
    return _grade("math_verify_reward", completions, answer, math_verify_match)


def lenient_answer_reward(completions, answer, **kwargs) -> list[float]:
    """WARNING, lenient: the last `\\boxed{}`, or without a box the LAST NUMBER of the completion, equals `answer`.

    A cut-off or unboxed answer that happens to end in the right number gets 1.0, and in SD-Zero the r = 1 control
    phrase ("rephrase") instead of "correct it". Only for models that cannot be prompted to box their answer.
    """
    return _grade("lenient_answer_reward", completions, answer,
                  lambda text, gold: answers_match(extract_final_answer(text), gold))
