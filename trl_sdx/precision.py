"""Defaults that depend on the machine a config is built on, settled before `TrainingArguments.__post_init__`.

TRL's configs default `bf16` to True, and `TrainingArguments.__post_init__` raises
`ValueError: Your setup doesn't support bf16/gpu` on a machine without one: the README's quick start would crash
on a laptop. Our configs read an unset `bf16` as "bf16 where the device supports it, fp32 elsewhere":

- `bf16` left unset (None) and `fp16` not set: bf16 on a GPU / XPU / NPU that supports it (and `use_cpu` is not
  set), fp32 otherwise. On a CPU bf16 is emulated and roughly 10x slower, so a CPU run is fp32 unless asked.
- `bf16=True` or `bf16=False` set by the user: kept as given (a bf16 request on an unsupported device still fails
  in transformers, with its own message).

TRL also defaults `gradient_checkpointing=True`, a name transformers 5 deprecates in favour of
`activation_checkpointing` (a FutureWarning on every run). When only TRL's default is in play, it is moved to the
current name, so no warning is raised on the user's behalf; an explicit `gradient_checkpointing=False` still
takes effect (and still gets transformers' deprecation warning, which is about the user's own setting).
"""

from __future__ import annotations


def device_supports_bf16() -> bool:
    """True on an accelerator with native bf16 (CUDA Ampere+, XPU, NPU, ...); False on CPU-only machines."""
    from transformers.utils import is_torch_bf16_gpu_available

    return bool(is_torch_bf16_gpu_available())


def resolve_precision(args) -> None:
    """Set `args.bf16` when the user left it unset: bf16 where the device supports it, fp32 elsewhere."""
    if args.bf16 is None:
        args.bf16 = not args.fp16 and not args.use_cpu and device_supports_bf16()


def resolve_activation_checkpointing(args) -> None:
    """Carry TRL's `gradient_checkpointing=True` default over to `activation_checkpointing` (the current name)."""
    if getattr(args, "activation_checkpointing", False) is None and args.gradient_checkpointing is True:
        args.activation_checkpointing = True


def resolve_device_defaults(args) -> None:
    """The hook each trl_sdx config calls first thing in `__post_init__`, before `super().__post_init__()`."""
    resolve_precision(args)
    resolve_activation_checkpointing(args)
