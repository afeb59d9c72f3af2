"""Precision and checkpointing defaults settled by `trl_sdx.precision` before TrainingArguments validates them."""

import warnings
from types import SimpleNamespace

import pytest

from trl_sdx import EntropyAwareGKDConfig, MixSDConfig, SDZeroConfig
from trl_sdx.precision import resolve_activation_checkpointing, resolve_precision
from trl_sdx.sdzero.srt import SRTConfig

CONFIGS = (EntropyAwareGKDConfig, SDZeroConfig, MixSDConfig, SRTConfig)


def _args(**overrides):
    return SimpleNamespace(**{"bf16": None, "fp16": False, "use_cpu": False, **overrides})


@pytest.mark.parametrize(
    ("overrides", "supported", "expected"),
    [
        ({}, True, True),  # unset, GPU with bf16: bf16
        ({}, False, False),  # unset, no such device: fp32
        ({"use_cpu": True}, True, False),  # the user asked for the CPU: fp32
        ({"fp16": True}, True, False),  # the user asked for fp16: not bf16 as well
        ({"bf16": False}, True, False),  # explicit choices are kept
        ({"bf16": True}, False, True),
    ],
)
def test_unset_bf16_follows_the_device(monkeypatch, overrides, supported, expected):
    monkeypatch.setattr("trl_sdx.precision.device_supports_bf16", lambda: supported)
    args = _args(**overrides)
    resolve_precision(args)
    assert args.bf16 is expected


@pytest.mark.parametrize("config_class", CONFIGS)
def test_configs_build_on_a_cpu_machine_in_fp32_without_warnings(monkeypatch, config_class, tmp_path):
    # TRL's own default (bf16=True) raises "Your setup doesn't support bf16/gpu" here, and its
    # gradient_checkpointing=True default warns that the name is deprecated.
    monkeypatch.setattr("trl_sdx.precision.device_supports_bf16", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = config_class(output_dir=str(tmp_path))
    assert args.bf16 is False
    assert args.activation_checkpointing is True and args.gradient_checkpointing is True  # TRL's default, kept


def test_explicit_gradient_checkpointing_false_is_honoured(tmp_path):
    with pytest.warns(FutureWarning, match="gradient_checkpointing"):  # the user's own deprecated name
        args = EntropyAwareGKDConfig(output_dir=str(tmp_path), gradient_checkpointing=False)
    assert args.activation_checkpointing is False
    args = EntropyAwareGKDConfig(output_dir=str(tmp_path), activation_checkpointing=False)
    assert args.gradient_checkpointing is False


def test_current_checkpointing_name_is_left_alone():
    args = SimpleNamespace(activation_checkpointing=False, gradient_checkpointing=True)
    resolve_activation_checkpointing(args)
    assert args.activation_checkpointing is False
