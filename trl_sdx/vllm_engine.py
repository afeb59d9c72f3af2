"""Releasing an in-process vLLM engine, shared by the samplers that build one (SD-Zero Phase 1, MixSD targets)."""

from __future__ import annotations

import gc

import torch


def release_vllm_engine(owner, attribute: str = "llm") -> None:
    """Shut down the engine held at `owner.<attribute>` and return its GPU memory (weights and KV cache) before
    training needs it. The attribute is cleared here, so this function holds the last reference when it collects."""
    llm = getattr(owner, attribute)
    setattr(owner, attribute, None)
    engine = getattr(llm, "llm_engine", None)
    if engine is not None and hasattr(engine, "shutdown"):
        engine.shutdown()
    del llm, engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
