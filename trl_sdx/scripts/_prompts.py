"""What the on-policy scripts (entropy-gkd, sdzero) share: a prompt dataset, hub/local or built in-process."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import ScriptArguments

SYNTHETIC_ARITHMETIC = "synthetic-arithmetic"


@dataclass
class PromptScriptArguments(ScriptArguments):
    """TRL's `ScriptArguments` plus the size of the built-in synthetic arithmetic task (offline runs)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Dataset to train on: a hub name or local path loaded with `datasets.load_dataset` (a `prompt` "
            f"column; SD-Zero's default reward also reads `answer`), or `{SYNTHETIC_ARITHMETIC}` for generated "
            "arithmetic word problems with answers (offline)."
        },
    )
    synthetic_num_prompts: int = field(
        default=256, metadata={"help": f"Number of prompts of `{SYNTHETIC_ARITHMETIC}`."}
    )
    synthetic_difficulty: int = field(
        default=1, metadata={"help": f"Difficulty of `{SYNTHETIC_ARITHMETIC}` (1 = two-digit additions)."}
    )
    synthetic_seed: int = field(default=0, metadata={"help": f"Seed of `{SYNTHETIC_ARITHMETIC}`."})


def load_prompt_datasets(script_args: PromptScriptArguments, want_eval: bool):
    """(train, eval or None): the synthetic set built in-process (10% held out for eval), else `load_dataset`."""
    if script_args.dataset_name is None:
        raise ValueError(
            f"`--dataset_name` is required: a hub dataset / local path with a `prompt` column, or "
            f"`{SYNTHETIC_ARITHMETIC}`."
        )
    if script_args.dataset_name == SYNTHETIC_ARITHMETIC:
        from trl_sdx.data import make_arithmetic_dataset

        dataset = make_arithmetic_dataset(script_args.synthetic_num_prompts, seed=script_args.synthetic_seed,
                                          difficulty=script_args.synthetic_difficulty)
        if not want_eval:
            return dataset, None
        split = dataset.train_test_split(test_size=0.1, seed=script_args.synthetic_seed)
        return split["train"], split["test"]
    from datasets import load_dataset

    dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config,
                           streaming=script_args.dataset_streaming)
    eval_dataset = dataset[script_args.dataset_test_split] if want_eval else None
    return dataset[script_args.dataset_train_split], eval_dataset


def print_metric_summary(trainer, title: str, names, marker: str) -> None:
    """`names` of the first and the last logged step (those logging `marker`), for a quick look at a run."""
    logged = [entry for entry in trainer.state.log_history if marker in entry]
    if not logged or not trainer.accelerator.is_main_process:
        return
    print(f"{title} (first -> last logged step):")
    for name in names:
        first, last = logged[0].get(name), logged[-1].get(name)
        if first is not None and last is not None:
            print(f"  {name:<26} {first:8.4f} -> {last:8.4f}")


def train_summarise_save(trainer, training_args, dataset_name: str | None, title: str, names,
                         marker: str) -> None:
    """The tail every on-policy script shares: train (resuming if asked), print the method's metrics, save, push."""
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    print_metric_summary(trainer, title, names, marker=marker)
    trainer.save_model(training_args.output_dir)
    # TRL writes the card only with checkpoints or a push; generated data sets have no hub page to link to.
    trainer.create_model_card(dataset_name=None if str(dataset_name).startswith("synthetic-") else dataset_name)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir} (metrics.jsonl, trainer_state.json, "
                              "training_curves.png and README.md next to it).")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
