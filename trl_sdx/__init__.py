"""trl_sdx: Entropy-Aware On-Policy Distillation, Self-Distillation Zero and MixSD as TRL trainers.

Imports are lazy so `import trl_sdx` (and `trl-sdx --help`) stay fast; `from trl_sdx import X` works as usual.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "EntropyAwareGKDConfig": "trl_sdx.entropy_gkd",
    "EntropyAwareGKDTrainer": "trl_sdx.entropy_gkd",
    "SDZeroConfig": "trl_sdx.sdzero",
    "SDZeroTrainer": "trl_sdx.sdzero",
    "MixSDConfig": "trl_sdx.mixsd",
    "MixSDTrainer": "trl_sdx.mixsd",
    "mixed_generate": "trl_sdx.mixsd",
    "entropy_aware_opd_loss": "trl_sdx.losses",
    "topk_distillation_loss": "trl_sdx.losses",
    "TeacherTargets": "trl_sdx.losses",
    "score_teacher_targets": "trl_sdx.losses",
    "eopd_loss_from_targets": "trl_sdx.losses",
    "fused_eopd_loss_from_targets": "trl_sdx.losses",
    "boxed_answer_reward": "trl_sdx.rewards",
    "math_verify_reward": "trl_sdx.rewards",
    "lenient_answer_reward": "trl_sdx.rewards",
    "resolve_model_name_or_path": "trl_sdx.models",
    "make_half_depth_student": "trl_sdx.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trl_sdx' has no attribute {name!r}")
