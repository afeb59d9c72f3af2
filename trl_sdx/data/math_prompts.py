"""Build the `math_prompts` folder that `examples/configs/entropy_gkd.yaml` trains on (the paper's MATH prompts).

    python -m trl_sdx.data.math_prompts                       # MATH train split from the hub -> math_prompts/
    python -m trl_sdx.data.math_prompts --source my/math --output my_prompts

Each problem becomes a conversational `prompt` (one user turn: the problem, then the boxed-answer instruction of
the synthetic task) and its `answer` is kept when the source has one. Needs network access for a hub source.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .arithmetic import INSTRUCTION

DEFAULT_SOURCE = "DigitalLearningGmbH/MATH-lighteval"  # MATH (Hendrycks et al.), 7,500 train problems


def to_prompts(dataset, problem_column: str = "problem"):
    """Rows with a conversational `prompt` (and `answer`/`solution` kept when present)."""
    if problem_column not in dataset.column_names:
        raise ValueError(f"The source has no {problem_column!r} column (columns: {dataset.column_names}); pass "
                         "`--problem_column`.")
    keep = [c for c in ("answer", "solution") if c in dataset.column_names]
    return dataset.map(lambda row: {"prompt": [{"role": "user", "content": f"{row[problem_column]} {INSTRUCTION}"}]},
                       remove_columns=[c for c in dataset.column_names if c not in keep])


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m trl_sdx.data.math_prompts", description=__doc__.split("\n")[0])
    parser.add_argument("--source", default=DEFAULT_SOURCE,
                        help="Hub dataset, local folder, or one .parquet/.json(l)/.csv file with a problem column.")
    parser.add_argument("--split", default="train")
    parser.add_argument("--problem_column", default="problem")
    parser.add_argument("--output", default="math_prompts", help="Folder to write (train.parquet inside).")
    args = parser.parse_args(argv)
    from datasets import load_dataset

    suffix = Path(args.source).suffix.lstrip(".")
    if Path(args.source).is_file() and suffix in ("parquet", "json", "jsonl", "csv"):  # one local file
        source = load_dataset("json" if suffix == "jsonl" else suffix, data_files=args.source, split="train")
    else:
        source = load_dataset(args.source, split=args.split)
    prompts = to_prompts(source, args.problem_column)
    target = Path(args.output) / "train.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    prompts.to_parquet(str(target))
    print(f"{len(prompts)} prompts written to {target} (dataset_name: {args.output})")
    return target


if __name__ == "__main__":
    main()
