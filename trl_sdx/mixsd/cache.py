"""On-disk cache of MixSD targets, keyed by a hash of (base model, data, mixing parameters).

Building targets runs the frozen model over the whole training set (with retries), so a rerun with the same
inputs reads them back instead. Layout: `<cache_dir>/<key>/targets.jsonl` (one `MixedTarget` per line, in
dataset order) and `metadata.json` (the key's inputs and the construction statistics).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .rejection import MixedTarget

CACHE_FORMAT_VERSION = 2
# Bump whenever a change of the code alters the targets it builds for the same inputs (decoding, stopping,
# rejection rule, prompt rendering): old entries then stop matching instead of being silently reused.
TARGETS_CODE_VERSION = "2026-12-mixsd-targets-2"
_CHUNK_BYTES = 64 * 2**20  # hash the weights 64 MiB at a time: no full-size copy of any tensor


def _sha256(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes, read in chunks (each copied to the CPU on its own when on an accelerator)."""
    digest = hashlib.sha256()
    flat = tensor.detach().reshape(-1)
    step = max(1, _CHUNK_BYTES // max(1, flat.element_size()))
    for start in range(0, flat.numel(), step):
        chunk = flat[start:start + step]
        if chunk.device.type != "cpu":
            chunk = chunk.cpu()
        digest.update(chunk.contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def sharded_parameters(model) -> list[str]:
    """Names of parameters this process does not hold in full: DeepSpeed ZeRO-3 partitions, meta tensors (FSDP
    CPU-RAM-efficient loading) and DTensor shards (FSDP2)."""
    names = []
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id") or param.device.type == "meta" or hasattr(param, "_local_tensor"):
            names.append(name)
    return names


@torch.no_grad()
def model_fingerprint(model) -> str:
    """Identity of the weights that generate the targets (the base: LoRA adapter weights excluded).

    Hashes the config and, per parameter, its name, shape, dtype and the sha256 of its bytes, read in 64 MiB chunks
    (threads hash several parameters at once; hashlib releases the GIL). Any change of any weight changes it.
    """
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else {}
    for volatile in ("_name_or_path", "transformers_version", "use_cache"):
        config.pop(volatile, None)
    params = [(name, param) for name, param in model.named_parameters()
              if "lora_" not in name and "modules_to_save" not in name]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda item: _tensor_digest(item[1]), params))
    entries = [(name.removeprefix("base_model.model."), list(param.shape), str(param.dtype), digest)
               for (name, param), digest in zip(params, digests, strict=True)]
    return _sha256({"config": config, "params": entries})[:32]


def data_fingerprint(questions: Sequence[str], answers: Sequence[str]) -> str:
    return _sha256({"questions": list(questions), "answers": list(answers)})[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    """The full vocabulary (every token and id), the chat template and the special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return _sha256({"vocab": _sha256(vocab), "size": len(tokenizer),
                    "chat_template": getattr(tokenizer, "chat_template", None),
                    "eos": tokenizer.eos_token, "special": sorted(map(str, tokenizer.all_special_tokens))})[:32]


def _value_identity(value):
    if callable(value) and not isinstance(value, type):
        return callable_identity(value)
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))  # object addresses differ between runs


def callable_identity(fn) -> dict | None:
    """What a checker *is*, not only what it is called: its name, the hash of its source (or bytecode), and the
    values it closes over or takes as defaults. Editing a custom checker's body therefore invalidates the cache."""
    if fn is None:
        return None
    if isinstance(fn, functools.partial):
        return {"partial": callable_identity(fn.func), "args": [_value_identity(a) for a in fn.args],
                "keywords": {k: _value_identity(v) for k, v in sorted(fn.keywords.items())}}
    function = getattr(fn, "__func__", fn)  # bound methods: the function
    holder = function if inspect.isfunction(function) else type(fn)
    identity = {"name": f"{getattr(holder, '__module__', '')}.{getattr(holder, '__qualname__', repr(holder))}"}
    try:
        identity["source"] = hashlib.sha256(inspect.getsource(holder).encode()).hexdigest()
    except (OSError, TypeError):  # defined in a REPL: fall back to the bytecode
        code = getattr(function, "__code__", None)
        if code is not None:
            identity["bytecode"] = hashlib.sha256(code.co_code + _value_identity(code.co_consts).encode()).hexdigest()
    if inspect.isfunction(function):
        identity["closure"] = [_value_identity(cell.cell_contents) for cell in function.__closure__ or ()]
        identity["defaults"] = _value_identity((function.__defaults__, function.__kwdefaults__))
    else:
        identity["state"] = _value_identity(sorted(vars(fn).items()) if hasattr(fn, "__dict__") else None)
    return identity


def cache_key(inputs: dict) -> str:
    """The cache entry name for these inputs (a short hash)."""
    return _sha256({"version": CACHE_FORMAT_VERSION, "code": TARGETS_CODE_VERSION, **inputs})[:20]


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
    """Write the entry into a temporary sibling, then rename it into place: a killed run never leaves half an entry,
    and when two writers race (e.g. two nodes sharing a filesystem) the first complete entry wins."""
    entry = Path(entry_dir)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".tmp-", dir=entry.parent))
    with (tmp / "targets.jsonl").open("w") as f:
        for target in targets:
            f.write(json.dumps(target.to_dict()) + "\n")
    (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
    if entry.exists() and load_targets(entry) is None:  # a stale/partial entry with the same key: move it aside
        stale = Path(tempfile.mkdtemp(prefix=entry.name + ".stale-", dir=entry.parent))
        try:
            entry.rename(stale / "entry")
        except OSError:
            pass  # another writer moved or replaced it first
    try:
        tmp.rename(entry)  # atomic; fails when a (complete) entry is already there
    except OSError:
        if load_targets(entry) is None:
            raise
    for leftover in [tmp, *entry.parent.glob(entry.name + ".stale-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    return entry
