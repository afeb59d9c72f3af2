"""vLLM sized for a whole EOPD rollout (issue 10, item 2), on CPU with vLLM replaced by recorders.

vLLM is not installed here: `vllm.LLM` / `vllm.SamplingParams` (colocate) and TRL's `VLLMClient` (server) are
swapped for recorders in `trl.generation.vllm_generation`, which is where TRL's `VLLMGeneration` looks them up.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from datasets import Dataset

import trl.generation.vllm_generation as vllm_generation
import trl.trainer.distillation_trainer as distillation_trainer
from trl_sdx.testing import make_student_teacher

PER_DEVICE, GENERATION_BATCH = 2, 8  # 4 micro-batches per rollout, one optimizer step each
COMPLETION = [17, 23, 42]


class RecordingLLM:
    """Stands in for `vllm.LLM`: keeps its constructor arguments and the size of every generate call."""

    instances: list[RecordingLLM] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.generate_sizes = []
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=512))
        RecordingLLM.instances.append(self)

    def generate(self, prompts, sampling_params=None, use_tqdm=False):
        self.generate_sizes.append(len(prompts))
        return [SimpleNamespace(prompt_token_ids=p["prompt_token_ids"],
                                outputs=[SimpleNamespace(token_ids=list(COMPLETION), logprobs=None)]) for p in prompts]


class RecordingClient:
    """Stands in for TRL's `VLLMClient` (server mode); reports a server with `max_num_seqs` = `server_width`."""

    instances: list[RecordingClient] = []
    server_width = 256

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.generate_sizes = []
        RecordingClient.instances.append(self)

    def init_communicator(self, device):
        pass

    def get_server_info(self):
        return {"scheduler_config": {"max_num_seqs": self.server_width}, "parallel_config": {"data_parallel_size": 1}}

    def generate(self, prompts, n=1, **sampling):
        self.generate_sizes.append(len(prompts))
        return {"prompt_ids": [list(p) for p in prompts], "completion_ids": [list(COMPLETION) for _ in prompts],
                "logprobs": None, "logprob_token_ids": None}


@pytest.fixture
def fake_vllm(monkeypatch):
    RecordingLLM.instances, RecordingClient.instances = [], []
    monkeypatch.setattr(distillation_trainer, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(vllm_generation, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(vllm_generation, "LLM", RecordingLLM, raising=False)
    monkeypatch.setattr(vllm_generation, "SamplingParams", dict, raising=False)
    monkeypatch.setattr(vllm_generation, "VLLMClient", RecordingClient)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # colocate init sets these
        monkeypatch.setenv(name, "0" if "RANK" in name else {"WORLD_SIZE": "1", "MASTER_ADDR": "localhost",
                                                             "MASTER_PORT": "29517"}[name])


def _trainer(tmp_path, mode, **overrides):
    from trl_sdx.entropy_gkd import EntropyAwareGKDConfig, EntropyAwareGKDTrainer

    tokenizer, student, teacher = make_student_teacher(seed=0)
    args = EntropyAwareGKDConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=PER_DEVICE, generation_batch_size=GENERATION_BATCH,
        max_completion_length=8, use_vllm=True, vllm_mode=mode, use_cpu=True, bf16=False, report_to="none",
        max_steps=1, **overrides,
    )
    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{i} + {i}?"}] for i in range(16)]})
    return EntropyAwareGKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                                  processing_class=tokenizer)


def _one_rollout(trainer):
    """Generate one rollout as training does (weight sync, which needs a real engine, is marked done)."""
    trainer.model.train()
    trainer._last_loaded_step = trainer.state.global_step
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


@pytest.mark.parametrize("accumulation", [1, 2])
def test_colocate_engine_holds_a_whole_rollout(fake_vllm, tmp_path, accumulation):
    trainer = _trainer(tmp_path, "colocate", gradient_accumulation_steps=accumulation)
    assert trainer.args.steps_per_generation == GENERATION_BATCH // PER_DEVICE
    [llm] = RecordingLLM.instances
    # One process, tensor-parallel size 1: the engine receives the whole rollout of this process in one call.
    assert llm.kwargs["max_num_seqs"] == GENERATION_BATCH
    # DistillationTrainer's own sizing (one optimizer step's prompts) would have been narrower.
    assert PER_DEVICE * accumulation < GENERATION_BATCH
    assert distillation_trainer.VLLMGeneration is vllm_generation.VLLMGeneration  # the swap is undone

    micro_batch = _one_rollout(trainer)
    assert llm.generate_sizes == [GENERATION_BATCH]
    assert micro_batch["completion_ids"].shape[0] == PER_DEVICE
    assert micro_batch["completion_ids"][0, : len(COMPLETION)].tolist() == COMPLETION


def test_server_gets_the_whole_rollout_in_one_request(fake_vllm, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        trainer = _trainer(tmp_path, "server")
    assert RecordingLLM.instances == []  # no engine in the trainer: the server's own --max-num-seqs applies
    [client] = RecordingClient.instances
    assert "max_num_seqs" not in client.kwargs
    assert "decodes at most" not in caplog.text  # the server (256 at once) is wider than a rollout (8)

    _one_rollout(trainer)
    assert client.generate_sizes == [GENERATION_BATCH]


def test_narrow_server_is_reported(fake_vllm, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(RecordingClient, "server_width", 4)
    with caplog.at_level(logging.WARNING):
        _trainer(tmp_path, "server")
    assert "decodes at most 4 sequences at once" in caplog.text
    assert f"--max-num-seqs {GENERATION_BATCH}" in caplog.text
