"""vLLM sized for EOPD's rollouts, not for one optimizer step.

`DistillationTrainer` builds its `VLLMGeneration` with `max_num_seqs = per_device_train_batch_size *
vllm_tensor_parallel_size * gradient_accumulation_steps`: the prompts of one optimizer step. EOPD generates a whole
rollout at once (`steps_per_generation` micro-batches, GRPO's schedule), so with the paper's 128 prompts per rollout
and a mini-batch of 32 vLLM would decode a quarter of the rollout at a time, about 4x slower. GRPOTrainer sizes it
for the rollout; so do we:

* colocate: each process (or tensor-parallel group, whose members gather their prompts) generates its share of the
  rollout in one call, `per_device_train_batch_size * steps_per_generation` prompts per process, so
  `max_num_seqs = per_device_train_batch_size * vllm_tensor_parallel_size * steps_per_generation` (GRPOTrainer's
  formula).
* server: the trainer hands vLLM no `max_num_seqs`. The main process gathers the prompts of every process and sends
  the whole rollout (`generation_batch_size` prompts) in one request, so TRL's client already uses the full width;
  how many of them the server decodes at once is the server's own `--max-num-seqs` (per data-parallel engine), set
  when it is started. We read it from the server and warn when the server is narrower than a rollout.
"""

from __future__ import annotations

from contextlib import contextmanager

from accelerate.logging import get_logger
from trl.trainer import distillation_trainer

logger = get_logger(__name__)


def rollout_max_num_seqs(args) -> int:
    """`max_num_seqs` for a colocated vLLM engine: the prompts one engine receives per rollout (GRPOTrainer's rule)."""
    return args.per_device_train_batch_size * args.vllm_tensor_parallel_size * args.steps_per_generation


def server_concurrency(server_info: dict) -> int | None:
    """Sequences a vLLM server decodes at once: `max_num_seqs` x data-parallel engines; None when not reported."""
    max_num_seqs = (server_info.get("scheduler_config") or {}).get("max_num_seqs")
    if max_num_seqs is None:
        return None
    data_parallel = (server_info.get("parallel_config") or {}).get("data_parallel_size") or 1
    return int(max_num_seqs) * int(data_parallel)


def check_server_width(vllm_generation, args) -> None:
    """Main process, server mode: warn when the server decodes fewer sequences at once than a rollout holds."""
    client = getattr(vllm_generation, "vllm_client", None)
    if client is None:  # only the main process talks to the server
        return
    rollout = args.generation_batch_size
    try:
        width = server_concurrency(client.get_server_info())
    except Exception as error:  # noqa: BLE001 - a server without the info endpoint still generates
        logger.warning(f"Could not read the vLLM server's `max_num_seqs` ({error}); make sure it is at least the "
                       f"rollout size ({rollout} prompts) or rollouts will be decoded in several waves.")
        return
    if width is None:
        logger.warning(f"The vLLM server does not report `max_num_seqs`; make sure it is at least the rollout size "
                       f"({rollout} prompts) or rollouts will be decoded in several waves.")
    elif width < rollout:
        logger.warning(
            f"The vLLM server decodes at most {width} sequences at once, but each rollout sends {rollout} prompts "
            f"(generation_batch_size), so a rollout is decoded in {-(-rollout // width)} waves. Restart the server "
            f"with `--max-num-seqs {rollout}` (per data-parallel engine: the rollout divided by the engines)."
        )


@contextmanager
def rollout_sized_vllm(args):
    """While `DistillationTrainer.__init__` runs, build its `VLLMGeneration` sized for a whole rollout.

    The sizing is a constructor argument computed inside `DistillationTrainer.__init__`, with no hook; the name it
    calls is swapped for the duration of this block only (pinned by tests/test_entropy_gkd_vllm.py).
    """
    if not args.use_vllm:
        yield
        return
    original = distillation_trainer.VLLMGeneration

    def build(*positional, **kwargs):
        if kwargs.get("mode") == "colocate":
            kwargs["max_num_seqs"] = rollout_max_num_seqs(args)
        generation = original(*positional, **kwargs)
        if kwargs.get("mode") == "server":
            check_server_width(generation, args)
        return generation

    distillation_trainer.VLLMGeneration = build
    try:
        yield
    finally:
        distillation_trainer.VLLMGeneration = original
