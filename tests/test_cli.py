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


# ---------------------------------------------------------------------------------------------------------------
# One-line errors and a helpful --help (issue 12)
# ---------------------------------------------------------------------------------------------------------------


def _main_error(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def test_unknown_flag_is_one_line_with_a_suggestion(capsys):
    code, err = _main_error(capsys, "entropy-gkd", "--tua", "0.5")
    assert code == 2
    assert err == "trl-sdx entropy-gkd: error: unrecognized argument --tua (did you mean --tau?)"


def test_unknown_key_in_the_config_file_names_the_file(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model_name_or_path: x\nlerning_rate: 1.0e-5\n")
    code, err = _main_error(capsys, "entropy-gkd", "--config", str(config))
    assert code == 2
    assert err == f"trl-sdx entropy-gkd: error: unknown key 'lerning_rate' in {config} (did you mean --learning_rate?)"


def test_missing_config_file_names_the_path(capsys, tmp_path):
    missing = tmp_path / "nope.yaml"
    code, err = _main_error(capsys, "sdzero", "--config", str(missing))
    assert code == 2
    assert err.startswith(f"trl-sdx sdzero: error: config file not found: {missing}")
    assert "\n" not in err


def test_bad_value_and_config_check_are_one_line(capsys):
    code, err = _main_error(capsys, "entropy-gkd", "--tau", "abc")
    assert code == 2 and err == "trl-sdx entropy-gkd: error: argument --tau: invalid float value: 'abc'"
    code, err = _main_error(capsys, "entropy-gkd", "--model_name_or_path", "x", "--tau", "-1")
    assert code == 2 and err.startswith("trl-sdx entropy-gkd: error: `tau` must") and "\n" not in err


def test_bare_command_asks_for_the_model_not_for_a_gpu(capsys):
    code, err = _main_error(capsys, "entropy-gkd")
    assert code == 2
    assert err.startswith("trl-sdx entropy-gkd: error: --model_name_or_path is required") and "\n" not in err


def _help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(TRAINING_COMMANDS))
def test_help_starts_with_the_methods_own_options(capsys, name):
    from transformers import TrainingArguments

    from trl_sdx.cli import _own_fields

    text = _help(capsys, name)
    lines = text.splitlines()
    assert lines[0].startswith(f"usage: trl-sdx {name} [--config CONFIG.yaml]")
    assert len(text.split("\n\n")[0].splitlines()) <= 3  # a short usage, not 100 lines of flags
    parser = importlib.import_module(TRAINING_COMMANDS[name][0]).make_parser()
    config_cls = next(t for t in parser.dataclass_types if issubclass(t, TrainingArguments))
    first_group = next(i for i, line in enumerate(lines) if line.endswith("(the method's options):"))
    assert lines[first_group].startswith(config_cls.__name__)
    assert first_group < 8  # right after the usage and the description
    next_group = next(i for i, line in enumerate(lines) if i > first_group and line and not line.startswith(" "))
    own_flags = {line.split()[0].rstrip(",") for line in lines[first_group + 1 : next_group]
                 if line.startswith("  --") and not line.startswith("  --no_")}
    assert own_flags == {f"--{field}" for field in _own_fields(config_cls)}
    for flag in ("--config", "--num_processes", "--accelerate_config"):
        assert f"  {flag} " in text
    model_help = text[text.index("  --model_name_or_path"):].split("\n  --")[0]
    assert "smollm2-135m-instruct" in model_help and "half-depth" in model_help


def test_single_process_runs_pass_accelerates_defaults(monkeypatch):
    import accelerate.commands.config as accelerate_config

    from trl_sdx.cli import single_process_launch_defaults

    monkeypatch.setattr(accelerate_config, "default_config_file", "/nonexistent/default_config.yaml")
    assert single_process_launch_defaults([]) == ["--num_processes", "1", "--num_machines", "1",
                                                  "--mixed_precision", "no", "--dynamo_backend", "no"]
    assert single_process_launch_defaults(["--num_processes", "2"])[:2] == ["--num_machines", "1"]
    assert single_process_launch_defaults(["--config_file", "x.yaml"]) == []  # the file decides


# ---------------------------------------------------------------------------------------------------------------
# Real launches: no warnings we cause, the run's files, one line for a failed training process (issue 12)
# ---------------------------------------------------------------------------------------------------------------

OUR_WARNINGS = (
    "`gradient_checkpointing` is deprecated",  # TRL's default under transformers' deprecated name
    "were not passed to `accelerate launch`",  # accelerate filling --num_processes & co. itself
    "You passed `model_init_kwargs`",  # SFTTrainer in SD-Zero phase 1
    "Your setup doesn't support bf16",
)


def _cli(*args, env_extra=None, cwd=None):
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "trl_sdx.cli", *args], capture_output=True, text=True,
                          timeout=900, env=env, cwd=cwd)


def test_short_cli_run_warns_nothing_of_ours_and_writes_its_files(tmp_path):
    import json

    from trl_sdx.testing import save_tiny_pair

    student, teacher = save_tiny_pair(tmp_path / "models")
    out = tmp_path / "run"
    result = _cli("entropy-gkd", "--model_name_or_path", student, "--teacher_model_name_or_path", teacher,
                  "--dataset_name", "synthetic-arithmetic", "--synthetic_num_prompts", "8", "--max_steps", "1",
                  "--per_device_train_batch_size", "2", "--max_completion_length", "4", "--use_cpu",
                  "--heldout_num_prompts", "2", "--heldout_max_new_tokens", "4", "--output_dir", str(out),
                  "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    for warning in OUR_WARNINGS:
        assert warning not in log
    for name in ("metrics.jsonl", "trainer_state.json", "training_curves.png", "heldout_eval.json", "README.md",
                 "model.safetensors"):
        assert (out / name).is_file(), name
    assert not list(out.glob("checkpoint-*")) and not (out / "optimizer.pt").exists()
    evaluation = json.loads((out / "heldout_eval.json").read_text())
    assert set(evaluation["before"]) == {"kl_teacher_student", "student_nll_of_teacher_text"}
    assert "kl_teacher_student" in log and "->" in log  # the before -> after lines are printed
    card = (out / "README.md").read_text()
    assert "[None]" not in card and "2603.07079" in card


def test_sdzero_srt_cli_run_does_not_warn_about_model_init_kwargs(tmp_path):
    import os
    import textwrap

    from trl_sdx.testing import save_tiny_pair

    student, _ = save_tiny_pair(tmp_path / "models")
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def parity(completions, **kwargs):
            return [float(len(c[0]["content"]) % 2) for c in completions]
    """))
    result = _cli("sdzero-srt", "--model_name_or_path", student, "--dataset_name", "synthetic-arithmetic",
                  "--synthetic_num_prompts", "4", "--reward_funcs", "my_rewards.parity", "--output_dir",
                  str(tmp_path / "srt"), "--num_train_epochs", "1", "--per_device_train_batch_size", "4",
                  "--init_max_new_tokens", "6", "--revision_max_new_tokens", "6", "--num_revisions", "2",
                  "--revise_correct", "--use_cpu", "--report_to", "none", "--save_strategy", "no",
                  "--srt_stages", "generation", "--disable_tqdm", "true", "--stage2_size", "1",
                  env_extra={"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])},
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for warning in OUR_WARNINGS:
        assert warning not in result.stdout + result.stderr


def test_a_failing_training_process_is_reported_once(tmp_path):
    missing = str(tmp_path / "no-such-model")
    result = _cli("entropy-gkd", "--model_name_or_path", missing, "--teacher_model_name_or_path", missing,
                  "--dataset_name", "synthetic-arithmetic", "--use_cpu", "--output_dir", str(tmp_path / "run"),
                  "--report_to", "none")
    assert result.returncode != 0
    assert "CalledProcessError" not in result.stderr
    assert "Traceback" in result.stderr  # the training process's own (its cause is worth reading) ...
    assert "accelerate/commands/launch.py" not in result.stderr  # ... and none from the launcher around it
    assert result.stderr.strip().splitlines()[-1] == (
        "trl-sdx entropy-gkd: error: the training process failed with exit code 1 (its error is printed above).")
