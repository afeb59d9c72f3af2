import importlib
import subprocess
import sys

import pytest

from trl_sdx.cli import TRAINING_COMMANDS, main, split_launch_args


def _run(*args):
    return subprocess.run([sys.executable, "-m", "trl_sdx.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands():
    out = _run("--help")
    assert out.returncode == 0, out.stderr
    assert "env" in out.stdout
    for name in TRAINING_COMMANDS:
        assert name in out.stdout


def test_env_prints_stack_and_device(capsys):
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    for name in ("trl ", "transformers", "torch", "liger-kernel", "math-verify", "device"):
        assert name in text
    assert "cpu" in text


@pytest.mark.parametrize("name", sorted(TRAINING_COMMANDS))
def test_every_registered_command_has_a_trl_parser(name):
    from trl import TrlParser

    module = importlib.import_module(TRAINING_COMMANDS[name][0])
    assert isinstance(module.make_parser(), TrlParser)
    assert callable(module.main)


def test_launch_flags_are_split_from_script_flags():
    launch, script = split_launch_args(
        ["--num_processes", "2", "--config", "x.yaml", "--cpu", "--accelerate_config", "multi_gpu", "--tau=0.5"]
    )
    assert launch[:3] == ["--num_processes", "2", "--cpu"] and launch[3] == "--config_file"
    assert launch[4].endswith("multi_gpu.yaml")
    assert script == ["--config", "x.yaml", "--tau=0.5"]
