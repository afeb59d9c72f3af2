"""`trl-sdx env` says whether Liger's Triton kernels (what `use_liger_kernel=True` needs) can run here."""

import importlib.util

import pytest
import torch

import trl_sdx.liger
from trl_sdx.env import collect_env


@pytest.mark.skipif(torch.cuda.is_available(), reason="the answer of a machine without CUDA")
def test_env_reports_liger_unusable_without_cuda():
    assert collect_env()["liger triton kernels"] == (
        "not usable: no CUDA device (Liger's model kernels are Triton GPU kernels)")


def test_missing_triton_is_named(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(trl_sdx.liger.importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    assert trl_sdx.liger.liger_triton_status() == (False, "triton is not installed")
