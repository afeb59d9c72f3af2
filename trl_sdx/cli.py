"""`trl-sdx` command line, shaped like `trl`: `trl-sdx <method> --config x.yaml [--flags]`.

Each training subcommand is a script module in `trl_sdx/scripts/` exposing `make_parser(prog=None)`
(a `TrlParser`) and `main(*parsed_dataclasses)`. Like `trl sft`, the script is started through
`accelerate launch`, so `--num_processes`, `--accelerate_config fsdp2` etc. work unchanged.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.resources as resources
import sys
from pathlib import Path

# The one place where trainers register their subcommand: name -> (script module, help).
TRAINING_COMMANDS: dict[str, tuple[str, str]] = {
    "entropy-gkd": ("trl_sdx.scripts.entropy_gkd", "Entropy-aware on-policy distillation (EOPD)"),
    "sdzero": ("trl_sdx.scripts.sdzero", "Self-Distillation Zero, phase 2 (on-policy self-distillation)"),
    "sdzero-srt": ("trl_sdx.scripts.sdzero_srt", "Self-Distillation Zero, phase 1 (self-revision training)"),
    "mixsd": ("trl_sdx.scripts.mixsd", "MixSD knowledge injection (build mixed targets, then SFT)"),
}

# Arguments consumed by `accelerate launch` rather than by the training script.
_LAUNCH_FLAGS_WITH_VALUE = {"--num_processes", "--main_process_port", "--mixed_precision", "--config_file"}
_LAUNCH_SWITCHES = {"--cpu", "--multi_gpu"}


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
    raise SystemExit(
        f"--accelerate_config {name_or_path!r} is neither a file nor a shipped config "
        "(multi_gpu, fsdp2, zero2, zero3, ...)."
    )


def split_launch_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `accelerate launch` flags from the training script's own flags."""
    launch, script = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key = arg.split("=", 1)[0]
        if key == "--accelerate_config":
            value = arg.split("=", 1)[1] if "=" in arg else argv[i + 1]
            launch += ["--config_file", resolve_accelerate_config(value)]
            i += 1 if "=" in arg else 2
        elif key in _LAUNCH_FLAGS_WITH_VALUE:
            launch += [arg] if "=" in arg else [arg, argv[i + 1]]
            i += 1 if "=" in arg else 2
        elif key in _LAUNCH_SWITCHES:
            launch.append(arg)
            i += 1
        else:
            script.append(arg)
            i += 1
    return launch, script


def launch(module_name: str, argv: list[str]) -> int:
    """Validate the arguments in this process (fast `--help` and errors), then `accelerate launch`."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    module = importlib.import_module(module_name)
    launch_args, script_args = split_launch_args(argv)
    module.make_parser().parse_args_and_config(script_args)  # exits with a clear message on bad flags
    script_path = module.__file__
    accelerate_args = launch_command_parser().parse_args(launch_args + [script_path] + script_args)
    launch_command(accelerate_args)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _available_commands()
    parser = argparse.ArgumentParser(
        prog="trl-sdx",
        description="TRL trainers for entropy-aware on-policy distillation, Self-Distillation Zero and MixSD. "
        "Training commands take the same flags and `--config file.yaml` as `trl sft`.",
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
    return launch(commands[args.command][0], argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
