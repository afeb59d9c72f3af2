"""Run one tiny trainer for 2 optimizer steps under `accelerate launch` and write what this rank saw.

Used by tests/test_distributed.py: `accelerate launch --config_file cpu_2proc.yaml distributed_driver.py METHOD OUT`.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from tiny_trainers import FACTORIES, logged_losses  # noqa: E402


def main(method: str, out_dir: str) -> None:
    trainer = FACTORIES[method](os.path.join(out_dir, "run"), max_steps=2)
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    checksum = float(sum(p.detach().double().sum() for p in model.parameters() if p.requires_grad))
    record = {
        "rank": trainer.accelerator.process_index,
        "world_size": trainer.accelerator.num_processes,
        "losses": logged_losses(trainer),
        "trainable_checksum": checksum,
    }
    with open(os.path.join(out_dir, f"rank{record['rank']}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
