"""Reading a causal LM's output head directly, as the fused losses do.

The fused (chunked) losses take final hidden states and the lm_head weights and never run the head's forward.
Three things follow, shared by every trainer that uses them: sharded heads must be gathered first, models that
post-process their logits after the head cannot use that path, and the plain path needs the model's own logits
at exactly the positions that predict the completion.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from trl.trainer.utils import maybe_gather_lm_head_ctx

# Config attributes by which models rescale or soft-cap their logits after the lm_head: `hidden @ W^T (+ b)`
# alone would be wrong for them, so they need the plain path (their own forward applies these).
LOGIT_POSTPROCESSING_ATTRS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling",
                              "final_logit_softcapping")


def logit_postprocessing(model) -> list[str]:
    """`name=value` of every logit post-processing the model's config enables (empty when none)."""
    config = model.config.get_text_config()
    found = []
    for name in LOGIT_POSTPROCESSING_ATTRS:
        value = getattr(config, name, None)
        if value is not None and not (name != "final_logit_softcapping" and float(value) == 1.0):
            found.append(f"{name}={value}")
    return found


def _full_tensor(tensor):
    """Under FSDP2 the head is a DTensor; the chunked loss needs the whole matrix once (as TRL does). The cast to
    the hidden states' dtype (TRL's `_chunked_divergence_loss` rule) happens once inside the fused losses, after
    this gather, so an fp32 master head receives its gradient in fp32 (summed across chunks in fp32)."""
    if tensor is not None and isinstance(tensor, torch.distributed.tensor.DTensor):
        return tensor.full_tensor()
    return tensor


@contextmanager
def gathered_lm_heads(*models):
    """Yield `[(weight, bias), ...]`, each model's lm_head as whole tensors, for the duration of the block.

    Under DeepSpeed ZeRO-3 the head's shards are gathered (its forward hook never fires when only its weight is
    read); under FSDP2 its DTensors are materialised. Elsewhere the parameters themselves are returned.
    """
    heads = [model.get_output_embeddings() for model in models]
    # The same head may come twice (SD-Zero's adapter-disabled teacher is the student): gather each tensor once.
    params = {id(t): t for head in heads for t in (head.weight, head.bias) if t is not None}
    with maybe_gather_lm_head_ctx(*params.values()):
        yield [(_full_tensor(head.weight), _full_tensor(head.bias)) for head in heads]


def completion_logits(model, input_ids, attention_mask, width: int, forward_keys) -> torch.Tensor:
    """The model's own logits at the `width` positions that predict the last `width` tokens of `input_ids`."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if "logits_to_keep" in forward_keys:
        kwargs["logits_to_keep"] = width + 1  # the last position predicts past the sequence: dropped below
    logits = model(**kwargs).logits
    return logits[:, :-1, :][:, -width:, :]
