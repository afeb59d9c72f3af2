"""`trl-sdx` command line, shaped like `trl`: `trl-sdx <method> --config x.yaml [--flags]`.

Each training subcommand is a script module in `trl_sdx/scripts/` exposing `make_parser(prog=None)`
(a `TrlParser`) and `main(*parsed_dataclasses)`. Like `trl sft`, the script is started through
`accelerate launch`, so `--num_processes`, `--accelerate_config fsdp2` etc. work unchanged.

The arguments are parsed here first, in this process: `--help`, a misspelt flag, a missing config file or a
bad value give one line (and a "did you mean") before anything is launched. A training process that fails
prints its own traceback; this command then adds one line and exits with that process's code.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import importlib.resources as resources
import os
import subprocess
import sys
from pathlib import Path

# The one place where trainers register their subcommand: name -> (script module, help).
TRAINING_COMMANDS: dict[str, tuple[str, str]] = {
    "entropy-gkd": ("trl_sdx.scripts.entropy_gkd", "Entropy-aware on-policy distillation (EOPD)"),
    "sdzero": ("trl_sdx.scripts.sdzero", "Self-Distillation Zero, phase 2 (on-policy self-distillation)"),
    "sdzero-srt": ("trl_sdx.scripts.sdzero_srt", "Self-Distillation Zero, phase 1 (self-revision training)"),
    "mixsd": ("trl_sdx.scripts.mixsd", "MixSD knowledge injection (build mixed targets, then SFT)"),
}

# Arguments consumed by `accelerate launch` rather than by the training script, with their help for `--help`.
_LAUNCH_FLAGS_WITH_VALUE = {
    "--num_processes": "Processes to launch (one per GPU). Default: 1 on a machine with at most one GPU, else "
    "accelerate's default (all GPUs).",
    "--accelerate_config": "An accelerate config file, or a shipped one: multi_gpu, fsdp2, zero2, zero3, cpu_2proc "
    "(TRL's names work too).",
    "--main_process_port": "Port of the main process (multi-process runs).",
    "--mixed_precision": "accelerate's mixed precision (no, fp16, bf16); normally set by `--bf16`/`--fp16`.",
    "--config_file": "Same as `--accelerate_config`, with a file path.",
}
_LAUNCH_SWITCHES = {"--cpu": "Launch on CPU only.", "--multi_gpu": "Force a multi-GPU launch."}
_ALIAS_HELP = (" The embedded aliases `smollm2-135m-instruct` (SmolLM2-135M-Instruct, offline) and "
               "`smollm2-135m-instruct:half-depth` (every other decoder layer) work here too.")


class CLIError(Exception):
    """A user error the CLI reports as one line (`trl-sdx <command>: error: ...`), exit code 2."""


def _available_commands() -> dict[str, tuple[str, str]]:
    """Commands whose script module exists (a trainer not yet installed simply isn't offered)."""
    return {
        name: spec for name, spec in TRAINING_COMMANDS.items() if importlib.util.find_spec(spec[0]) is not None
    }


def resolve_accelerate_config(name_or_path: str) -> str:
    """A file path, or the name of a config shipped in `trl_sdx/accelerate_configs` (then TRL's)."""
    if Path(name_or_path).is_file():
        return name_or_path
    for package in ("trl_sdx.accelerate_configs", "trl.accelerate_configs"):
        try:
            candidate = resources.files(package).joinpath(f"{name_or_path}.yaml")
        except ModuleNotFoundError:
            continue
        if candidate.is_file():
            return str(candidate)
    raise CLIError(
        f"--accelerate_config {name_or_path!r} is neither a file nor a shipped config "
        "(multi_gpu, fsdp2, zero2, zero3, cpu_2proc)."
    )


def _flag_value(argv: list[str], i: int) -> tuple[str, int]:
    """The value of the flag at argv[i] (`--flag value` or `--flag=value`) and the index after it."""
    arg = argv[i]
    if "=" in arg:
        return arg.split("=", 1)[1], i + 1
    if i + 1 >= len(argv):
        raise CLIError(f"{arg} needs a value.")
    return argv[i + 1], i + 2


def split_launch_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `accelerate launch` flags from the training script's own flags."""
    launch, script = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key = arg.split("=", 1)[0]
        if key == "--accelerate_config":
            value, i = _flag_value(argv, i)
            launch += ["--config_file", resolve_accelerate_config(value)]
        elif key in _LAUNCH_FLAGS_WITH_VALUE:
            value, i = _flag_value(argv, i)
            launch += [key, value]
        elif key in _LAUNCH_SWITCHES:
            launch.append(arg)
            i += 1
        else:
            script.append(arg)
            i += 1
    return launch, script


def single_process_launch_defaults(launch_args: list[str]) -> list[str]:
    """What accelerate would default to on a machine with at most one GPU, passed explicitly.

    Without a config file accelerate fills `--num_processes`, `--num_machines`, `--mixed_precision` and
    `--dynamo_backend` itself and warns about each on every run. On a multi-GPU machine its default (all GPUs,
    with that warning) is left as it is: the user should see that several processes are starting.
    """
    import torch
    from accelerate.commands.config import default_config_file

    if "--config_file" in launch_args or os.path.isfile(default_config_file):
        return []
    if "--num_processes" not in launch_args and torch.cuda.device_count() > 1:
        return []
    defaults = {"--num_processes": "1", "--num_machines": "1", "--mixed_precision": "no", "--dynamo_backend": "no"}
    return [item for flag, value in defaults.items() if flag not in launch_args for item in (flag, value)]


# ------------------------------------------------------------------------------------------------------------------
# `--help`: the method's own options first, then the data, the model, launching, and TRL's training arguments
# ------------------------------------------------------------------------------------------------------------------


def _own_fields(cls) -> set[str]:
    """Fields a trl_sdx class defines or redefines (not the ones it only inherits from TRL / transformers)."""
    return {name for klass in cls.__mro__ if klass.__module__.startswith("trl_sdx")
            for name in getattr(klass, "__annotations__", {})}


def _move_to_group(parser: argparse.ArgumentParser, group, names: set[str]) -> None:
    for action in list(parser._actions):
        if action.dest in names and action.container is not group:
            action.container._group_actions.remove(action)
            group._group_actions.append(action)


def arrange_help(parser, prog: str) -> None:
    """Short usage line, the options in groups (method first), the launch flags and model aliases documented."""
    from transformers import TrainingArguments
    from trl import ModelConfig

    config_cls = next(t for t in parser.dataclass_types if issubclass(t, TrainingArguments))
    script_cls = next(t for t in parser.dataclass_types if t not in (config_cls, ModelConfig))
    parser.prog = prog
    parser.usage = f"{prog} [--config CONFIG.yaml] [--<option> VALUE ...] [--num_processes N] [--accelerate_config NAME]"
    parser.description = TRAINING_COMMANDS.get(prog.split()[-1], ("", ""))[1]
    parser.epilog = "Every option can also be set in the YAML file given to --config (flags win over the file)."
    # argparse prints groups in creation order; the catch-all "options" group (TRL's fields) goes last.
    catch_all = parser._action_groups.pop(1)
    _move_to_group(parser, parser.add_argument_group(f"{config_cls.__name__} (the method's options)"),
                   _own_fields(config_cls))
    launch = parser.add_argument_group("launch (read by trl-sdx / accelerate launch)")
    launch.add_argument("--config", metavar="CONFIG.yaml", default=argparse.SUPPRESS,
                        help="YAML file with option values (like `trl sft --config`).")
    for flag, text in _LAUNCH_FLAGS_WITH_VALUE.items():
        launch.add_argument(flag, metavar="VALUE", default=argparse.SUPPRESS, help=text)
    for flag, text in _LAUNCH_SWITCHES.items():
        launch.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=text)
    _move_to_group(parser, parser.add_argument_group(f"{script_cls.__name__} (data)"),
                   {f.name for f in dataclasses.fields(script_cls)})
    _move_to_group(parser, parser.add_argument_group("ModelConfig (models, LoRA)"),
                   {f.name for f in dataclasses.fields(ModelConfig)} | {"teacher_model_name_or_path"})
    trl_base = next(c for c in config_cls.__mro__ if not c.__module__.startswith("trl_sdx"))
    catch_all.title = f"{trl_base.__name__} (TRL / transformers training arguments)"
    parser._action_groups.append(catch_all)
    for action in parser._actions:
        if action.dest in ("model_name_or_path", "teacher_model_name_or_path") and action.help:
            action.help = action.help.rstrip() + _ALIAS_HELP


# ------------------------------------------------------------------------------------------------------------------
# Parsing in this process: one-line errors
# ------------------------------------------------------------------------------------------------------------------


def _suggest(flag: str, parser) -> str:
    options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    match = difflib.get_close_matches(flag, options, n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def _unknown_flags(strings: list[str]) -> list[str]:
    return [s.split("=", 1)[0] for s in strings if s.startswith("--")] or strings


def validate_arguments(parser, script_args: list[str]):
    """Parse like the training process will; raise `CLIError` with one line on any mistake."""
    args = list(script_args)
    if any(a.startswith("--config=") for a in args):  # TrlParser only reads `--config PATH`
        i = next(i for i, a in enumerate(args) if a.startswith("--config="))
        args[i : i + 1] = ["--config", args[i].split("=", 1)[1]]
    config_path = None
    if "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args):
            raise CLIError("--config needs the path of a YAML file.")
        config_path = args[i + 1]
        if not Path(config_path).is_file():
            raise CLIError(f"config file not found: {config_path} (looked in {Path(config_path).resolve().parent})")

    def argparse_error(message):  # argparse's own errors (bad value, missing value): one line too
        raise CLIError(message)

    parser.error = argparse_error
    try:
        *parsed, from_file, from_flags = parser.parse_args_and_config(
            args, return_remaining_strings=True, separate_remaining_strings=True)
    except (ValueError, TypeError) as error:  # a value the config rejects, or a malformed YAML file
        raise CLIError(str(error)) from None
    for flag in _unknown_flags(from_flags):
        raise CLIError(f"unrecognized argument {flag}{_suggest(flag, parser)}")
    for flag in _unknown_flags(from_file):
        raise CLIError(f"unknown key {flag[2:]!r} in {config_path}{_suggest(flag, parser)}")
    model_args = next((p for p in parsed if hasattr(p, "model_name_or_path")), None)
    if model_args is not None and model_args.model_name_or_path is None:
        raise CLIError("--model_name_or_path is required (a hub id, a local folder, or smollm2-135m-instruct); "
                       "see examples/configs/*_demo.yaml.")
    return parsed


def _training_failed(command: str, exit_code: int) -> int:
    print(f"{command}: error: the training process failed with exit code {exit_code} (its error is printed above).",
          file=sys.stderr)
    return exit_code or 1


def launch(module_name: str, argv: list[str], command: str = "trl-sdx") -> int:
    """Validate the arguments in this process (fast `--help` and errors), then `accelerate launch` the script."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    module = importlib.import_module(module_name)
    try:
        launch_args, script_args = split_launch_args(argv)
        parser = module.make_parser(prog=command)
        arrange_help(parser, command)
        validate_arguments(parser, script_args)
    except CLIError as error:
        print(f"{command}: error: {error}", file=sys.stderr)
        return 2
    launch_args += single_process_launch_defaults(launch_args)
    accelerate_args = launch_command_parser().parse_args(launch_args + [module.__file__] + script_args)
    try:
        launch_command(accelerate_args)
    except subprocess.CalledProcessError as error:  # single process: the child printed its traceback
        return _training_failed(command, error.returncode)
    except Exception as error:  # torch.distributed's ChildFailedError: each failed rank printed its traceback
        failures = getattr(error, "failures", None)
        if not failures:
            raise
        return _training_failed(command, next(iter(failures.values())).exitcode)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _available_commands()
    parser = argparse.ArgumentParser(
        prog="trl-sdx",
        description="TRL trainers for entropy-aware on-policy distillation, Self-Distillation Zero and MixSD. "
        "Training commands take the same flags and `--config file.yaml` as `trl sft`; "
        "`trl-sdx <command> --help` lists a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.add_parser("env", help="Print the versions of the training stack and the device")
    for name, (_, help_text) in commands.items():
        sub.add_parser(name, help=help_text, add_help=False)
    args, _ = parser.parse_known_args(argv[:1])
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "env":
        from trl_sdx.env import print_env

        print_env()
        return 0
    return launch(commands[args.command][0], argv[1:], command=f"trl-sdx {args.command}")


if __name__ == "__main__":
    raise SystemExit(main())
