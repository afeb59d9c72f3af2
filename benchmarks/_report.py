"""How every benchmark saves its result: the JSON record and, optionally, its markdown table."""

from __future__ import annotations

import json
import os
from collections.abc import Callable


def write_report(result: dict, out: str | None, markdown: str | None, to_markdown: Callable[[dict], str]) -> None:
    """Write `result` as JSON to `out` and `to_markdown(result)` to `markdown` (each only when given)."""
    for path, text in ((out, lambda: json.dumps(result, indent=2)), (markdown, lambda: to_markdown(result))):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(text())
