"""Every ```python block of README.md and docs/*.md runs as written (tiny stand-ins for hub models, one step)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from doc_snippets_driver import all_snippets, model_ids, python_blocks

DRIVER = Path(__file__).with_name("doc_snippets_driver.py")


def test_blocks_are_found_and_hub_ids_recognised(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n```python\nx = 1\n```\n```bash\nls\n```\n```python\nmodel = 'Qwen/Qwen3-8B'\n```\n")
    assert python_blocks(page) == ["x = 1\n", "model = 'Qwen/Qwen3-8B'\n"]
    assert model_ids('load_dataset("my/math-prompts"); m = "Qwen/Qwen3-1.7B-Base"; p = "math_prompts/train.parquet"') \
        == {"Qwen/Qwen3-1.7B-Base"}


def test_every_doc_snippet_runs(tmp_path):
    snippets = [name for name, _ in all_snippets()]
    assert any(name.startswith("README.md#") for name in snippets)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(DRIVER.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(DRIVER)], capture_output=True, text=True, env=env, timeout=1200)
    results = [json.loads(line[len("SNIPPET "):]) for line in out.stdout.splitlines() if line.startswith("SNIPPET {")]
    assert [r["snippet"] for r in results] == snippets, out.stderr[-3000:]
    failed = {r["snippet"]: r["error"] for r in results if not r["ok"]}
    assert not failed, "\n\n".join(f"{name}:\n{error}" for name, error in failed.items())
