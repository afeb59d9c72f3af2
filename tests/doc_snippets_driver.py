"""Runs every ```python block of README.md and docs/*.md, as written, against tiny offline models.

Run by tests/test_doc_snippets.py in a subprocess (the hub cache location must be set before huggingface_hub is
imported). What is swapped, and only that:

- every hub model id a snippet names (`Org/Name`) is a tiny model + tokenizer in a private, offline hub cache, so
  `from_pretrained("Qwen/Qwen3-8B")` resolves through the normal code path; the embedded
  `smollm2-135m-instruct` alias stays the real model;
- `datasets.load_dataset(...)` returns a small prompt set with every column the snippets read;
- names a snippet uses without defining (the prose around it defines them: `dataset`, `tokenizer`, ...) are
  given in `GIVEN`;
- the run budget: `max_steps=1`, generation lengths at most 8 tokens, no checkpoints (any `TrainingArguments`);
  a random tiny model never answers right, so MixSD keeps failed targets and SD-Zero phase 1 every revision.

Prints one line per snippet, `SNIPPET {"snippet": "README.md#1", "ok": bool, "error": traceback or ""}`.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
HUB_ID = re.compile(r"""["']([A-Za-z0-9][\w.-]*/[\w.-]+)["']""")
LENGTH_FIELDS = ("max_completion_length", "max_new_tokens", "init_max_new_tokens", "revision_max_new_tokens")


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def all_snippets() -> list[tuple[str, str]]:
    return [(f"{path.relative_to(ROOT)}#{i}", code) for path in DOC_FILES for i, code in enumerate(python_blocks(path))]


def model_ids(code: str) -> set[str]:
    """Hub ids a snippet names (dataset placeholders and paths are excluded: no dot-files, no `my/`)."""
    return {m for m in HUB_ID.findall(code) if not m.startswith(("my/", ".", "/")) and "<" not in m
            and not m.endswith((".parquet", ".json", ".yaml"))}


def build_fake_hub(cache: Path, ids: set[str]) -> None:
    """A tiny model + tokenizer per id, laid out as the hub cache (`models--Org--Name/snapshots/...`)."""
    from trl_sdx.testing import make_student_teacher

    tokenizer, student, teacher = make_student_teacher(seed=0)
    for i, repo_id in enumerate(sorted(ids)):
        folder = cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = folder / "snapshots" / ("0" * 40)
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text("0" * 40)
        (student if i % 2 == 0 else teacher).save_pretrained(snapshot)
        tokenizer.save_pretrained(snapshot)


def prompt_rows(n: int = 128):
    from datasets import Dataset

    from trl_sdx.data import make_arithmetic_dataset

    data = make_arithmetic_dataset(n, seed=0)
    text = [turns[0]["content"] for turns in data["prompt"]]
    return Dataset.from_dict({"prompt": data["prompt"], "answer": data["answer"], "problem": text,
                              "question": text, "text": text})


def given_names() -> dict:
    """What the prose around a snippet defines; used only for names the snippet itself leaves undefined."""
    from trl_sdx.testing import make_tiny_tokenizer

    rows = prompt_rows()
    tokenizer = make_tiny_tokenizer()
    facts = rows.select(range(8)).map(lambda r: {"answer": f"The answer is \\boxed{{{r['answer']}}}."})
    return {"dataset": rows, "problems": rows, "ds": rows, "facts": facts, "tokenizer": tokenizer}


def apply_budget() -> None:
    """One optimizer step, short generations, nothing saved but the final model: a smoke run of each snippet."""
    from transformers import TrainingArguments

    original = TrainingArguments.__post_init__

    def budget(self):
        self.max_steps, self.save_strategy, self.report_to = 1, "no", "none"
        for name in LENGTH_FIELDS:
            if getattr(self, name, None):
                setattr(self, name, min(getattr(self, name), 8))
        if hasattr(self, "max_retries"):  # MixSD: a random tiny model never writes the right answer
            self.max_retries, self.keep_failed = 0, True
        if hasattr(self, "revise_correct"):  # SD-Zero phase 1: nor does it solve a problem; keep every revision
            self.reward_threshold, self.revise_correct = 0.0, True
            self.srt_stages = ["revision"]  # every y_init counts as correct: stage 1 (incorrect-init only) is empty
        original(self)

    TrainingArguments.__post_init__ = budget


def main() -> None:
    snippets = all_snippets()
    work = Path(tempfile.mkdtemp(prefix="doc-snippets-"))
    build_fake_hub(Path(os.environ["HF_HUB_CACHE"]), set().union(*(model_ids(code) for _, code in snippets)))
    import datasets

    datasets.load_dataset = lambda *args, **kwargs: prompt_rows()
    apply_budget()
    given = given_names()
    for name, code in snippets:
        folder = work / re.sub(r"\W", "_", name)
        folder.mkdir()
        os.chdir(folder)
        names = set(re.findall(r"\b[A-Za-z_]\w*\b", code))
        namespace = {"__name__": "__snippet__", **{k: v for k, v in given.items() if k in names}}
        try:
            exec(compile(code, name, "exec"), namespace)
            result = {"snippet": name, "ok": True, "error": ""}
        except Exception:  # reported to the test, which fails with this traceback
            result = {"snippet": name, "ok": False, "error": traceback.format_exc()}
        print("SNIPPET " + json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
