"""The end of a multi-process run: the finished run is freed, every rank waits for the others, then the default
process group is destroyed.

Why it matters: a process that exits with a live Gloo group can abort during interpreter finalization (SIGABRT,
"terminate called without an active exception": Gloo's worker threads are torn down after Python is gone). The
launcher then kills the other ranks, and a run that trained and saved correctly exits with a failure. accelerate's
`Accelerator.end_training` does the same; TRL's scripts never call it, so our entry points do.
"""

from __future__ import annotations


def end_process_group() -> None:
    """Collect garbage, barrier on every rank, then `destroy_process_group()`; nothing happens without a process group.

    Call it once, after the script's work has succeeded on this rank (a rank that failed should exit at once so the
    launcher stops the others, rather than wait here for ranks that will never arrive).
    """
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    from accelerate import PartialState

    # A finished Trainer lives on in reference cycles until the next collection, and with it the DDP/FSDP wrapper
    # that holds the process group and Gloo's pending work objects. Collect it now, while the interpreter is whole,
    # so destroying the group below releases the last reference and Gloo's threads end here, not at finalization.
    gc.collect()
    state = PartialState()  # the run's Accelerator built it (a group made by hand gets a non-distributed one)
    state.wait_for_everyone()  # NCCL needs the device-aware barrier accelerate issues
    dist.destroy_process_group()
