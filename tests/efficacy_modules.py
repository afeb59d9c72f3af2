"""Import a module of benchmarks/efficacy/ (a scripts folder, not a package) by name, for the efficacy tests."""

import importlib
import sys
from pathlib import Path

EFFICACY = Path(__file__).resolve().parents[1] / "benchmarks" / "efficacy"


def efficacy_module(name: str):
    """`benchmarks/efficacy/<name>.py`, imported with its folder on sys.path only for the import (its siblings, e.g.
    `common`, are imported the same way, as the scripts do when run directly)."""
    sys.path.insert(0, str(EFFICACY))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EFFICACY))
