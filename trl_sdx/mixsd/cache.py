"""On-disk cache of MixSD targets, keyed by a hash of (base model, data, mixing parameters).

Building targets runs the frozen model over the whole training set (with retries), so a rerun with the same
inputs reads them back instead. Layout: `<cache_dir>/<key>/targets.jsonl` (one `MixedTarget` per line, in
dataset order) and `metadata.json` (the key's inputs and the construction statistics).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from .rejection import MixedTarget

CACHE_FORMAT_VERSION = 1


def _sha256(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@torch.no_grad()
def model_fingerprint(model) -> str:
    """Identity of the weights that generate the targets (the base: LoRA adapter weights excluded).

    Hashes the config and, per parameter, its name, shape and two float64 reductions: cheap (one pass over the
    weights) and it changes whenever the weights do, e.g. after further fine-tuning of the base.
    """
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else {}
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache"):
        config.pop(volatile, None)
    entries = []
    for name, param in model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            continue
        data = param.detach().double()
        entries.append((name.removeprefix("base_model.model."), list(param.shape),
                        f"{data.sum().item():.8e}", f"{data.abs().sum().item():.8e}"))
    return _sha256({"config": config, "params": entries})[:32]


def data_fingerprint(questions: Sequence[str], answers: Sequence[str]) -> str:
    return _sha256({"questions": list(questions), "answers": list(answers)})[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    return _sha256({"vocab": len(tokenizer), "chat_template": getattr(tokenizer, "chat_template", None),
                    "eos": tokenizer.eos_token, "special": sorted(map(str, tokenizer.all_special_tokens))})[:32]


def cache_key(inputs: dict) -> str:
    """The cache entry name for these inputs (a short hash)."""
    return _sha256({"version": CACHE_FORMAT_VERSION, **inputs})[:20]


def load_targets(entry_dir: str | os.PathLike) -> tuple[list[MixedTarget], dict] | None:
    """(targets, metadata) of a complete cache entry, or None when there is none."""
    entry = Path(entry_dir)
    targets_file, metadata_file = entry / "targets.jsonl", entry / "metadata.json"
    if not (targets_file.is_file() and metadata_file.is_file()):
        return None
    metadata = json.loads(metadata_file.read_text())
    with targets_file.open() as f:
        targets = [MixedTarget(**json.loads(line)) for line in f if line.strip()]
    if len(targets) != metadata.get("stats", {}).get("num_examples", len(targets)):
        return None  # truncated entry: regenerate
    return targets, metadata


def save_targets(entry_dir: str | os.PathLike, targets: Sequence[MixedTarget], metadata: dict) -> Path:
    """Write the entry into a temporary sibling, then rename it: a killed run never leaves half an entry."""
    entry = Path(entry_dir)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".tmp-", dir=entry.parent))
    with (tmp / "targets.jsonl").open("w") as f:
        for target in targets:
            f.write(json.dumps(target.to_dict()) + "\n")
    (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
    if entry.exists():  # a stale/partial entry with the same key: replace it
        for child in entry.iterdir():
            child.unlink()
        entry.rmdir()
    tmp.rename(entry)
    return entry
