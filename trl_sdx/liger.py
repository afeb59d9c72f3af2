"""Liger-Kernel in the three trainers: `use_liger_kernel=True`, the Triton probe, and the loss-implementation switch.

What runs on Liger (see the "Liger" section of each method's doc):
* `use_liger_kernel=True`: student and teacher get Liger's model kernels (RMSNorm, RoPE, SwiGLU, ... whatever
  Liger's apply function for the architecture patches), through Liger's own `_apply_liger_kernel_to_instance`.
  Liger's fused linear cross-entropy is switched off, as TRL's SFTTrainer does: it replaces `model.forward`, and
  these losses read the hidden states / logits, not a CE loss. These kernels are Triton: CUDA only.
* SD-Zero's top-k KL can run on Liger's chunked distillation base (`losses/topk_kl_liger.py`), selected by
  `loss_implementation`; that part is plain torch and runs anywhere.
"""

from __future__ import annotations

import importlib.util

import torch

LOSS_IMPLEMENTATIONS = ("auto", "liger", "native")

# What "auto" picks per device type: the faster implementation in benchmarks/results/loss_kernels_cpu.md (SD-Zero
# top-k KL, native chunked vs Liger base, same inputs, same run; CPU 2026-12-01: native 5458 CPU ms / 231 MiB,
# Liger 6467 / 361). CUDA has not been measured yet (benchmarks/gpu_suite.py); until it is, "auto" keeps native.
AUTO_LOSS_IMPLEMENTATION = {"cpu": "native", "cuda": "native"}


def liger_triton_status() -> tuple[bool, str]:
    """(usable, why): whether Liger's Triton model kernels can run here. On a CUDA machine a tiny LigerRMSNorm
    forward is run, so a broken Triton/driver install is reported instead of assumed away."""
    for module, package in (("liger_kernel", "liger-kernel"), ("triton", "triton")):
        if importlib.util.find_spec(module) is None:
            return False, f"{package} is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device (Liger's model kernels are Triton GPU kernels)"
    try:
        from liger_kernel.transformers import LigerRMSNorm

        norm = LigerRMSNorm(8).to("cuda")
        norm(torch.ones(2, 8, device="cuda"))
        torch.cuda.synchronize()
    except Exception as error:  # any failure here means "not usable"; the reason is what the user needs
        return False, f"a Triton kernel failed on {torch.cuda.get_device_name(0)}: {type(error).__name__}: {error}"
    return True, f"Triton kernels run on {torch.cuda.get_device_name(0)}"


def liger_kernel_unavailable(args) -> str | None:
    """Why this run cannot use Liger's Triton model kernels, or None when it can (cheap: no kernel is run)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (`pip install liger-kernel`)"
    if args.use_cpu:
        return "`use_cpu=True` is set"
    if not torch.cuda.is_available():
        return "this machine has no CUDA device"
    return None


def check_liger_kernel_usable(args) -> None:
    """Construction-time check of `use_liger_kernel=True`: one clear error on a machine that cannot run Liger's
    Triton kernels, instead of a Triton traceback at the first forward."""
    if not args.use_liger_kernel:
        return
    reason = liger_kernel_unavailable(args)
    if reason is not None:
        raise ValueError(
            f"`use_liger_kernel=True` needs a CUDA GPU with liger-kernel, but {reason}: Liger's model kernels "
            "(RMSNorm, RoPE, SwiGLU, ...) are Triton GPU kernels. Set `use_liger_kernel=False` (the default) on "
            "CPU; the chunked losses (`use_fused_loss`) need no Liger and run anywhere. `trl-sdx env` shows "
            "whether Liger's kernels are usable here."
        )


def prepare_liger_kernel(args) -> None:
    """`check_liger_kernel_usable`, then Liger's fused linear cross-entropy switched off in
    `args.liger_kernel_config` (it would replace `model.forward`; the distillation losses need the hidden states /
    logits). `Trainer.train` re-applies the same config to the student; applying it twice is harmless."""
    check_liger_kernel_usable(args)
    if not args.use_liger_kernel:
        return
    config = dict(args.liger_kernel_config or {})
    if config.get("fused_linear_cross_entropy"):
        raise ValueError(
            '`liger_kernel_config={"fused_linear_cross_entropy": True}` is not supported: it replaces the model\'s '
            "forward with a cross-entropy one, while the distillation losses read its hidden states and logits. "
            "Drop the key (the other Liger kernels still apply)."
        )
    args.liger_kernel_config = {**config, "fused_linear_cross_entropy": False}


def apply_liger_kernel_to_models(args, *models) -> list:
    """Liger's model kernels on each model (student, teacher, ...) via Liger's apply function for its architecture.
    PEFT wrappers are unwrapped; the same model given twice is patched once. Returns the models patched."""
    if not args.use_liger_kernel:
        return []
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    patched = []
    for model in models:
        if model is None:
            continue
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if any(base is done for done in patched):
            continue
        _apply_liger_kernel_to_instance(model=base, **(args.liger_kernel_config or {}))
        patched.append(base)
    return patched


def resolve_loss_implementation(choice: str, device) -> str:
    """`loss_implementation` -> "liger" or "native". "auto" picks the one measured faster on this device type
    (`AUTO_LOSS_IMPLEMENTATION`; unmeasured device types get "native")."""
    if choice not in LOSS_IMPLEMENTATIONS:
        raise ValueError(f"`loss_implementation` must be one of {LOSS_IMPLEMENTATIONS}, got {choice!r}.")
    if choice != "auto":
        return choice
    return AUTO_LOSS_IMPLEMENTATION.get(torch.device(device).type, "native")
