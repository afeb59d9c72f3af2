"""Every trainer under a real 2-process launch (gloo on CPU): both ranks finish, agree on the logged loss, and
hold the same weights afterwards (gradients were all-reduced)."""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_trainers import FACTORIES

CPU_2PROC = Path(__file__).parents[1] / "trl_sdx" / "accelerate_configs" / "cpu_2proc.yaml"


def _launch(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("method", sorted(FACTORIES))
def test_two_processes_agree(method, tmp_path):
    driver = Path(__file__).with_name("distributed_driver.py")
    result = _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
                      "--main_process_port", "0", str(driver), method, str(tmp_path)])
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert sorted(ranks[0]["losses"]) == ["1", "2"]  # two optimizer steps logged (json keys are strings)
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["trainable_checksum"] == pytest.approx(ranks[1]["trainable_checksum"], rel=1e-9, abs=1e-9)


def test_cli_launches_two_processes(tmp_path):
    """`trl-sdx <method> --accelerate_config cpu_2proc` goes through accelerate launch like `trl` does."""
    from trl_sdx.testing import save_tiny_pair

    student, teacher = save_tiny_pair(tmp_path / "models")
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {student}\nteacher_model_name_or_path: {teacher}\n"
        "dataset_name: synthetic-arithmetic\nsynthetic_num_prompts: 8\n"
        f"output_dir: {tmp_path / 'out'}\nper_device_train_batch_size: 2\nmax_completion_length: 4\n"
        "max_steps: 2\nlogging_steps: 1\nsave_strategy: 'no'\nreport_to: none\nuse_cpu: true\nbf16: false\n"
        "dtype: float32\ndisable_tqdm: true\n"
    )
    result = _launch([sys.executable, "-m", "trl_sdx.cli", "entropy-gkd", "--accelerate_config", "cpu_2proc",
                      "--main_process_port", "0", "--config", str(config)])
    assert result.returncode == 0, result.stderr[-4000:]
    # 8 prompts, 2 per process and step: one epoch is 2 steps with 2 processes (4 with one).
    assert "'epoch': '0.5'" in result.stdout, result.stdout[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_end_process_group_frees_the_finished_run_then_destroys_the_group():
    """The scripts' last call: without it a Gloo rank can abort at exit (SIGABRT) after a successful run."""
    import torch.distributed as dist

    from trl_sdx.process_group import end_process_group

    end_process_group()  # no group: nothing to do, nothing raised
    assert not dist.is_initialized()

    class FinishedRun:  # stands for a Trainer kept alive by reference cycles, holding the group through DDP
        def __del__(self):
            group_alive_when_freed.append(dist.is_initialized())

    group_alive_when_freed = []
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    gc.disable()  # only end_process_group's own collection may free the cycle
    try:
        run = FinishedRun()
        run.self = run
        del run
        end_process_group()
        assert not dist.is_initialized()
        assert group_alive_when_freed == [True]  # collected first, while the group still existed
    finally:
        gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()
