"""The control phrases P_r that Phase 1 trained the reviser on, saved with theta_SRT and read back by Phase 2.

Phase 2 must insert the phrases Phase 1 used: the teacher only "revises" after the phrase it was trained on. The
released code picks the family (Qwen or OLMo) by a substring of the model path; here Phase 1 writes the pair it used
into every stage folder (`sdzero_control_phrases.json`) and Phase 2 reads it from the teacher's (else the student's)
folder, whatever the path is called.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

CORRECT_PHRASE = "Let me rephrase the above solution."
INCORRECT_PHRASE = "Wait, this response is wrong. Let me correct it."
OLMO_INCORRECT_PHRASE = "Wrong. I need to redo all."  # the released OLMo family's P_0 (its P_1 is the same)
CONTROL_PHRASES_FILE = "sdzero_control_phrases.json"

logger = logging.getLogger(__name__)


def save_control_phrases(directory: str | os.PathLike, correct_phrase: str, incorrect_phrase: str) -> None:
    """Write the pair next to theta_SRT's weights."""
    record = {"correct_phrase": correct_phrase, "incorrect_phrase": incorrect_phrase}
    (Path(directory) / CONTROL_PHRASES_FILE).write_text(json.dumps(record, indent=2))


def _directory_of(model) -> str | None:
    if model is None:
        return None
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)


def load_control_phrases(*models) -> tuple[dict | None, str | None]:
    """(record, file) from the first of `models` (paths or models loaded from a folder) that holds one, else (None,
    None)."""
    for model in models:
        directory = _directory_of(model)
        if directory and (Path(directory) / CONTROL_PHRASES_FILE).is_file():
            path = Path(directory) / CONTROL_PHRASES_FILE
            return json.loads(path.read_text()), str(path)
    return None, None


def resolve_control_phrases(correct_phrase: str | None, incorrect_phrase: str | None, *models) -> tuple[str, str]:
    """The (P_1, P_0) Phase 2 uses: explicit values, else Phase 1's saved record, else the released defaults.

    Explicit values that differ from the saved record are kept, with a warning: the teacher was trained on the
    record's phrases.
    """
    record, path = load_control_phrases(*models)
    chosen = []
    for name, given, default in (("correct_phrase", correct_phrase, CORRECT_PHRASE),
                                 ("incorrect_phrase", incorrect_phrase, INCORRECT_PHRASE)):
        saved = record.get(name) if record else None
        if given is not None and saved is not None and given != saved:
            logger.warning(f"`{name}`={given!r} differs from the phrase Phase 1 trained theta_SRT on ({saved!r}, "
                           f"{path}); the teacher may not revise after it. Leave `{name}` unset to use the saved one.")
        chosen.append(given if given is not None else saved if saved is not None else default)
    return chosen[0], chosen[1]
