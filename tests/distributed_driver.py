"""Run one tiny trainer for 2 optimizer steps under `accelerate launch` and write what this rank saw.

Used by tests/test_distributed.py: `accelerate launch --config_file cpu_2proc.yaml distributed_driver.py METHOD OUT`,
and by tests/test_entropy_gkd_fsdp2.py with an FSDP2 config (see tests/cpu_fsdp2.py). Writes `rank{R}.json` and the
rank's full trainable weights, `weights{R}.pt`. An optional third argument, a JSON object, overrides config fields.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from cpu_fsdp2 import allow_fsdp2_on_cpu  # noqa: E402
from tiny_trainers import FACTORIES, logged_losses  # noqa: E402


def _full(param):
    """The whole tensor of a parameter (FSDP2 shards it as a DTensor)."""
    return param.full_tensor() if hasattr(param, "full_tensor") else param


def main(method: str, out_dir: str, overrides: str = "{}") -> None:
    allow_fsdp2_on_cpu()  # only acts when launched with an FSDP config
    trainer = FACTORIES[method](os.path.join(out_dir, "run"), max_steps=2, **json.loads(overrides))
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    weights = {name: _full(p).detach().double() for name, p in model.named_parameters() if p.requires_grad}
    checksum = float(sum(w.sum() for w in weights.values()))
    teacher = getattr(trainer, "teacher_model", None)
    teacher_types = sorted({type(p).__name__ for p in teacher.parameters()}) if teacher is not None else []
    torch.save(weights, os.path.join(out_dir, f"weights{trainer.accelerator.process_index}.pt"))
    record = {
        "rank": trainer.accelerator.process_index,
        "world_size": trainer.accelerator.num_processes,
        "losses": logged_losses(trainer),
        "trainable_checksum": checksum,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "parameter_types": sorted({type(p).__name__ for p in model.parameters()}),
        "teacher_parameter_types": teacher_types,
    }
    with open(os.path.join(out_dir, f"rank{record['rank']}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    from trl_sdx.process_group import end_process_group

    main(*sys.argv[1:])
    end_process_group()
