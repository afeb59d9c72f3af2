"""Every test runs offline, on CPU, deterministically."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# Tiny models gain nothing from intra-op threads, and on a loaded 2-core CI box two threads per process
# oversubscribe badly (10x slower measured); subprocesses (CLI tests) inherit the same setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_pair():
    """(tokenizer, student, teacher) from the offline test kit; copy before mutating."""
    from trl_sdx.testing import make_student_teacher

    return make_student_teacher(seed=0)
