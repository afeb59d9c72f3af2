"""SD-Zero Phase 1: from the collected D_rev to the two SFT sets (spec, "Phase 1", steps 3-5).

1. Clean (on by default): trim a repeating tail of y_init and y_revised (the "loop until the token budget runs out"
   failure), and strip sycophantic chat openings from y_revised, which would not read as a continuation of the
   model's own answer.
2. Deduplicate on (x, y_init, y_revised), after cleaning.
3. Split: the stage-2 (revision) set takes a quota of `stage2_size` tuples, correct-init ones first, then
   incorrect-init ones, shuffled. Stage 1 (generation) takes every remaining incorrect-init tuple and never a
   correct-init one: "y_init (correct) + rephrase + y_revised" as one stream would teach the model to append a
   rephrasing to every correct answer.
4. Format in TRL's prompt/completion form:
   - stage 1: prompt = x,                                       completion = y_init + "\\n\\n" + P_r + "\\n\\n" + y_rev
   - stage 2: prompt = x + "\\n\\n" + y_init + "\\n\\n" + P_r (user turn), completion = y_rev
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence

from datasets import Dataset
from trl.data_utils import is_conversational

from trl_sdx.sdzero.teacher_inputs import SEPARATOR, control_text

# Openings an instruct model writes when it believes a user flagged its error (spec, Phase 1 step 3).
_SYCOPHANTIC_OPENINGS = [
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        r"^you(?:'re| are)\s+(?:absolutely\s+)?right\s+to\s+[^.!?\n]*[.!?]\s*",  # "You're right to question ..."
        r"^(?:(?:yes|indeed)[,!.]?\s+)?you(?:'re| are)\s+(?:absolutely\s+)?right\s*[—–\-,:.!]+\s*",
        r"^thank\s+you\s+for[^.!?\n]*[.!?]\s*",
        r"^great\s+question[^.!?\n]*?[.!?—–\-]\s*",
        r"^(?:good|nice)\s+(?:catch|point|observation)[^.!?\n]*?[.!?—–\-]\s*",
    )
]


def strip_sycophantic_opening(text: str) -> str:
    """Remove sycophantic openings ("You're absolutely right — ", "Thank you for ...") and re-capitalise.

    Openings are removed repeatedly ("Good catch! You're right, ..."); text without one is returned unchanged.
    """
    rest = text.lstrip()
    removed = False
    while True:
        for pattern in _SYCOPHANTIC_OPENINGS:
            match = pattern.match(rest)
            if match and match.end() > 0:
                rest = rest[match.end():].lstrip()
                removed = True
                break
        else:
            break
    if not removed:
        return text
    return rest[:1].upper() + rest[1:]


def trim_repeating_tail(text: str, min_period: int = 10, max_period: int = 1500, min_repeats: int = 3,
                        max_passes: int = 5) -> str:
    """Cut a block that repeats at least `min_repeats` times at the end of `text` down to one copy.

    For each period L (shortest first) the periodic suffix is the longest tail with text[i] == text[i + L]; if it
    spans >= min_repeats * L characters, everything after its first period is dropped. Repeated up to
    `max_passes` times, since trimming can expose a repeat at another scale.
    """
    for _ in range(max_passes):
        n = len(text)
        cut = None
        for period in range(min_period, min(max_period, n // min_repeats) + 1):
            start = n - period  # text[start:] is compared with the block one period earlier
            while start > 0 and text[start - 1] == text[start - 1 + period]:
                start -= 1
            if n - start >= min_repeats * period:
                cut = start + period
                break
        if cut is None:
            return text
        text = text[:cut]
    return text


def clean_revision(record: dict) -> tuple[dict, bool, bool]:
    """(cleaned copy of a D_rev tuple, a repeating tail was trimmed, a sycophantic opening was stripped)."""
    y_init = trim_repeating_tail(record["y_init"])
    y_revised = trim_repeating_tail(record["y_revised"])
    stripped = strip_sycophantic_opening(y_revised)
    tail = y_init != record["y_init"] or y_revised != record["y_revised"]
    return {**record, "y_init": y_init, "y_revised": stripped}, tail, stripped != y_revised


def _key(record: dict) -> str:
    return json.dumps([record["prompt"], record["y_init"], record["y_revised"]], sort_keys=True)


def split_revisions(records: Sequence[dict], stage2_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(stage-1 tuples, stage-2 tuples): stage 2's quota goes to correct-init tuples first, then incorrect-init ones.

    Stage 1 is every incorrect-init tuple stage 2 did not take; correct-init tuples beyond the quota are unused.
    """
    rng = random.Random(seed)
    correct = [r for r in records if int(r["init_reward"]) == 1]
    incorrect = [r for r in records if int(r["init_reward"]) == 0]
    rng.shuffle(correct)
    rng.shuffle(incorrect)
    n_correct = min(len(correct), stage2_size)
    n_incorrect = min(len(incorrect), stage2_size - n_correct)
    stage2 = correct[:n_correct] + incorrect[:n_incorrect]
    rng.shuffle(stage2)
    return incorrect[n_incorrect:], stage2


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt is None or any(m["role"] == "system" for m in messages):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def format_generation_example(record: dict, system_prompt: str | None = None) -> dict:
    """Stage 1: prompt = x, completion = y_init + "\\n\\n" + P_r + "\\n\\n" + y_revised."""
    x = record["prompt"]
    completion = record["y_init"] + control_text(record["control_phrase"]) + record["y_revised"]
    if not is_conversational({"prompt": x}):
        return {"prompt": x, "completion": completion}
    return {"prompt": _with_system(x, system_prompt), "completion": [{"role": "assistant", "content": completion}]}


def format_revision_example(record: dict, system_prompt: str | None = None) -> dict:
    """Stage 2: prompt = x + "\\n\\n" + y_init + "\\n\\n" + P_r (inside the last user turn), completion = y_revised."""
    x, y_init, phrase, y_revised = record["prompt"], record["y_init"], record["control_phrase"], record["y_revised"]
    if not is_conversational({"prompt": x}):
        return {"prompt": x + SEPARATOR + y_init + SEPARATOR + phrase, "completion": y_revised}
    last = x[-1]
    if last["role"] != "user":
        raise ValueError(f"SRT needs prompts that end with a user turn, got a final {last['role']!r} turn.")
    user = {**last, "content": last["content"] + SEPARATOR + y_init + SEPARATOR + phrase}
    return {"prompt": _with_system(x[:-1] + [user], system_prompt),
            "completion": [{"role": "assistant", "content": y_revised}]}


def prepare_srt_data(records: Sequence[dict], *, stage2_size: int, seed: int, clean: bool = True,
                     sft_system_prompt: str | None = None) -> tuple[dict[str, Dataset], dict]:
    """D_rev tuples -> ({"generation": stage-1 set, "revision": stage-2 set}, counts of every step).

    `records` are D_rev rows (`prompt`, `y_init`, `init_reward`, `control_phrase`, `y_revised`).
    """
    cleaned, tails, openings = [], 0, 0
    for record in records:
        if clean:
            record, tail, opening = clean_revision(record)
            tails, openings = tails + tail, openings + opening
        cleaned.append(dict(record))
    unique, seen = [], set()
    for record in cleaned:
        key = _key(record)
        if key not in seen:
            seen.add(key)
            unique.append(record)
    stage1, stage2 = split_revisions(unique, stage2_size, seed)
    correct_total = sum(1 for r in unique if int(r["init_reward"]) == 1)
    counts = {
        "tuples": len(records),
        "tails_trimmed": tails,
        "openings_stripped": openings,
        "duplicates_removed": len(cleaned) - len(unique),
        "stage1_generation": len(stage1),
        "stage2_revision": len(stage2),
        "stage2_from_correct": sum(1 for r in stage2 if int(r["init_reward"]) == 1),
        "correct_init_unused": correct_total - sum(1 for r in stage2 if int(r["init_reward"]) == 1),
    }
    datasets = {
        "generation": Dataset.from_list([format_generation_example(r, sft_system_prompt) for r in stage1]),
        "revision": Dataset.from_list([format_revision_example(r, sft_system_prompt) for r in stage2]),
    }
    return datasets, counts
