"""`python -m trl_sdx.data.math_prompts` builds the folder examples/configs/entropy_gkd.yaml trains on."""

import pytest
from datasets import Dataset, load_dataset

from trl_sdx.data.arithmetic import INSTRUCTION
from trl_sdx.data.math_prompts import main, to_prompts


def test_builds_a_prompt_folder_from_a_local_source(tmp_path):
    source = tmp_path / "math.parquet"
    Dataset.from_dict({"problem": ["What is $1+1$?", "Solve $x^2=4$."], "solution": ["2", "\\pm 2"],
                       "level": ["1", "2"]}).to_parquet(str(source))
    target = main(["--source", str(source), "--output", str(tmp_path / "math_prompts")])
    assert target == tmp_path / "math_prompts" / "train.parquet"
    built = load_dataset("parquet", data_files=str(target), split="train")
    assert built.column_names == ["solution", "prompt"]
    assert built[0]["prompt"] == [{"role": "user", "content": f"What is $1+1$? {INSTRUCTION}"}]


def test_a_source_without_the_problem_column_names_it():
    with pytest.raises(ValueError, match="no 'problem' column"):
        to_prompts(Dataset.from_dict({"question": ["q"]}))
