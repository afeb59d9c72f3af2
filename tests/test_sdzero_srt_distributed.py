"""Phase 1 under a real 2-process launch (gloo on CPU): every problem is sampled exactly once across the ranks,
D_rev and the SFT split match a 1-process run of the same command, and the SFT stage runs on both ranks.

This file is also the driver the launch runs: `python test_sdzero_srt_distributed.py OUT`.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

from test_distributed import CPU_2PROC, _launch  # noqa: E402

NUM_PROBLEMS = 8


def parity_reward(completions, **kwargs):
    return [float(len(c[0]["content"]) % 2) for c in completions]


def main(out_dir: str) -> None:
    from accelerate import PartialState

    import trl_sdx.sdzero.srt_collect as collect
    from trl_sdx.data import make_arithmetic_dataset
    from trl_sdx.sdzero.srt import SRTConfig, run_srt
    from trl_sdx.testing import make_tiny_model, make_tiny_tokenizer

    sampled = []
    step = collect._collect_step

    def recording_step(sampler, tokenizer, rows, indices, *args, **kwargs):
        sampled.extend(indices)
        return step(sampler, tokenizer, rows, indices, *args, **kwargs)

    collect._collect_step = recording_step
    tokenizer = make_tiny_tokenizer()
    config = SRTConfig(
        output_dir=os.path.join(out_dir, "srt"), num_train_epochs=1, per_device_train_batch_size=2, bf16=False,
        use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, init_max_new_tokens=5,
        revision_max_new_tokens=5, num_init_samples=1, num_revisions=2, revise_correct=True, stage2_size=2,
        max_revisions=None, collection_batch_size=2, learning_rate=1e-3, warmup_steps=0, seed=0, max_steps=1,
        srt_stages=["revision"],
    )
    try:
        final = run_srt(make_tiny_model(tokenizer, seed=0), tokenizer, make_arithmetic_dataset(NUM_PROBLEMS), config,
                        reward_funcs=[parity_reward])
    finally:
        collect._collect_step = step  # the 1-process run happens inside the test session
    state = PartialState()
    with open(os.path.join(out_dir, f"rank{state.process_index}.json"), "w") as f:
        json.dump({"world_size": state.num_processes, "sampled": sampled, "final": final}, f)


def _outputs(root: Path) -> dict:
    srt = root / "srt"
    assert (srt / "stage2_revision" / "model.safetensors").is_file()
    return {
        "revisions": (srt / "revisions" / "revisions.jsonl").read_text(),
        "counts": json.loads((srt / "revisions" / "counts.json").read_text()),
        "split": json.loads((srt / "revisions" / "sft_split.json").read_text()),
    }


def test_two_process_collection_shards_the_problems_and_matches_one_process(tmp_path):
    driver = str(Path(__file__).resolve())
    two, one = tmp_path / "two", tmp_path / "one"
    result = _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
                      "--main_process_port", "0", driver, str(two)])
    assert result.returncode == 0, result.stderr[-4000:]
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the launched processes (OMP_NUM_THREADS=1): the same float results
    try:
        main(str(one))
    finally:
        torch.set_num_threads(threads)

    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["sampled"] and ranks[1]["sampled"]  # both ranks sampled ...
    assert sorted(ranks[0]["sampled"] + ranks[1]["sampled"]) == list(range(NUM_PROBLEMS))  # ... each problem once
    assert json.loads((one / "rank0.json").read_text())["sampled"] == list(range(NUM_PROBLEMS))

    got, expected = _outputs(two), _outputs(one)
    assert got["revisions"] == expected["revisions"] and got["counts"] == expected["counts"]
    assert got["counts"]["kept"] > 0 and got["split"] == expected["split"]
    assert ranks[0]["final"] == str(two / "srt" / "stage2_revision") == ranks[1]["final"]


if __name__ == "__main__":
    from trl_sdx.process_group import end_process_group

    main(sys.argv[1])
    end_process_group()
