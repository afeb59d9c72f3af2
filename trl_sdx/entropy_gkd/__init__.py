"""Entropy-aware on-policy distillation (EOPD, arXiv 2603.07079) as a TRL `DistillationTrainer`."""

from .entropy_gkd_config import EntropyAwareGKDConfig
from .entropy_gkd_trainer import EntropyAwareGKDTrainer

__all__ = ["EntropyAwareGKDConfig", "EntropyAwareGKDTrainer"]
