"""Let accelerate's FSDP2 path run on CPU processes (gloo), for tests.

accelerate only turns an FSDP launch into `DistributedType.FSDP` on accelerator devices: on CPU it keeps
`MULTI_CPU` and wraps the model in DDP, although torch's `fully_shard` itself trains on CPU with gloo. After
accelerate has set up its state, this switches the type to FSDP, as the same launch on GPUs would, so everything
downstream is the code a GPU run executes: `Accelerator.prepare` -> `fsdp2_prepare_model` (fully_shard per decoder
layer, DTensor parameters), the Trainer's FSDP2 branches, TRL's forward redirection and the fused loss's DTensor
lm_head gather.
"""

from __future__ import annotations

import os


def allow_fsdp2_on_cpu() -> None:
    """Patch `AcceleratorState` so an FSDP launch (`ACCELERATE_USE_FSDP=true`) on CPU uses the FSDP plugin."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    original_init = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # Both singletons: every later AcceleratorState() re-reads PartialState's shared state.
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init
