"""Synthetic, deterministic task data: nothing is downloaded."""

from trl_sdx.data.arithmetic import make_arithmetic_dataset
from trl_sdx.data.knowledge import make_knowledge_dataset

# Names accepted by the scripts' `--dataset_name` that build data in-process instead of loading it.
SYNTHETIC_DATASETS = {
    "synthetic-arithmetic": make_arithmetic_dataset,
    "synthetic-knowledge": make_knowledge_dataset,
}

__all__ = ["SYNTHETIC_DATASETS", "make_arithmetic_dataset", "make_knowledge_dataset"]
