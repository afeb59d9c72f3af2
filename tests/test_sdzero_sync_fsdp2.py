"""Teacher sync under FSDP2 (2 CPU processes, gloo, through accelerate's FSDP2 plugin; see tests/cpu_fsdp2.py).

The student is fully_shard'ed per decoder layer (DTensor parameters), and so is the frozen 'copy' teacher (TRL would
replicate it; SDZeroTrainer shards it with `prepare_fsdp`), so the sync copies shard by shard
(`teacher_sync._assign`). After 2 steps with a sync after each, the teacher equals
the student on every rank, both equal a DDP run of the same trainer, and `save_model` writes `sdzero_teacher.pt`.

This file is also the driver the launches run: `python test_sdzero_sync_fsdp2.py OUT`.
"""

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))

from test_distributed import CPU_2PROC, _launch  # noqa: E402

FSDP2_CPU = Path(__file__).with_name("accelerate_fsdp2_cpu.yaml")


def parity_reward(completions, **kwargs):
    return [float(len(c[0]["content"]) % 2) for c in completions]


def main(out_dir: str) -> None:
    from cpu_fsdp2 import allow_fsdp2_on_cpu

    from trl_sdx.data import make_arithmetic_dataset
    from trl_sdx.sdzero import SDZeroConfig, SDZeroTrainer
    from trl_sdx.sdzero.teacher_sync import TEACHER_STATE_FILE
    from trl_sdx.testing import make_tiny_model, make_tiny_tokenizer

    allow_fsdp2_on_cpu()  # only acts when launched with an FSDP config
    tokenizer = make_tiny_tokenizer()
    args = SDZeroConfig(
        output_dir=os.path.join(out_dir, "run"), max_steps=2, per_device_train_batch_size=2, max_completion_length=6,
        learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True, bf16=False, disable_tqdm=True, seed=0,
        save_strategy="no", teacher_mode="copy", teacher_sync_steps=1,
    )
    trainer = SDZeroTrainer(make_tiny_model(tokenizer, seed=0), reward_funcs=[parity_reward], args=args,
                            train_dataset=make_arithmetic_dataset(16), processing_class=tokenizer)
    trainer.train()
    full = lambda p: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double()  # noqa: E731
    student = {n: full(p) for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}
    teacher = {n: full(p) for n, p in trainer.accelerator.unwrap_model(trainer.teacher_model).named_parameters()}
    saved = os.path.join(out_dir, "saved")
    trainer.save_model(saved)
    rank = trainer.accelerator.process_index
    torch.save({"student": student, "teacher": teacher}, os.path.join(out_dir, f"weights{rank}.pt"))
    record = {"distributed_type": str(trainer.accelerator.distributed_type),
              "student_types": sorted({type(p).__name__ for p in trainer.model.parameters()}),
              "teacher_types": sorted({type(p).__name__ for p in trainer.teacher_model.parameters()}),
              "saved_teacher": os.path.isfile(os.path.join(saved, TEACHER_STATE_FILE))}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


def test_sync_under_fsdp2_copies_the_shards_like_ddp(tmp_path):
    driver = str(Path(__file__).resolve())
    runs = {"fsdp2": FSDP2_CPU, "ddp": CPU_2PROC}

    def run(name):
        return _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(runs[name]),
                        "--main_process_port", "0", driver, str(tmp_path / name)])

    with ThreadPoolExecutor(len(runs)) as pool:  # both launches at once: the test costs one launch's time
        results = dict(zip(runs, pool.map(run, runs)))
    for name, result in results.items():
        assert result.returncode == 0, f"{name}:\n{result.stderr[-4000:]}"

    records = [json.loads((tmp_path / "fsdp2" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["distributed_type"] for r in records] == ["DistributedType.FSDP"] * 2
    assert all(r["student_types"] == ["DTensor"] for r in records)  # the student really is sharded
    assert all(r["teacher_types"] == ["DTensor"] for r in records)  # and so is the teacher (not one copy per GPU)
    assert records[0]["saved_teacher"]  # written by the main process, from shards gathered on both
    fsdp2 = [torch.load(tmp_path / "fsdp2" / f"weights{r}.pt") for r in (0, 1)]
    ddp = torch.load(tmp_path / "ddp" / "weights0.pt")
    saved = torch.load(tmp_path / "fsdp2" / "saved" / "sdzero_teacher.pt")
    for name, value in fsdp2[0]["student"].items():
        torch.testing.assert_close(fsdp2[0]["teacher"][name], value, rtol=0, atol=0)  # synced after step 2
        torch.testing.assert_close(fsdp2[1]["teacher"][name], value, rtol=0, atol=0)
        torch.testing.assert_close(value, ddp["student"][name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(saved[name].double(), value, rtol=0, atol=0)


if __name__ == "__main__":
    from trl_sdx.process_group import end_process_group

    main(sys.argv[1])
    end_process_group()
