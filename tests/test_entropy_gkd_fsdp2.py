"""EntropyAwareGKDTrainer under FSDP2 (issue 10, item 4): 2 CPU processes (gloo), 2 optimizer steps.

The run goes through accelerate's FSDP2 plugin (`fsdp_version: 2`, one shard group per decoder layer), which
accelerate only enables on accelerators; tests/cpu_fsdp2.py lets it run on CPU, so the code under test is what a GPU
run executes: fully_shard'ed student with DTensor parameters, TRL's forward redirection, and the fused loss reading
the sharded lm_head. A DDP run of the same trainer, launched alongside, is the reference.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from test_distributed import CPU_2PROC, _launch
from trl_sdx.testing import make_student_teacher

DRIVER = Path(__file__).with_name("distributed_driver.py")
FSDP2_CPU = Path(__file__).with_name("accelerate_fsdp2_cpu.yaml")


# Both optimizer steps on one rollout: π_old is recorded at rollout time and the second step's ratio departs from 1,
# so the rollout-time passes (student log-probs, teacher targets) run under FSDP2 too.
OVERRIDES = json.dumps({"steps_per_generation": 2})


def _run(config: Path, out_dir: Path):
    return _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                    "--main_process_port", "0", str(DRIVER), "entropy-gkd", str(out_dir), OVERRIDES])


def test_fsdp2_two_processes_train_like_ddp(tmp_path):
    runs = {"fsdp2": FSDP2_CPU, "ddp": CPU_2PROC}
    with ThreadPoolExecutor(len(runs)) as pool:  # both launches at once: the test costs one launch's time
        results = dict(zip(runs, pool.map(lambda name: _run(runs[name], tmp_path / name), runs)))
    for name, result in results.items():
        assert result.returncode == 0, f"{name}:\n{result.stderr[-4000:]}"
    ranks = {name: [json.loads((tmp_path / name / f"rank{r}.json").read_text()) for r in (0, 1)] for name in runs}

    fsdp2, ddp = ranks["fsdp2"], ranks["ddp"]
    assert [r["distributed_type"] for r in fsdp2] == ["DistributedType.FSDP"] * 2
    assert all(r["parameter_types"] == ["DTensor"] for r in fsdp2)  # really sharded, not replicated
    assert all(r["teacher_parameter_types"] == ["DTensor"] for r in fsdp2)  # the frozen teacher too
    assert ddp[0]["distributed_type"] == "DistributedType.MULTI_CPU"
    assert sorted(fsdp2[0]["losses"]) == ["1", "2"]  # two optimizer steps logged
    assert fsdp2[0]["losses"] == fsdp2[1]["losses"]
    for step, loss in ddp[0]["losses"].items():
        assert fsdp2[0]["losses"][step] == pytest.approx(loss, rel=1e-5)

    weights = {name: [torch.load(tmp_path / name / f"weights{r}.pt") for r in (0, 1)] for name in runs}
    assert weights["fsdp2"][0].keys() == weights["ddp"][0].keys()
    _, initial, _ = make_student_teacher(seed=0)  # the factory's student before training
    initial = dict(initial.named_parameters())
    for name, tensor in weights["fsdp2"][0].items():
        torch.testing.assert_close(tensor, weights["fsdp2"][1][name], rtol=0, atol=0)
        torch.testing.assert_close(tensor, weights["ddp"][0][name], rtol=1e-5, atol=1e-6)
    moved = max((w - initial[n].double()).abs().max().item() for n, w in weights["fsdp2"][0].items())
    assert moved > 1e-4  # the comparison is between trained weights, not two copies of the initial ones
